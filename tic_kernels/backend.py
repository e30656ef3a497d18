"""Which implementation runs: Triton on CUDA (and on the CPU under TRITON_INTERPRET=1), else the
reference. float64 always takes the reference (the kernels compute in fp32)."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA torch; CPU wheels may lack it
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON or t.dtype == torch.float64:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
