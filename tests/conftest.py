"""Shared test set-up. The Triton interpreter must be on before any @triton.jit runs, so the
CPU test run exercises the same kernels as a GPU (set TIC_TEST_NO_INTERPRET=1 to test the
plain-reference CPU path instead)."""
import os

if os.environ.get("TIC_TEST_NO_INTERPRET") != "1" and not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
