"""grad *= g, g a device scalar (the incoming gradient of a loss whose gradient was formed in
its forward), decided on the device: at g == 1 (a plain ``loss.backward()``) every program
returns without reading or writing, and no host ever reads g."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import cast_for_store, emulate_rne, launch

BLOCK_SCALE = 4096


@triton.jit
def _scale_kernel(grad_ptr, g_ptr, n, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= g (a device scalar), reading and writing nothing when g is exactly 1."""
    g = tl.load(g_ptr).to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = (offs < n) & (tl.zeros([BLOCK], dtype=tl.float32) + g != 1.0)
    x = tl.load(grad_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(grad_ptr + offs, cast_for_store(x * g, grad_ptr.dtype.element_ty, EMULATE_RNE),
             mask=keep)


def scale_in_place(grad, g):
    """grad *= g on the device (grad contiguous, g a 0-d or one-element tensor), nothing
    touched when g is 1. Returns grad."""
    n = grad.numel()
    if n:
        launch(_scale_kernel, (-(-n // BLOCK_SCALE),), grad, g.reshape(1), n,
               EMULATE_RNE=emulate_rne(grad.dtype), BLOCK=BLOCK_SCALE)
    return grad


def scale_once(ctx, g, grads, what):
    """The gradients a loss formed in its forward (None: not wanted), times its incoming
    gradient ``g``: in eager mode in place (they are nobody else's, so none is held twice),
    and only once per forward: a second backward raises, naming ``what``. A graph being
    traced (compiled autograd; plain tensors are not what it sees) scales them out of place."""
    eager = type(g) is torch.Tensor
    if eager and getattr(ctx, "scaled", False):
        raise RuntimeError(f"{what}: backward ran twice through one forward; its gradient is "
                           "formed in the forward and scaled once (one backward per forward), "
                           "so run the forward again for each backward")
    ctx.scaled = True
    return [None if t is None else scale_in_place(t, g) if eager else t * g for t in grads]
