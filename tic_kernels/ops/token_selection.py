"""Op 4's batch-wide token selections on the device (docs/spec.md, op 4): KL-Cov's tokens of
largest covariance and the tokens the top-entropy quantile keeps, as uint8 flags per flat
position (ratio_objectives.FLAG_KL_COV, FLAG_KEPT) that the loss kernel reads.

No host sync, and a few launches rather than a few dozen small torch ops: one pass over the
positions zeroes the flags, writes the top-entropy sort keys and leaves per-block partial
sums (the loss tokens' count, whether an entropy among them is NaN, their sums of A and
logp); then per selection a sort (torch.sort) between two passes: KL-Cov's keys from the
means (a second pass), and the flags of the first max(1, floor(share N)) tokens in the sorted
order; the entropy quantile (a lerp of two sorted values, as torch.quantile) and the flags of
the tokens at or above it. Each pass reduces the partial sums itself, in a fixed order.
"""
from __future__ import annotations

import struct
import sys

import torch
import triton
import triton.language as tl

from ..backend import as_f32, flat, launch, segment_bounds, use_triton
from ..reference.loss import entropy_selection as _reference_selection
from .ratio_objectives import FLAG_KEPT, FLAG_KL_COV

BLOCK_POS = 1024  # positions per program
BLOCK_PART = 1024  # partial sums read per step when a program reduces them
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _loss_tokens(pos, R, cu_ptr, mask_ptr, B, PADDED: tl.constexpr, HAS_MASK: tl.constexpr):
    """Which flat positions ``pos`` are loss tokens: inside [cu[0], cu[B]) (packed; padded:
    any of the B T positions) where the mask (any dtype, flat), if given, is set."""
    valid = (pos >= 0) & (pos < R)
    if not PADDED:
        lo, hi = segment_bounds(cu_ptr, 0, R, B)
        valid &= (pos >= lo) & (pos < hi)
    if HAS_MASK:
        valid &= tl.load(mask_ptr + pos, mask=valid, other=0) != 0
    return valid


