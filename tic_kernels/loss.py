"""Op 4 on per-token log-probabilities: the clipped ratio loss and its statistics.

Per token d_t = logp_t - logp_old_t (fp32), per sequence Delta_i = sum_t d_t. The ratio is
exp(Delta_i) ("trajectory", TIC-GRPO), exp(Delta_i / L_i) ("sequence_mean", GSPO), exp(d_t)
("token", GRPO/DAPO) or absent ("none": J = A_i logp_t). The log-ratio is capped to
[-max_log_ratio, max_log_ratio] before exp (gradient 0 beyond), then clipped:
J = min(x A, clip(x) A) [max(J, c A) for A < 0 with dual_clip=c], minus beta * k3-KL, and the
loss is -aggregate(J). See docs/spec.md, op 4, for the gradient of every mode.

Kernel: one program per sequence makes two passes over its tokens (O(N) floats in all, next to
the (N, V) logits). Pass 1 sums Delta_i, L_i and the statistics' sums; pass 2 evaluates the
clipped objective and writes each token's loss gradient coefficient c_t, so the backward is
dL/dlogp_t = c_t * norm * grad_loss with no further kernel. The aggregation weight of a token
is norm * v_i with v_i = 1/L_i (seq-mean-token-mean) or 1, and norm = 1/B', 1/N_tok or
1/(B' max_len) is applied once the per-sequence partial sums are reduced in a fixed order
(bitwise reproducible, no atomics, no host sync).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import reference
from . import validation as check
from .backend import (BLOCK_TOKENS, as_f32, grads_by_name, inputs_by_name, launch, segment_bounds,
                      segments, triton_op, use_triton)
from .options import AGGREGATIONS, RATIOS, default_aggregation
from .output import LossOutput

BLOCK_SEQS = 1024

# The kernels' switches by name: a mode's code is its position in options.RATIOS /
# AGGREGATIONS (the strings users pass).
RATIO_CODE = {r: i for i, r in enumerate(RATIOS)}
TRAJECTORY, SEQUENCE_MEAN, TOKEN, NO_RATIO = (
    tl.constexpr(RATIO_CODE[r]) for r in ("trajectory", "sequence_mean", "token", "none"))
AGG_CODE = {a: i for i, a in enumerate(AGGREGATIONS)}
TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM_NORM = (
    tl.constexpr(AGG_CODE[a]) for a in ("token-mean", "seq-mean-token-sum-norm"))

# The sampler correction (op 4b): none, a weight per token or per sequence from the sampler's
# log-probs, or weights given per token.
ROLLOUT_CODE = {None: 0, "token": 1, "sequence": 2, "weights": 3}
RW_TOKEN, RW_SEQUENCE, RW_GIVEN = (tl.constexpr(ROLLOUT_CODE[k])
                                   for k in ("token", "sequence", "weights"))

# Columns of the per-sequence partial sums that the loss kernel writes and the finalize kernel
# reduces: the objective, the entropy bonus's objective, the length, then the statistics' sums
# (the sampler correction's last: over its units, the weights' sum, sum of squares relative to
# their max, max, min and count of zeros; its k3 sum and the count of tokens with a sampler
# log-prob).
(COL_OBJ, COL_ENT_OBJ, COL_LEN, COL_CLIPPED, COL_RATIO_SUM, COL_RATIO_MAX, COL_DELTA_ABS,
 COL_CAPPED, COL_LOGP, COL_KL, COL_ENT, COL_RW_SUM, COL_RW_SQ, COL_RW_MAX, COL_RW_MIN,
 COL_RW_ZERO, COL_RKL, COL_RVALID) = (tl.constexpr(i) for i in range(18))
NPART = tl.constexpr(18)

# The statistics, in the order of the stats tensor the finalize kernel writes.
STAT_KEYS = ("clip_fraction", "ratio_mean", "ratio_max", "cap_fraction", "delta_abs_mean",
             "logp_mean", "entropy_mean", "kl_mean", "rollout_is_mean", "rollout_is_max",
             "rollout_is_min", "rollout_masked_fraction", "rollout_ess", "rollout_kl")
(STAT_CLIP, STAT_RATIO_MEAN, STAT_RATIO_MAX, STAT_CAP, STAT_DELTA_ABS, STAT_LOGP, STAT_ENT,
 STAT_KL, STAT_RW_MEAN, STAT_RW_MAX, STAT_RW_MIN, STAT_RW_ZERO, STAT_RW_ESS,
 STAT_RKL) = (tl.constexpr(i) for i in range(len(STAT_KEYS)))


@triton.jit
def _clamp(x, lo, hi):
    """min(max(x, lo), hi) that keeps NaN: plain tl.minimum / tl.maximum compile to PTX min /
    max, which drop a NaN operand, and the NaN rule would be lost on the GPU."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clipped_objective(x, A, eps_low, eps_high, dual_clip, TWO_SIDED: tl.constexpr,
                       DUAL: tl.constexpr):
    """(J, dJ/dx, clipped) for ratio x and advantage A: scalars or blocks alike."""
    hi = 1.0 + eps_high
    if TWO_SIDED:
        xc = _clamp(x, 1.0 - eps_low, hi)
    else:
        xc = tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)
    unclipped = x * A
    constant = xc * A
    take = unclipped <= constant  # ties (x inside the band) pass the gradient A
    J = tl.where(take, unclipped, constant)
    dJ = tl.where(take, A, 0.0)
    clipped = (~take).to(tl.float32)
    if DUAL:
        floor = dual_clip * A
        # (A < 0) and (J < floor), as arithmetic: `&` of two scalar compares fails in the
        # interpreter
        lift = ((A < 0).to(tl.float32) * (J < floor).to(tl.float32)) > 0
        J = tl.where(lift, floor, J)
        dJ = tl.where(lift, 0.0, dJ)
        clipped = tl.where(lift, 1.0, clipped)
    return J, dJ, clipped


