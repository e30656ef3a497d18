"""Op 2: per-sequence reduction over packed cu_seqlens or a padded mask.

    S_i = sum_{t in seq i} x_t            (reduce="sum")
    M_i = S_i / max(L_i, 1)               (reduce="mean")
Backward broadcasts dL/dS_i (divided by max(L_i, 1) for "mean") to the tokens of sequence i;
masked positions get exactly zero.

Both layouts become *segments*: sequence i covers flat positions [cu[i], cu[i+1]) of the
token array, and with a padded mask only the positions whose mask is set count (cu = i * T).
One program per sequence sums its tokens in order, so results are bitwise reproducible.
Bytes moved: the N values (and mask) once; B outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .. import validation as check
from ..backend import (BLOCK_TOKENS, cast_for_store, emulate_rne, grads_by_name,
                       inputs_by_name, launch, segment_bounds, segments, triton_op, use_triton)
from ..options import REDUCES


@triton.jit
def _segment_sum_fwd_kernel(
    values_ptr, cu_ptr, mask_ptr, out_ptr, count_ptr, N,
    HAS_MASK: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    start, end = segment_bounds(cu_ptr, i, N)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        keep = idx < end
        if HAS_MASK:
            keep &= tl.load(mask_ptr + idx, mask=keep, other=0) != 0
        acc += tl.load(values_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        cnt += keep.to(tl.int32)
    total = tl.sum(acc, 0)
    n = tl.sum(cnt, 0)
    if MEAN:
        total = total / tl.maximum(n, 1).to(tl.float32)
    tl.store(out_ptr + i, total)
    tl.store(count_ptr + i, n)


@triton.jit
def _segment_sum_bwd_kernel(
    grad_out_ptr, cu_ptr, mask_ptr, count_ptr, grad_ptr, N,
    HAS_MASK: tl.constexpr, MEAN: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    start, end = segment_bounds(cu_ptr, i, N)
    g = tl.load(grad_out_ptr + i).to(tl.float32)
    if MEAN:
        g = g / tl.maximum(tl.load(count_ptr + i), 1).to(tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inside = idx < end
        d = tl.zeros([BLOCK], dtype=tl.float32) + g
        if HAS_MASK:
            d = tl.where(tl.load(mask_ptr + idx, mask=inside, other=0) != 0, d, 0.0)
        tl.store(grad_ptr + idx, cast_for_store(d, grad_ptr.dtype.element_ty, EMULATE_RNE),
                 mask=inside)


@triton_op("tic_kernels::segment_sum_fwd", mutates_args=())
def segment_sum_fwd(values: torch.Tensor, cu: torch.Tensor, mask: Optional[torch.Tensor],
                    mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums or means (B,) fp32, counts (B,) int32) of flat ``values`` over the segments."""
    B = cu.numel() - 1
    out = torch.empty(B, dtype=torch.float32, device=values.device)
    count = torch.empty(B, dtype=torch.int32, device=values.device)
    values = values.reshape(-1).contiguous()  # the kernel reads flat positions
    if B:
        launch(_segment_sum_fwd_kernel, (B,),
            values, cu.contiguous(), values if mask is None else mask.contiguous(), out, count,
            values.numel(), HAS_MASK=mask is not None, MEAN=mean, BLOCK=BLOCK_TOKENS)
    return out, count


@triton_op("tic_kernels::segment_sum_bwd", mutates_args=())
def segment_sum_bwd(grad_out: torch.Tensor, cu: torch.Tensor, mask: Optional[torch.Tensor],
                    count: torch.Tensor, mean: bool, like: torch.Tensor) -> torch.Tensor:
    """dL/dvalues, shaped and typed like the flat ``like`` (the forward's values)."""
    # positions outside every segment (none when cu ends at N) keep a zero gradient
    grad = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    B = cu.numel() - 1
    if B:
        launch(_segment_sum_bwd_kernel, (B,),
            grad_out.contiguous(), cu.contiguous(), grad if mask is None else mask.contiguous(),
            count.contiguous(), grad, grad.numel(), HAS_MASK=mask is not None, MEAN=mean,
            EMULATE_RNE=emulate_rne(grad.dtype), BLOCK=BLOCK_TOKENS)
    return grad


def _setup_context(ctx, inputs, output):
    args = inputs_by_name(segment_sum_fwd, inputs)
    ctx.save_for_backward(args["cu"], args["mask"], output[1], args["values"])
    ctx.mean = args["mean"]


def _backward(ctx, grad_out, _grad_count):
    cu, mask, count, values = ctx.saved_tensors
    return grads_by_name(segment_sum_fwd,
                         values=segment_sum_bwd(grad_out, cu, mask, count, ctx.mean, values))


segment_sum_fwd.register_autograd(_backward, setup_context=_setup_context)


# The backward is linear in grad_out (a broadcast), so its own gradient is the forward again:
# sequence sums are differentiable to any order, on both paths.
def _setup_bwd_context(ctx, inputs, output):
    args = inputs_by_name(segment_sum_bwd, inputs)
    ctx.save_for_backward(args["cu"], args["mask"])
    ctx.mean = args["mean"]


def _bwd_backward(ctx, grad_grad):
    cu, mask = ctx.saved_tensors
    return grads_by_name(segment_sum_bwd,
                         grad_out=segment_sum_fwd(grad_grad, cu, mask, ctx.mean)[0])


segment_sum_bwd.register_autograd(_bwd_backward, setup_context=_setup_bwd_context)


def sequence_logprobs(values, *, cu_seqlens=None, mask=None, reduce="sum"):
    """Sum (or mean) of per-token values over each sequence.

    Args:
        values: packed (N,) with ``cu_seqlens`` (B+1,) int32/int64, or padded (B, T) with
            ``mask`` (B, T) bool or 0/1 (masked positions are never read); any float dtype.
        reduce: "sum" or "mean" (mean over the sequence's tokens; 0 for an empty sequence).

    Returns:
        (B,) float32 (float64 for float64 values), differentiable w.r.t. values. Reduce
        per-token differences (logp - logp_old), not two sums, to keep log-ratios exact.
    """
    check.choice("reduce", reduce, REDUCES)
    check.float_tensor("values", values)
    check.layout(cu_seqlens, mask)
    with check.one_read():
        if cu_seqlens is not None:
            if values.dim() != 1:
                raise ValueError(f"values must be 1-D (N,) with cu_seqlens, got shape "
                                 f"{tuple(values.shape)}")
            check.cu_seqlens_ok(cu_seqlens, values.shape[0], device_of=("values", values))
        else:
            if values.dim() != 2:
                raise ValueError(f"values must be 2-D (B, T) with mask, got shape "
                                 f"{tuple(values.shape)}")
            check.mask_ok(mask, values.shape, device_of=("values", values))
    if not use_triton(values):
        return reference.sequence_logprobs(values, cu_seqlens, mask, reduce)
    cu, flat_mask = segments(cu_seqlens, mask, values.device)
    out, _ = segment_sum_fwd(values.reshape(-1), cu, flat_mask, reduce == "mean")
    return out
