"""Shared test set-up. The Triton interpreter must be on before any @triton.jit runs, so the
CPU test run exercises the same kernels as a GPU (set TIC_TEST_NO_INTERPRET=1 to test the
plain-reference CPU path instead)."""
import os

if os.environ.get("TIC_TEST_NO_INTERPRET") != "1" and not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import tempfile  # noqa: E402

# Inductor's on-disk graph cache keys opaque custom ops by name, not by their Python body: a
# cache left by an earlier version of an op would replay its old shapes. Each run starts cold,
# as CI does.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tic_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