@triton.jit
def _capped_exp(log_ratio, cap):
    """(exp(clamp(log_ratio)), 1.0 where the cap is not hit else 0.0)."""
    inside = tl.abs(log_ratio) <= cap
    return tl.exp(_clamp(log_ratio, -cap, cap)), inside.to(tl.float32)


@triton.jit
def _rollout_weight(log_w, lo, hi, cap, MASK: tl.constexpr):
    """exp of the capped log-weight, truncated to [lo, hi] or zeroed outside it (MASK)."""
    w = tl.exp(_clamp(log_w, -cap, cap))
    if MASK:
        # an arithmetic `or`: `|` of two scalar compares fails in the interpreter
        outside = ((w > hi).to(tl.float32) + (w < lo).to(tl.float32)) > 0
        return tl.where(outside, 0.0, w)
    return _clamp(w, lo, hi)


@triton.jit
def _token_rollout(roll_ptr, old, idx, keep, lo, hi, cap, ROLLOUT: tl.constexpr,
                   MASK: tl.constexpr):
    """(u_t = old_t - rollout_t with NaN -> 0, 1.0 where the sampler's log-prob is a number,
    the token's weight (RW_TOKEN and RW_GIVEN; else 1)) over a block of tokens."""
    r = tl.load(roll_ptr + idx, mask=keep, other=0.0).to(tl.float32)
    if ROLLOUT == RW_GIVEN:
        return r * 0.0, r * 0.0 + 1.0, r
    u = old - r
    valid = u == u
    u = tl.where(valid, u, 0.0)
    w = u * 0.0 + 1.0
    if ROLLOUT == RW_TOKEN:
        w = _rollout_weight(u, lo, hi, cap, MASK)
    return u, valid.to(tl.float32), w


