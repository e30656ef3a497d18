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


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and is_fake(t)


def launch(kernel, grid, *args, **meta):
    """``wrap_triton(kernel)[grid](*args, **meta)``, the one way this package launches kernels.

    On a GPU, wrap_triton makes the launch traceable by torch.compile. Under TRITON_INTERPRET=1
    wrap_triton returns the raw interpreted kernel, which would run on fake tensors while
    torch.compile or opcheck trace the op; there the launch is skipped, since tracing needs only
    the shapes of the outputs the op allocated.
    """
    if interpreting() and any(_is_fake(a) for a in args):
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type == "cuda" and not torch.compiler.is_compiling():
        # Triton launches on the current device: guard with the tensors' own (cuda:1 while
        # the current device is cuda:0). Compiled graphs place their own guards.
        with torch.cuda.device(device):
            torch.library.wrap_triton(kernel)[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def triton_op(name, *, mutates_args):
    """Registers ``fn`` as the torch.library op ``name`` (namespace tic_kernels).

    On a GPU: ``torch.library.triton_op``, so torch.compile traces into it and sees the
    kernels. Under TRITON_INTERPRET=1 kernel launches cannot be captured in a graph, so the op
    is an opaque ``custom_op`` whose fake implementation is the same function (``launch``
    skips the kernel on fake tensors): compiled graphs then call the interpreter at run time.
    """
    def register(fn):
        if not interpreting():
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op
    return register