@triton.jit
def _advantage(pos, valid, adv_ptr, cu_ptr, T, B, search_steps, PADDED: tl.constexpr):
    """The advantage of each position's sequence (0 off the loss tokens): padded, row pos // T;
    packed, the number of ends cu[i + 1] <= pos (a binary search of search_steps steps over
    the sorted cu)."""
    if PADDED:
        seq = pos // T
    else:
        lo = tl.zeros_like(pos)
        hi = lo + B
        for step in range(0, search_steps):  # noqa: B007
            mid = (lo + hi) // 2
            searching = lo < hi
            end = tl.load(cu_ptr + 1 + mid, mask=searching & (mid < B), other=0).to(tl.int64)
            right = end <= pos
            lo = tl.where(searching & right, mid + 1, lo)
            hi = tl.where(searching & ~right, mid, hi)
        seq = lo
    seq = tl.minimum(seq, B - 1)
    return tl.load(adv_ptr + seq, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _selection_pass_kernel(
    logp_ptr, entropy_ptr, adv_ptr, cu_ptr, mask_ptr, flags_ptr, key_ptr, counts_ptr, sums_ptr,
    R, T, B, search_steps,
    PADDED: tl.constexpr, HAS_MASK: tl.constexpr, KL_COV: tl.constexpr,
    TOP_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program p over positions [p BLOCK, (p + 1) BLOCK): zeroes their flags; TOP_ENTROPY,
    writes the sort keys (the entropy, +inf off the loss tokens); leaves counts[p] = (loss
    tokens, any NaN entropy among them) and, KL_COV, sums[p] = (sum A, sum logp) over them,
    in float64 (so that equal advantages have their own value as their mean, exactly)."""
    p = tl.program_id(0)
    pos = p.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < R
    valid = _loss_tokens(pos, R, cu_ptr, mask_ptr, B, PADDED, HAS_MASK)
    tl.store(flags_ptr + pos, tl.zeros([BLOCK], dtype=tl.uint8), mask=inside)
    nan_any = 0
    if TOP_ENTROPY:
        H = tl.load(entropy_ptr + pos, mask=inside, other=0.0).to(tl.float32)
        tl.store(key_ptr + pos, tl.where(valid, H, float("inf")), mask=inside)
        nan_any = tl.max((valid & (H != H)).to(tl.int32), 0)
    tl.store(counts_ptr + 2 * p, tl.sum(valid.to(tl.int32), 0))
    tl.store(counts_ptr + 2 * p + 1, nan_any)
    if KL_COV:
        A = _advantage(pos, valid, adv_ptr, cu_ptr, T, B, search_steps, PADDED)
        lp = tl.load(logp_ptr + pos, mask=valid, other=0.0).to(tl.float32)
        tl.store(sums_ptr + 2 * p, tl.sum(A.to(tl.float64), 0))
        tl.store(sums_ptr + 2 * p + 1, tl.sum(lp.to(tl.float64), 0))


@triton.jit
def _reduce_counts(counts_ptr, P, BLOCK_P: tl.constexpr):
    """(loss tokens, any NaN entropy) over the P blocks' counts, in a fixed order."""
    n = 0
    nan_any = 0
    for start in range(0, P, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)
        n += tl.sum(tl.load(counts_ptr + 2 * j, mask=j < P, other=0), 0)
        nan_any = tl.maximum(nan_any, tl.max(tl.load(counts_ptr + 2 * j + 1, mask=j < P,
                                                     other=0), 0))
    return n, nan_any


@triton.jit
def _covariance_keys_kernel(
    logp_ptr, adv_ptr, cu_ptr, mask_ptr, counts_ptr, sums_ptr, key_ptr, R, T, B, P,
    search_steps, PADDED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """KL-Cov's sort keys: -(A - mean A)(logp - mean logp) on the loss tokens (means over them
    in float64, rounded to float32),
    NaN elsewhere, so that an ascending stable sort lists the loss tokens first, by
    covariance from the largest, ties in position order. A NaN covariance (the largest to
    torch's descending sort, as to the reference) keys -inf, +inf keys -FLT_MAX (so that a
    finite covariance of exactly FLT_MAX ties with +inf, in position order)."""
    n, _ = _reduce_counts(counts_ptr, P, BLOCK_P)
    sum_A = tl.zeros((), dtype=tl.float64)
    sum_lp = tl.zeros((), dtype=tl.float64)
    for start in range(0, P, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)
        sum_A += tl.sum(tl.load(sums_ptr + 2 * j, mask=j < P, other=0.0), 0)
        sum_lp += tl.sum(tl.load(sums_ptr + 2 * j + 1, mask=j < P, other=0.0), 0)
    count = tl.maximum(n, 1).to(tl.float64)
    mean_A = (sum_A / count).to(tl.float32)
    mean_lp = (sum_lp / count).to(tl.float32)
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = _loss_tokens(pos, R, cu_ptr, mask_ptr, B, PADDED, HAS_MASK)
    A = _advantage(pos, valid, adv_ptr, cu_ptr, T, B, search_steps, PADDED)
    lp = tl.load(logp_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    cov = (A - mean_A) * (lp - mean_lp)
    key = tl.where(cov != cov, -float("inf"), tl.where(cov == float("inf"), -_FLT_MAX, -cov))
    tl.store(key_ptr + pos, tl.where(valid, key, float("nan")), mask=pos < R)


@triton.jit
def _covariance_take_kernel(order_ptr, counts_ptr, flags_ptr, R, P, share_bits,
                            BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Flags FLAG_KL_COV on the first max(1, floor(share N)) of the sorted positions (the loss
    tokens lead the order); ``share_bits`` the float64 share's bits (a float argument would
    reach the kernel in float32, and floor(share N) must be the float64 product's)."""
    n, _ = _reduce_counts(counts_ptr, P, BLOCK_P)
    share = share_bits.to(tl.float64, bitcast=True)
    k = tl.maximum(tl.floor(n.to(tl.float64) * share), 1.0).to(tl.int64)
    rank = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    chosen = (rank < R) & (rank < tl.minimum(k, n.to(tl.int64)))
    at = tl.load(order_ptr + rank, mask=chosen, other=0)
    old = tl.load(flags_ptr + at, mask=chosen, other=0)
    tl.store(flags_ptr + at, old | FLAG_KL_COV, mask=chosen)


@triton.jit
def _entropy_kept_kernel(
    entropy_ptr, sorted_ptr, cu_ptr, mask_ptr, counts_ptr, flags_ptr, R, B, P, below_share,
    PADDED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Flags FLAG_KEPT on the loss tokens whose entropy is at least the (1 - keep)-quantile of
    theirs (``below_share`` = 1 - keep, float32): torch.quantile's linear interpolation
    between two of the sorted keys, by torch.lerp's formula; none when an entropy among them
    is NaN."""
    below_share = as_f32(below_share)
    n, nan_any = _reduce_counts(counts_ptr, P, BLOCK_P)
    last = tl.maximum(n - 1, 0)
    rank = below_share * last.to(tl.float32)
    below = tl.minimum(rank.to(tl.int32), last)
    a = tl.load(sorted_ptr + below)
    b = tl.load(sorted_ptr + tl.minimum(tl.ceil(rank).to(tl.int32), last))
    w = rank - below.to(tl.float32)
    # torch.lerp forms w (b - a) + a (or b - (b - a)(1 - w)) in one fused multiply-add: the
    # product of two float32 numbers is exact in float64, so the float64 sum rounded once
    # gives its value
    diff = (b - a).to(tl.float64)
    threshold = tl.where(w < 0.5, a.to(tl.float64) + w.to(tl.float64) * diff,
                         b.to(tl.float64) - diff * (1.0 - w).to(tl.float64)).to(tl.float32)
    threshold = tl.where(nan_any > 0, float("nan"), threshold)
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = _loss_tokens(pos, R, cu_ptr, mask_ptr, B, PADDED, HAS_MASK)
    H = tl.load(entropy_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    kept = valid & (H >= threshold)
    old = tl.load(flags_ptr + pos, mask=kept, other=0)
    tl.store(flags_ptr + pos, old | FLAG_KEPT, mask=kept)


def token_flags(config, logp, entropy, advantages, cu, mask, T):
    """Op 4's batch-wide token selections (docs/spec.md, op 4) as uint8 flags per flat
    position of ``logp``, or None when the config makes none: FLAG_KL_COV marks KL-Cov's
    penalised tokens, FLAG_KEPT those top_entropy_quantile keeps. The positions are split as
    the loss kernel splits them: [cu[i], cu[i + 1]) (``mask`` then flat or None) or, with cu
    None, rows of T with ``mask``. On the kernels, no host sync."""
    if not config.selects_tokens:
        return None
    R, dev = logp.numel(), logp.device
    flags = torch.empty(R, dtype=torch.uint8, device=dev)
    B = advantages.numel()
    if not (R and B):
        return flags.zero_()
    kl_cov, top_entropy = config.objective == "kl_cov", config.top_entropy_quantile < 1.0
    P = triton.cdiv(R, BLOCK_POS)
    counts = torch.empty(2 * P, dtype=torch.int32, device=dev)
    sums = torch.empty(2 * P if kl_cov else 0, dtype=torch.float64, device=dev)
    keys = torch.empty(R if top_entropy else 0, dtype=torch.float32, device=dev)
    logp, entropy, mask = flat(logp), flat(entropy), flat(mask)
    advantages = advantages.contiguous()
    padded = cu is None
    layout = (flags if padded else cu, flags if mask is None else mask)
    switches = dict(PADDED=padded, HAS_MASK=mask is not None)
    steps = 0 if padded else max(B, 1).bit_length()  # binary search steps over B ends
    T = max(T, 1)
    launch(_selection_pass_kernel, (P,), logp, flags if entropy is None else entropy, advantages,
           *layout, flags, keys if top_entropy else flags, counts, sums if kl_cov else counts,
           R, T, B, steps, **switches, KL_COV=kl_cov, TOP_ENTROPY=top_entropy, BLOCK=BLOCK_POS)
    if kl_cov:
        cov_keys = torch.empty(R, dtype=torch.float32, device=dev)
        launch(_covariance_keys_kernel, (P,), logp, advantages, *layout, counts, sums, cov_keys,
               R, T, B, P, steps, **switches, BLOCK=BLOCK_POS, BLOCK_P=BLOCK_PART)
        order = torch.sort(cov_keys, stable=True).indices
        launch(_covariance_take_kernel, (P,), order, counts, flags, R, P,
               _float64_bits(config.kl_cov_ratio), BLOCK=BLOCK_POS, BLOCK_P=BLOCK_PART)
    if top_entropy:
        ordered = torch.sort(keys).values  # the loss tokens' entropies first (NaN after +inf)
        launch(_entropy_kept_kernel, (P,), entropy, ordered, *layout, counts, flags, R, B, P,
               1.0 - config.top_entropy_quantile, **switches, BLOCK=BLOCK_POS,
               BLOCK_P=BLOCK_PART)
    return flags


def _float64_bits(share: float) -> int:
    """The bits of a share in (0, 1] as an int64 (>= 2^52, so that Triton types it int64): a
    subnormal share is raised to the least normal double, which gives floor(n share) = 0 as
    it does, for any count n."""
    return struct.unpack("<q", struct.pack("<d", max(float(share), sys.float_info.min)))[0]


def entropy_selection(entropy, valid, keep):
    """The ``valid`` positions (flat bool) whose entropy is at least the (1 - keep)-quantile of
    theirs, interpolated linearly as torch.quantile does (in float32; NaN among them: none);
    uint8, no host sync on the kernels (the reference elsewhere)."""
    H = entropy.detach().reshape(-1)
    valid = valid.reshape(-1)
    if keep == 1.0:  # every token (NaN entropies included, as no selection at all)
        return valid.to(torch.uint8)
    if not use_triton(H):
        kept = torch.zeros_like(valid)
        kept[valid] = _reference_selection(H[valid], keep)
        return kept.to(torch.uint8)
    from ..config import LossConfig
    # the positions as one padded row (B = 1); only KL-Cov reads the advantages, so any one
    # value stands for them (a view: no launch)
    flags = token_flags(LossConfig(top_entropy_quantile=keep), H, H, H[:1], None, valid,
                        H.numel())
    return ((flags & FLAG_KEPT.value) != 0).to(torch.uint8)
