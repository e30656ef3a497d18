"""Op 2: per-sequence reduction over packed cu_seqlens or a padded mask.

    S_i = sum_{t in seq i} x_t            (reduce="sum")
    M_i = S_i / max(L_i, 1)               (reduce="mean")
Backward broadcasts dL/dS_i (divided by max(L_i, 1) for "mean") to the tokens of sequence i;
masked positions get exactly zero.
"""
from __future__ import annotations

from . import reference
from . import validation as check


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
    check.choice("reduce", reduce, check.REDUCES)
    check.float_tensor("values", values)
    check.layout(cu_seqlens, mask)
    if cu_seqlens is not None:
        if values.dim() != 1:
            raise ValueError(f"values must be 1-D (N,) with cu_seqlens, got shape {tuple(values.shape)}")
        check.cu_seqlens_ok(cu_seqlens, values.shape[0])
        check.same_device("values", values, cu_seqlens=cu_seqlens)
    else:
        if values.dim() != 2:
            raise ValueError(f"values must be 2-D (B, T) with mask, got shape {tuple(values.shape)}")
        check.mask_ok(mask, values.shape)
        check.same_device("values", values, mask=mask)
    return reference.sequence_logprobs(values, cu_seqlens, mask, reduce)
