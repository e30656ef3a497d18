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

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist runs one process per core (make test: -n auto): each computes on one thread
    torch.set_num_threads(max(1, (os.cpu_count() or 1)
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

if os.environ.get("TRITON_INTERPRET") == "1":
    # tl.minimum / tl.maximum without propagate_nan compile to PTX min/max, which return the
    # operand that is not NaN; Triton 3.6's interpreter propagates NaN instead. Give the
    # interpreter the GPU's semantics, so that the NaN rule is tested as a GPU runs it.
    import numpy as _np
    from triton.runtime.interpreter import InterpreterBuilder as _Builder

    _Builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, _np.fmin)
    _Builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, _np.fmax)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def requires_triton():
    """For the tests that compare the Triton kernels with the reference: on a path where the
    kernels do not run (TIC_TEST_NO_INTERPRET=1 on a CPU) they would compare the reference
    with itself, so they skip, saying why."""
    from tic_kernels.backend import use_triton
    if not use_triton(torch.empty(1, device=DEVICE)):
        pytest.skip("the Triton kernels are off on this path (TIC_TEST_NO_INTERPRET=1 without "
                    "a GPU): a fused-vs-reference test would compare the reference with itself")


# The longest tests (subprocesses, long sequences under the interpreter) are collected first,
# so that under pytest-xdist they start at once rather than leave one worker busy at the end.
_LONGEST = ("test_gpu_check_dry_run", "test_edge_shapes", "test_sharded_equals_unsharded",
            "test_ddp_and_fsdp_match", "test_two_processes_train", "test_fused_loss_matches",
            "test_reference_memory_is_chunked", "test_bitwise_deterministic")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.name.startswith(_LONGEST))


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    """Runs a test on both implementations a CPU user meets: the Triton kernels (under the
    interpreter) and the plain PyTorch reference (TRITON_INTERPRET unset). On a GPU the
    kernels always run, so the reference case skips there."""
    from tic_kernels.backend import interpreting
    if request.param == "reference":
        if DEVICE == "cuda":
            pytest.skip("CUDA tensors always take the kernels")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif DEVICE == "cpu" and not interpreting():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def require_extra(module: str, extra: str):
    """Imports an optional framework for its integration tests (``extra`` is the pip extra
    that installs it). Absent, the tests skip, unless TIC_KERNELS_REQUIRE_EXTRAS=1 (CI sets
    it, having installed the extras), where an absent framework fails the run."""
    if os.environ.get("TIC_KERNELS_REQUIRE_EXTRAS") == "1":
        import importlib
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"pip install tic_kernels[{extra}]")