@triton.jit
def _ratio_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, ent_ptr, adv_ptr, cu_ptr, mask_ptr, roll_ptr,
    coef_ptr, coef_ent_ptr, part_ptr, N,
    eps_low, eps_high, dual_clip, cap, beta, rw_lo, rw_hi,
    RATIO: tl.constexpr, TWO_SIDED: tl.constexpr, DUAL: tl.constexpr, PER_SEQ_MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, KL_IN_LOSS: tl.constexpr,
    HAS_ENT: tl.constexpr, ROLLOUT: tl.constexpr, RW_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    eps_low, eps_high, dual_clip = as_f32(eps_low), as_f32(eps_high), as_f32(dual_clip)
    cap, beta, rw_lo, rw_hi = as_f32(cap), as_f32(beta), as_f32(rw_lo), as_f32(rw_hi)
    i = tl.program_id(0)
    start, end = segment_bounds(cu_ptr, i, N)
    A = tl.load(adv_ptr + i).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)

    # pass 1: Delta_i, L_i and the sums of the statistics
    delta, count, logp_sum, kl_sum, ent_sum = zero, zero, zero, zero, zero
    u_sum, w_sum, w_zero, rkl_sum, r_valid = zero, zero, zero, zero, zero
    w_min = zero + float("inf")
    # the weights' max and their sum of squares relative to it (rescaled as the max grows, so
    # that weights of 1e20 or 1e-25 do not overflow or vanish when squared)
    w_max = 0.0
    w_sq = 0.0
    for off in range(start, end, BLOCK):
        idx = off + cols
        keep = idx < end
        if HAS_MASK:
            keep &= tl.load(mask_ptr + idx, mask=keep, other=0) != 0
        lp = tl.load(logp_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        delta += lp - old  # the per-token difference, reduced in fp32 (never two sums)
        count += keep.to(tl.float32)
        logp_sum += lp
        if HAS_REF:
            u = tl.load(ref_ptr + idx, mask=keep, other=0.0).to(tl.float32) - lp
            uc = _clamp(u, -cap, cap)
            kl_sum += tl.where(keep, tl.exp(uc) - uc - 1.0, 0.0)
        if HAS_ENT:
            ent_sum += tl.load(ent_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        if ROLLOUT != 0:
            u, valid, w = _token_rollout(roll_ptr, old, idx, keep, rw_lo, rw_hi, cap, ROLLOUT,
                                         RW_MASK)
            if ROLLOUT != RW_GIVEN:  # k3 of the sampler against the old policy
                valid = tl.where(keep, valid, 0.0)
                uc = _clamp(u, -cap, cap)
                rkl_sum += valid * (tl.exp(-uc) + uc - 1.0)
                r_valid += valid
            u_sum += tl.where(keep, u, 0.0)
            w = tl.where(keep, w, 0.0)
            w_sum += w
            m_new = tl.maximum(w_max, tl.max(w, 0))
            inv = 1.0 / tl.where(m_new > 0, m_new, 1.0)
            w_sq = w_sq * (w_max * inv) * (w_max * inv) + tl.sum((w * inv) * (w * inv), 0)
            w_max = m_new
            w_min = tl.minimum(w_min, tl.where(keep, w, float("inf")))
            w_zero += (keep & (w == 0)).to(tl.float32)
    Delta = tl.sum(delta, 0)
    L = tl.sum(count, 0)
    nonempty = L > 0
    v = 1.0 / tl.maximum(L, 1.0) if PER_SEQ_MEAN else 1.0
    unit = nonempty.to(tl.float32)

    # the sampler correction: the weights' sum over the tokens, the sequence's weight, stats
    W_seq = 1.0
    S_w = L
    if ROLLOUT == RW_SEQUENCE:
        W_seq = _rollout_weight(tl.sum(u_sum, 0), rw_lo, rw_hi, cap, RW_MASK)
        S_w = L * W_seq
        rw_sum, rw_sq, rw_max = W_seq * unit, (W_seq > 0).to(tl.float32) * unit, W_seq * unit
        rw_min = tl.where(nonempty, W_seq, float("inf"))
        rw_zero = (W_seq == 0).to(tl.float32) * unit
    else:
        rw_sum, rw_sq, rw_max = tl.sum(w_sum, 0), w_sq, w_max
        rw_min, rw_zero = tl.min(w_min, 0), tl.sum(w_zero, 0)
        if ROLLOUT != 0:
            S_w = rw_sum

    obj = 0.0
    clipped_units = 0.0
    ratio_sum = 0.0
    ratio_max = 0.0
    capped_any = 0.0
    g_seq = 0.0
    J_seq = 0.0
    if RATIO == TRAJECTORY or RATIO == SEQUENCE_MEAN:  # one ratio per sequence
        log_ratio = Delta if RATIO == TRAJECTORY else Delta / tl.maximum(L, 1.0)
        x, chi = _capped_exp(log_ratio, cap)
        J_seq, dJ, clipped = _clipped_objective(x, A, eps_low, eps_high, dual_clip, TWO_SIDED,
                                                DUAL)
        # an empty sequence adds nothing, not NaN; S_w = L without a sampler correction, else
        # the sum of the tokens' weights
        obj = tl.where(nonempty, v * S_w * J_seq, 0.0)
        # dL/dlogp_t / norm = -W_i dJ/dx x chi (/ L_i for GSPO), W_i / norm = v S_w
        g_seq = -v * S_w * dJ * x * chi
        if RATIO == SEQUENCE_MEAN:
            g_seq = g_seq / tl.maximum(L, 1.0)
        clipped_units = clipped * unit
        ratio_sum = x * unit
        ratio_max = x * unit
        capped_any = (1.0 - chi) * unit

    # pass 2: per-token objective and gradient coefficient
    obj_acc, ent_obj_acc = zero, zero
    clip_acc, rsum_acc, rmax_acc, cap_acc = zero, zero, zero, zero
    for off in range(start, end, BLOCK):
        idx = off + cols
        inside = idx < end
        keep = inside
        if HAS_MASK:
            keep &= tl.load(mask_ptr + idx, mask=inside, other=0) != 0
        lp = tl.load(logp_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        c = zero + g_seq
        J_tok = zero + J_seq  # the token's objective, to apply the NaN rule below
        wt = zero + W_seq  # the token's sampler weight (the token-level ratios read it)
        if RATIO == TOKEN or RATIO == NO_RATIO:
            old = lp  # read only by the token ratio and the sampler's token weights
            if RATIO == TOKEN or ROLLOUT == RW_TOKEN:
                old = tl.load(old_ptr + idx, mask=keep, other=0.0).to(tl.float32)
            if ROLLOUT == RW_TOKEN or ROLLOUT == RW_GIVEN:
                _u, _valid, wt = _token_rollout(roll_ptr, old, idx, keep, rw_lo, rw_hi, cap,
                                                ROLLOUT, RW_MASK)
        if RATIO == TOKEN:
            x, chi = _capped_exp(lp - old, cap)
            J_tok, dJ, clipped = _clipped_objective(x, A, eps_low, eps_high, dual_clip,
                                                    TWO_SIDED, DUAL)
            obj_acc += tl.where(keep, v * wt * J_tok, 0.0)
            c = -v * wt * dJ * x * chi
            k = keep.to(tl.float32)
            clip_acc += clipped * k
            rsum_acc += x * k
            rmax_acc = tl.maximum(rmax_acc, x * k)
            cap_acc = tl.maximum(cap_acc, (1.0 - chi) * k)
        elif RATIO == NO_RATIO:
            J_tok = A * lp
            obj_acc += tl.where(keep, v * wt * J_tok, 0.0)
            c = -v * wt * A
        if KL_IN_LOSS:
            u = tl.load(ref_ptr + idx, mask=keep, other=0.0).to(tl.float32) - lp
            uc = _clamp(u, -cap, cap)
            kl = tl.exp(uc) - uc - 1.0
            J_tok -= beta * kl
            obj_acc -= tl.where(keep, v * beta * kl, 0.0)
            c += v * beta * (1.0 - tl.exp(uc)) * (tl.abs(u) <= cap).to(tl.float32)
        # The NaN rule: a token whose objective is NaN gets a NaN gradient coefficient (for the
        # sequence ratios, every token of the sequence), whichever branch NaN fell through.
        c = tl.where(J_tok != J_tok, float("nan"), c)
        tl.store(coef_ptr + idx, tl.where(keep, c, 0.0), mask=inside)
        if HAS_ENT:
            H = tl.load(ent_ptr + idx, mask=keep, other=0.0).to(tl.float32)
            ent_obj_acc += v * H
            tl.store(coef_ent_ptr + idx, tl.where(keep, -v, 0.0), mask=inside)

    if RATIO == TOKEN:
        clipped_units = tl.sum(clip_acc, 0)
        ratio_sum = tl.sum(rsum_acc, 0)
        ratio_max = tl.max(rmax_acc, 0)
        capped_any = tl.max(cap_acc, 0)
    row = part_ptr + i * NPART
    tl.store(row + COL_OBJ, obj + tl.sum(obj_acc, 0))
    tl.store(row + COL_ENT_OBJ, tl.sum(ent_obj_acc, 0))
    tl.store(row + COL_LEN, L)
    tl.store(row + COL_CLIPPED, clipped_units)
    tl.store(row + COL_RATIO_SUM, ratio_sum)
    tl.store(row + COL_RATIO_MAX, ratio_max)
    tl.store(row + COL_DELTA_ABS, tl.abs(Delta) * nonempty.to(tl.float32))
    tl.store(row + COL_CAPPED, capped_any)
    tl.store(row + COL_LOGP, tl.sum(logp_sum, 0))
    tl.store(row + COL_KL, tl.sum(kl_sum, 0))
    tl.store(row + COL_ENT, tl.sum(ent_sum, 0))
    tl.store(row + COL_RW_SUM, rw_sum)
    tl.store(row + COL_RW_SQ, rw_sq)
    tl.store(row + COL_RW_MAX, rw_max)
    tl.store(row + COL_RW_MIN, rw_min)
    tl.store(row + COL_RW_ZERO, rw_zero)
    tl.store(row + COL_RKL, tl.sum(rkl_sum, 0))
    tl.store(row + COL_RVALID, tl.sum(r_valid, 0))


@triton.jit
def _column(part_ptr, rows, keep, COL: tl.constexpr, other):
    return tl.load(part_ptr + rows * NPART + COL, mask=keep, other=other)


@triton.jit
def _column_sum(part_ptr, rows, keep, COL: tl.constexpr):
    return tl.sum(_column(part_ptr, rows, keep, COL, 0.0), 0)


@triton.jit
def _ratio_loss_finalize_kernel(
    part_ptr, loss_ptr, stats_ptr, norm_ptr, B,
    num_tokens, num_sequences, max_len, entropy_coef,
    RATIO: tl.constexpr, AGG: tl.constexpr, GIVEN_TOKENS: tl.constexpr,
    GIVEN_SEQUENCES: tl.constexpr, RW_PER_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program reduces the (B, NPART) partial sums in a fixed order (bitwise
    reproducible) into the loss, its normaliser and the statistics: one launch, no host
    value, so the loss can be captured in a CUDA graph."""
    num_tokens, num_sequences = as_f32(num_tokens), as_f32(num_sequences)
    max_len, entropy_coef = as_f32(max_len), as_f32(entropy_coef)
    cols = tl.arange(0, BLOCK)
    obj, ent_obj, n_tok, n_seq, clipped, rsum, delta_abs, capped, logp, kl, ent = (
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    rmax = 0.0
    w_sum, w_zero, rkl, r_valid, w_max, w_min = 0.0, 0.0, 0.0, 0.0, 0.0, float("inf")
    for off in range(0, B, BLOCK):
        rows = off + cols
        keep = rows < B
        L = tl.load(part_ptr + rows * NPART + COL_LEN, mask=keep, other=0.0)
        n_tok += tl.sum(L, 0)
        n_seq += tl.sum((L > 0).to(tl.float32), 0)
        obj += _column_sum(part_ptr, rows, keep, COL_OBJ)
        ent_obj += _column_sum(part_ptr, rows, keep, COL_ENT_OBJ)
        clipped += _column_sum(part_ptr, rows, keep, COL_CLIPPED)
        rsum += _column_sum(part_ptr, rows, keep, COL_RATIO_SUM)
        delta_abs += _column_sum(part_ptr, rows, keep, COL_DELTA_ABS)
        capped += _column_sum(part_ptr, rows, keep, COL_CAPPED)
        logp += _column_sum(part_ptr, rows, keep, COL_LOGP)
        kl += _column_sum(part_ptr, rows, keep, COL_KL)
        ent += _column_sum(part_ptr, rows, keep, COL_ENT)
        rmax = tl.maximum(rmax, tl.max(_column(part_ptr, rows, keep, COL_RATIO_MAX, 0.0), 0))
        w_sum += _column_sum(part_ptr, rows, keep, COL_RW_SUM)
        w_zero += _column_sum(part_ptr, rows, keep, COL_RW_ZERO)
        rkl += _column_sum(part_ptr, rows, keep, COL_RKL)
        r_valid += _column_sum(part_ptr, rows, keep, COL_RVALID)
        w_max = tl.maximum(w_max, tl.max(_column(part_ptr, rows, keep, COL_RW_MAX, 0.0), 0))
        w_min = tl.minimum(w_min,
                           tl.min(_column(part_ptr, rows, keep, COL_RW_MIN, float("inf")), 0))
    B_eff = tl.maximum(num_sequences if GIVEN_SEQUENCES else n_seq, 1.0)
    N_eff = tl.maximum(num_tokens if GIVEN_TOKENS else n_tok, 1.0)
    if AGG == TOKEN_MEAN:
        norm = 1.0 / N_eff
    elif AGG == SEQ_MEAN_TOKEN_SUM_NORM:
        norm = 1.0 / (B_eff * max_len)
    else:
        norm = 1.0 / B_eff
    tl.store(loss_ptr, -norm * (obj + entropy_coef * ent_obj))
    tl.store(norm_ptr, norm)
    seqs = tl.maximum(n_seq, 1.0)
    toks = tl.maximum(n_tok, 1.0)
    if RATIO == NO_RATIO:
        tl.store(stats_ptr + STAT_CLIP, 0.0)
        tl.store(stats_ptr + STAT_RATIO_MEAN, 1.0)
        tl.store(stats_ptr + STAT_RATIO_MAX, 1.0)
        tl.store(stats_ptr + STAT_CAP, 0.0)
    else:
        units = toks if RATIO == TOKEN else seqs
        tl.store(stats_ptr + STAT_CLIP, clipped / units)
        tl.store(stats_ptr + STAT_RATIO_MEAN, rsum / units)
        tl.store(stats_ptr + STAT_RATIO_MAX, rmax)
        tl.store(stats_ptr + STAT_CAP, capped / seqs)
    tl.store(stats_ptr + STAT_DELTA_ABS, delta_abs / seqs)
    tl.store(stats_ptr + STAT_LOGP, logp / toks)
    tl.store(stats_ptr + STAT_ENT, ent / toks)
    tl.store(stats_ptr + STAT_KL, kl / toks)
    # the sampler correction's units: the non-empty sequences, or the tokens
    rw_units = n_seq if RW_PER_SEQ else n_tok
    tl.store(stats_ptr + STAT_RW_MEAN, w_sum / tl.maximum(rw_units, 1.0))
    tl.store(stats_ptr + STAT_RW_MAX, w_max)
    tl.store(stats_ptr + STAT_RW_MIN, tl.where(rw_units > 0, w_min, 0.0))
    tl.store(stats_ptr + STAT_RW_ZERO, w_zero / tl.maximum(rw_units, 1.0))
    # ESS of the weights relative to their max M: (sum w / M)^2 / (n sum (w / M)^2), the rows
    # holding their sum of squares relative to their own max
    inv_max = 1.0 / tl.where(w_max > 0, w_max, 1.0)
    w_sq = 0.0
    for off in range(0, B, BLOCK):
        rows = off + cols
        keep = rows < B
        r = _column(part_ptr, rows, keep, COL_RW_MAX, 0.0) * inv_max
        w_sq += tl.sum(_column(part_ptr, rows, keep, COL_RW_SQ, 0.0) * r * r, 0)
    s = w_sum * inv_max
    ess_den = tl.where(w_sq > 0, rw_units * w_sq, 1.0)  # all weights 0 (or none): ESS 0
    tl.store(stats_ptr + STAT_RW_ESS, tl.where(w_sq > 0, s * s / ess_den, 0.0))
    tl.store(stats_ptr + STAT_RKL, rkl / tl.maximum(r_valid, 1.0))


class Rollout(NamedTuple):
    """Op 4b as the kernels take it: ``mode`` "" (no correction), "weights" (``tensor`` holds
    the weights) or one of options.ROLLOUT_IS (``tensor`` holds the sampler's log-probs);
    ``lo``, ``hi`` the bounds on the weight."""
    tensor: Optional[torch.Tensor] = None
    mode: str = ""
    lo: float = 0.0
    hi: float = math.inf

    @staticmethod
    def of(rollout_logprobs=None, rollout_weights=None, rollout_is=None, rollout_is_max=None,
           rollout_is_min=None):
        """From the public keywords, as validation.rollout_options returns them."""
        if rollout_weights is not None:
            return Rollout(rollout_weights, "weights")
        if rollout_logprobs is None:
            return Rollout()
        return Rollout(rollout_logprobs, rollout_is,
                       0.0 if rollout_is_min is None else float(rollout_is_min),
                       math.inf if rollout_is_max is None else float(rollout_is_max))

    @staticmethod
    def from_options(options):
        """From a dict of checked keywords that may hold op 4b's among others."""
        return Rollout.of(**{k: v for k, v in options.items() if k.startswith("rollout_")})

    def per_sequence(self) -> bool:
        return self.mode.startswith("sequence")

    def code(self) -> int:
        if self.mode in ("", "weights"):
            return ROLLOUT_CODE[self.mode or None]
        return ROLLOUT_CODE["sequence" if self.per_sequence() else "token"]


def launch_ratio_fwd(logp, old, ref, entropy, advantages, cu, mask, coef, coef_ent, part, *,
                     ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                     beta, rollout=Rollout()):
    """The per-sequence pass over the B = cu.numel() - 1 sequences of ``cu`` (row offsets into
    the flat per-token tensors, which are indexed globally): writes their tokens' coef and
    coef_ent and their rows of ``part`` (B, NPART). The fused LM head runs it on a slice of
    the sequences at a time. Optional inputs may be None; ``rollout`` a Rollout over the same
    flat positions."""
    B = cu.numel() - 1
    if B:
        launch(_ratio_loss_fwd_kernel, (B,),
            logp, old, logp if ref is None else ref, logp if entropy is None else entropy,
            advantages, cu, logp if mask is None else mask,
            logp if rollout.tensor is None else rollout.tensor, coef, coef_ent, part,
            logp.numel(), eps_low, eps_high, 0.0 if dual_clip is None else dual_clip,
            max_log_ratio, beta, rollout.lo, rollout.hi,
            RATIO=RATIO_CODE[ratio], TWO_SIDED=clip_mode == "two_sided",
            DUAL=dual_clip is not None, PER_SEQ_MEAN=aggregation == "seq-mean-token-mean",
            HAS_MASK=mask is not None, HAS_REF=ref is not None, KL_IN_LOSS=beta > 0,
            HAS_ENT=entropy is not None, ROLLOUT=rollout.code(),
            RW_MASK=rollout.mode.endswith("_mask"), BLOCK=BLOCK_TOKENS)


def launch_finalize(part, loss, stats, norm, *, ratio, aggregation, entropy_coef, num_tokens,
                    num_sequences, max_len, rollout=Rollout()):
    """Reduces ``part`` (B, NPART) into loss (), stats (len(STAT_KEYS),) and norm ()."""
    launch(_ratio_loss_finalize_kernel, (1,),
        part, loss, stats, norm, part.shape[0], 0.0 if num_tokens is None else num_tokens,
        0.0 if num_sequences is None else num_sequences, 1.0 if max_len is None else max_len,
        entropy_coef, RATIO=RATIO_CODE[ratio], AGG=AGG_CODE[aggregation],
        GIVEN_TOKENS=num_tokens is not None, GIVEN_SEQUENCES=num_sequences is not None,
        RW_PER_SEQ=rollout.per_sequence(), BLOCK=BLOCK_SEQS)


def new_partials(B, device):
    """Buffers of the loss's reduction: part (B, NPART), loss (), stats (len(STAT_KEYS),),
    norm ()."""
    def f32(*shape):
        return torch.empty(*shape, dtype=torch.float32, device=device)
    return f32(B, NPART.value), f32(()), f32(len(STAT_KEYS)), f32(())


@triton_op("tic_kernels::ratio_loss", mutates_args=())
def ratio_loss(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, cu: torch.Tensor,
               mask: Optional[torch.Tensor], ref: Optional[torch.Tensor],
               entropy: Optional[torch.Tensor], ratio: str, clip_mode: str, eps_low: float,
               eps_high: float, dual_clip: Optional[float], max_log_ratio: float,
               aggregation: str, beta: float, entropy_coef: float, num_tokens: Optional[float],
               num_sequences: Optional[float], max_len: Optional[float],
               rollout: Optional[torch.Tensor], rollout_mode: str, rollout_lo: float,
               rollout_hi: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (len(STAT_KEYS),), coef (R,), coef_entropy (R,) or (0,), norm) over flat
    per-token tensors of R positions split by the segments (cu, mask), with the sampler
    correction Rollout(rollout, rollout_mode, rollout_lo, rollout_hi); see the module
    docstring."""
    R, B = logp.numel(), cu.numel() - 1
    dev = logp.device
    coef = torch.empty(R, dtype=torch.float32, device=dev)
    coef_ent = torch.empty(R if entropy is not None else 0, dtype=torch.float32, device=dev)
    part, loss, stats, norm = new_partials(B, dev)

    def flat(t):  # the kernel reads flat positions and per-sequence entries by index
        return None if t is None else t.reshape(-1).contiguous()
    correction = Rollout(flat(rollout), rollout_mode, rollout_lo, rollout_hi)
    launch_ratio_fwd(flat(logp), flat(old), flat(ref), flat(entropy), advantages.contiguous(),
                     cu.contiguous(), flat(mask), coef, coef_ent, part, ratio=ratio,
                     clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high,
                     dual_clip=dual_clip, max_log_ratio=max_log_ratio, aggregation=aggregation,
                     beta=beta, rollout=correction)
    launch_finalize(part, loss, stats, norm, ratio=ratio, aggregation=aggregation,
                    entropy_coef=entropy_coef, num_tokens=num_tokens,
                    num_sequences=num_sequences, max_len=max_len, rollout=correction)
    return loss, stats, coef, coef_ent, norm


def scaled_coefficients(g_loss, norm, coef, coef_ent, entropy_coef, with_entropy):
    """(dL/dlogp, dL/dentropy or None) from the loss kernel's per-token coefficients: the
    backward of the loss, shared by ratio_loss and the fused logits-to-loss node."""
    scale = g_loss * norm
    return coef * scale, (coef_ent * (entropy_coef * scale) if with_entropy else None)


def _setup_context(ctx, inputs, output):
    args = inputs_by_name(ratio_loss, inputs)
    _, _, coef, coef_ent, norm = output
    ctx.save_for_backward(coef, coef_ent, norm)
    ctx.entropy_coef, ctx.with_entropy = args["entropy_coef"], args["entropy"] is not None


@reference.first_order_only
def _backward(ctx, g_loss, *_unused):
    coef, coef_ent, norm = ctx.saved_tensors
    g_logp, g_entropy = scaled_coefficients(g_loss, norm, coef, coef_ent, ctx.entropy_coef,
                                            ctx.with_entropy)
    return grads_by_name(ratio_loss, logp=g_logp, entropy=g_entropy)


ratio_loss.register_autograd(_backward, setup_context=_setup_context)


def stats_keys(has_entropy, has_ref, rollout_mode=""):
    """The statistics reported, in sorted order (entropy, KL and the sampler correction's only
    when computed; its k3 only from the sampler's log-probs)."""
    def reported(k):
        if k.startswith("rollout_"):
            return rollout_mode != "" and (k != "rollout_kl" or rollout_mode != "weights")
        return (k != "entropy_mean" or has_entropy) and (k != "kl_mean" or has_ref)
    return sorted(k for k in STAT_KEYS if reported(k))


def stats_dict(stats, has_entropy, has_ref, rollout_mode=""):
    """The statistics reported, by name, detached (the loss op's stats output is a function
    of logp to autograd, though never differentiated)."""
    stats = stats.detach()
    return {k: stats[STAT_KEYS.index(k)] for k in stats_keys(has_entropy, has_ref, rollout_mode)}


def loss_on_segments(logp, old, advantages, cu_seqlens, mask, ref_logprobs, entropy, *,
                     ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                     beta, entropy_coef, num_tokens, num_sequences, max_len, **rollout):
    """Runs the ratio_loss op on either layout (``rollout``: op 4b's keywords); returns
    (loss, stats (len(STAT_KEYS),), coef, coef_ent, norm) (stats_dict names the
    statistics)."""
    aggregation = aggregation or default_aggregation(ratio)
    if mask is not None and max_len is None:
        max_len = mask.shape[1]
    cu, flat_mask = segments(cu_seqlens, mask, logp.device)

    def flat(t):
        return None if t is None else t.reshape(-1)
    correction = Rollout.of(**rollout)
    loss, stats, coef, coef_ent, norm = ratio_loss(
        flat(logp), flat(old), advantages.detach().float(), cu, flat_mask,
        flat(ref_logprobs), flat(entropy), ratio, clip_mode, float(eps_low), float(eps_high),
        None if dual_clip is None else float(dual_clip), float(max_log_ratio), aggregation,
        float(beta), float(entropy_coef), None if num_tokens is None else float(num_tokens),
        None if num_sequences is None else float(num_sequences),
        None if max_len is None else float(max_len),
        None if correction.tensor is None else flat(correction.tensor.detach()),
        correction.mode, correction.lo, correction.hi)
    return loss, stats, coef, coef_ent, norm


def tic_loss_from_logprobs(logprobs, old_logprobs, advantages, *, cu_seqlens=None, mask=None,
                           ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                           dual_clip=None, max_log_ratio=20.0, aggregation=None,
                           ref_logprobs=None, beta=0.0, num_tokens=None, num_sequences=None,
                           max_len=None, rollout_logprobs=None, rollout_is=None,
                           rollout_is_max=None, rollout_is_min=None, rollout_weights=None):
    """The TIC-GRPO / GSPO / GRPO loss from log-probabilities the caller already has.

    Args:
        logprobs: per-token log-probabilities under the current policy, packed (N,) with
            ``cu_seqlens`` (B+1,) int32, or padded (B, T) with ``mask`` (B, T). Any float dtype.
        old_logprobs, ref_logprobs: the same shape, from the sampling and reference policies.
        advantages: (B,) per sequence.
        ratio: "trajectory" (default), "sequence_mean", "token" or "none".
        clip_mode: "two_sided" or "upper"; eps_low in [0, 1), eps_high >= 0; dual_clip > 1.
        max_log_ratio: cap on |log-ratio| (and on the KL's log-ratio) before exp.
        aggregation: None (the mode's default: "token-mean" for token, else
            "seq-mean-token-mean"), "token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (normaliser B * max_len; max_len defaults to T when padded).
        beta: weight of the k3 KL to ``ref_logprobs``, added per token inside the aggregation.
        num_tokens, num_sequences: global normalisers for gradient accumulation (token-mean and
            the seq-mean aggregations respectively); default: this batch's counts.
        rollout_logprobs: the log-probabilities of the engine that sampled the rollouts
            (vLLM, SGLang), laid out like old_logprobs, when they differ from old_logprobs
            (the trainer's recomputation): each token's policy objective is weighted by a
            detached correction (op 4b). NaN marks a token the sampler did not score (no
            correction for it). Needs ``rollout_is``:
            "token_truncate" / "token_mask": w_t = exp(old_t - rollout_t) per token,
            "sequence_truncate" / "sequence_mask": w_i = exp(sum_t (old_t - rollout_t)) for
            every token of sequence i (the trajectory ratio, as TRL's sequence modes);
            the log is capped at max_log_ratio, then "*_truncate" clamps w to
            [rollout_is_min, rollout_is_max] and "*_mask" sets it to 0 outside them
            (rollout_is_min None: no lower bound; rollout_is_max None: 3.0, the default of
            TRL's vllm_importance_sampling_clip_max; float("inf"): no upper bound, which TRL
            spells None).
        rollout_weights: instead of rollout_logprobs, the per-token weights precomputed (as
            verl's rollout_is_weights; finite, >= 0), used as given: rollout_is,
            rollout_is_max and rollout_is_min apply to rollout_logprobs only, and given with
            rollout_weights they raise a ValueError (never ignored).
            Either adds the statistics rollout_is_mean / _max / _min (of the weights applied,
            over tokens or, for the sequence modes, non-empty sequences),
            rollout_masked_fraction (weights 0), rollout_ess ((sum w)^2 / (n sum w^2)) and,
            from rollout_logprobs, rollout_kl (the mean k3 estimate of KL(old || sampler) over
            the tokens the sampler scored, its log-ratio capped at max_log_ratio like every
            other). The KL to ref_logprobs is not weighted.

    Returns:
        LossOutput(loss, stats): ``loss`` a float32 scalar, differentiable w.r.t. logprobs;
        ``stats`` a dict of float32 scalars (see LossOutput), computed without a host sync.
    """
    check.float_tensor("logprobs", logprobs)
    options = check.loss_options(ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio,
                                 aggregation, ref_logprobs, beta, num_tokens, num_sequences,
                                 max_len, mask is not None)
    correction = check.rollout_options(rollout_logprobs, rollout_is, rollout_is_max,
                                       rollout_is_min, rollout_weights)
    check.loss_inputs(logprobs, "logprobs", cu_seqlens, mask, old_logprobs, advantages,
                      ref_logprobs, ("logprobs", logprobs), max_len, correction)
    if not use_triton(logprobs):
        return reference.tic_loss_from_logprobs(logprobs, old_logprobs, advantages,
                                                cu_seqlens=cu_seqlens, mask=mask,
                                                ref_logprobs=ref_logprobs, **options,
                                                **correction)
    loss, stats, *_ = loss_on_segments(logprobs, old_logprobs, advantages, cu_seqlens, mask,
                                       ref_logprobs, None, entropy_coef=0.0, **options,
                                       **correction)
    return LossOutput(loss, stats_dict(stats, False, ref_logprobs is not None,
                                       Rollout.of(**correction).mode))
