"""The value checks of a call in one kernel: the checks on the inputs' values that every call
of the losses and of op 1 makes (the targets in range, cu_seqlens well formed, a mask of 0
and 1) read the inputs once, in one launch, instead of a dozen small torch ops each.

validation.py gathers a call's value checks and reads their flags back once (one host
sync); on the kernels' path (a CUDA tensor, or a CPU one under TRITON_INTERPRET=1) the checks
listed in ``POSITIONS`` hand their inputs to it instead of computing a flag, and ``flags``
computes them all here. The flags' meaning and the errors they raise are validation.py's:
the same checks in torch ops serve every other path, and the error messages.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import dense, launch

# The flags the kernel raises, by check: a target outside [0, vocab) (other than
# ignore_index) at a loss token; cu_seqlens not starting at 0, decreasing somewhere, not
# ending at the token count; a mask value other than 0 and 1
POSITIONS = {"targets": (0,), "cu_seqlens": (1, 2, 3), "mask": (4,)}
FLAGS = 5
BLOCK = 1024


@triton.jit
def _raise(flag_ptr, bad):
    """Sets the flag when any element of ``bad`` is set (flags only ever rise: programs may
    raise one in any order)."""
    tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), 0))


@triton.jit
def _value_checks_kernel(targets_ptr, tmask_ptr, R, vocab, ignore_index, cu_ptr, B, n, mask_ptr,
                         M, flags_ptr, TARGETS: tl.constexpr, TARGET_MASK: tl.constexpr,
                         IGNORE: tl.constexpr, CU: tl.constexpr, MASK01: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Program p checks elements [p BLOCK, (p + 1) BLOCK) of each input and raises the flags
    (FLAGS int32, zero on entry) of what it finds."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if TARGETS:
        inside = offs < R
        t = tl.load(targets_ptr + offs, mask=inside, other=0)
        bad = inside & ((t < 0) | (t >= vocab))
        if IGNORE:
            bad = bad & (t != ignore_index)
        if TARGET_MASK:
            bad = bad & (tl.load(tmask_ptr + offs, mask=inside, other=0) != 0)
        _raise(flags_ptr + 0, bad)
    if CU:
        inside = offs < B  # the pairs (cu[i], cu[i + 1]) of the B segments
        lo = tl.load(cu_ptr + offs, mask=inside, other=0)
        hi = tl.load(cu_ptr + offs + 1, mask=inside, other=0)
        _raise(flags_ptr + 2, inside & (hi < lo))
        if pid == 0:
            tl.atomic_max(flags_ptr + 1, (tl.load(cu_ptr) != 0).to(tl.int32))
            tl.atomic_max(flags_ptr + 3, (tl.load(cu_ptr + B) != n).to(tl.int32))
    if MASK01:
        inside = offs < M
        m = tl.load(mask_ptr + offs, mask=inside, other=0)
        _raise(flags_ptr + 4, inside & (m != 0) & (m != 1))


def flags(batch: dict) -> torch.Tensor:
    """The FLAGS int32 flags (1: that check failed, at POSITIONS) of the checks ``batch``:
    {"targets": (targets, vocab, ignore_index or None, mask or None), "cu_seqlens":
    (cu_seqlens, n), "mask": (mask,)}, each optional, every tensor on one device; one launch
    (and the zeroed flags)."""
    device = next(iter(batch.values()))[0].device
    out = torch.zeros(FLAGS, dtype=torch.int32, device=device)
    targets, vocab, ignore, tmask = batch.get("targets", (None, 0, None, None))
    cu, n = batch.get("cu_seqlens", (None, 0))
    mask, = batch.get("mask", (None,))
    R = 0 if targets is None else targets.numel()
    B = 0 if cu is None else cu.numel() - 1
    M = 0 if mask is None else mask.numel()
    targets, tmask, cu, mask = dense(targets), dense(tmask), dense(cu), dense(mask)
    launch(_value_checks_kernel, (max(1, triton.cdiv(max(R, B, M), BLOCK)),),
           out if targets is None else targets, out if tmask is None else tmask, R, vocab,
           0 if ignore is None else ignore, out if cu is None else cu, B, n,
           out if mask is None else mask, M, out, TARGETS=targets is not None,
           TARGET_MASK=tmask is not None, IGNORE=ignore is not None, CU=cu is not None,
           MASK01=mask is not None, BLOCK=BLOCK)
    return out
