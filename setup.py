"""Builds the optional C++/CUDA packing extension; everything else lives in pyproject.toml."""
from setuptools import setup

setup()
