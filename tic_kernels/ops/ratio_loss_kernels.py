"""Op 4's Triton kernels: the clipped ratio loss over per-token log-probabilities, one
program per sequence, the last of which to finish reduces the per-sequence partial sums
(or a second kernel does, when the forward kernel runs a slice of the sequences at a time).

The forward kernel makes two passes over a sequence's tokens (O(N) floats in all, next to the
(N, V) logits). Pass 1 sums Delta_i, L_i and the statistics' sums (and the sampler
correction's weights); pass 2 evaluates the objective (ops/ratio_objectives.py) and writes
each token's loss gradient coefficient c_t, so the backward is dL/dlogp_t = c_t * norm *
grad_loss, which the logits' backward kernel applies as it reads c_t. The aggregation weight of a token is
norm * v_i with v_i = 1/L_i (seq-mean-token-mean) or 1, and norm = 1/B', 1/N_tok or
1/(B' max_len) is set once the per-sequence partial sums are reduced, in a fixed order
whichever program does it (bitwise reproducible; the one atomic only counts the programs
that finished; no host sync). ops/ratio_loss.py launches them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..backend import as_f32, segment_bounds
from ..options import AGGREGATIONS
from .ratio_objectives import (FLAG_KEPT, GMPO, NO_RATIO, ROLLOUT_CODE, RW_GIVEN, RW_SEQUENCE,
                               RW_TOKEN, TOKEN, VESPO, _clamp, _rollout_weight,
                               _sequence_objective, _token_rollout, gmpo_log_ratio,
                               selection_flag, token_coefficient, vespo_sampler_log_weight,
                               vespo_weight)

BLOCK_SEQS = 1024

# The aggregation's switch by name: its position in options.AGGREGATIONS.
AGG_CODE = {a: i for i, a in enumerate(AGGREGATIONS)}
TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM_NORM = (
    tl.constexpr(AGG_CODE[a]) for a in ("token-mean", "seq-mean-token-sum-norm"))

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
def _sequence_sums(logp_ptr, old_ptr, ref_ptr, ent_ptr, mask_ptr, roll_ptr, sel_ptr, start, end,
                   cap, rw_lo, rw_hi, A, eps_low, eps_high, HAS_MASK: tl.constexpr,
                   HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, ROLLOUT: tl.constexpr,
                   RW_MASK: tl.constexpr, OBJECTIVE: tl.constexpr, TWO_SIDED: tl.constexpr,
                   OPSM: tl.constexpr, TOP_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over a sequence's tokens: Delta (the sum of logp - old), L, the sums of logp,
    the k3 KL and the entropy, and for the sampler correction the sum of u = old - sampler,
    the weights' sum, sum of squares relative to their max (rescaled as the max grows, so that
    weights of 1e20 or 1e-25 neither overflow nor vanish), max, min, count of zeros, and the
    sampler's k3 sum with the count of tokens it scored; the sum the objective forms its own
    sequence weight from (GMPO: the clipped log-ratios, with the count of clipped tokens;
    VESPO: the log-ratios capped at cap, plus the sampler's token log-weights in [log 1e-8,
    20]; else 0); for the off-policy mask (OPSM) the sum of sampler - logp (old - logp without
    the sampler's log-probs; a NaN difference counts 0); with TOP_ENTROPY the sum of the kept
    tokens' weights (their sampler weights per token, else 1)."""
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    delta, count, logp_sum, kl_sum, ent_sum = zero, zero, zero, zero, zero
    obj_sum, obj_clipped, drift, kept = zero, zero, zero, zero
    u_sum, w_sum, w_zero, rkl_sum, r_valid = zero, zero, zero, zero, zero
    w_min = zero + float("inf")
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
        if OBJECTIVE == GMPO:
            dc, clipped, _active = gmpo_log_ratio(lp - old, A, eps_low, eps_high, TWO_SIDED)
            obj_sum += tl.where(keep, dc, 0.0)
            obj_clipped += tl.where(keep, clipped, 0.0)
        if OBJECTIVE == VESPO:
            obj_sum += tl.where(keep, _clamp(lp - old, -cap, cap), 0.0)
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
            if OBJECTIVE == VESPO and ROLLOUT != RW_SEQUENCE:
                obj_sum += tl.where(keep, vespo_sampler_log_weight(w), 0.0)
            w = tl.where(keep, w, 0.0)
            w_sum += w
            m_new = tl.maximum(w_max, tl.max(w, 0))
            inv = 1.0 / tl.where(m_new > 0, m_new, 1.0)
            w_sq = w_sq * (w_max * inv) * (w_max * inv) + tl.sum((w * inv) * (w * inv), 0)
            w_max = m_new
            w_min = tl.minimum(w_min, tl.where(keep, w, float("inf")))
            w_zero += (keep & (w == 0)).to(tl.float32)
        if TOP_ENTROPY:
            m = selection_flag(sel_ptr, idx, keep, FLAG_KEPT)
            if ROLLOUT == RW_TOKEN or ROLLOUT == RW_GIVEN:
                m = m * w
            kept += m
        if OPSM:
            t = old - lp
            if ROLLOUT == RW_TOKEN or ROLLOUT == RW_SEQUENCE:  # sampler - lp, u = old - sampler
                t = tl.where(valid > 0, t - u, 0.0)
            drift += tl.where(keep & (t == t), t, 0.0)
    return (tl.sum(delta, 0), tl.sum(count, 0), tl.sum(logp_sum, 0), tl.sum(kl_sum, 0),
            tl.sum(ent_sum, 0), tl.sum(u_sum, 0), tl.sum(w_sum, 0), w_sq, w_max,
            tl.min(w_min, 0), tl.sum(w_zero, 0), tl.sum(rkl_sum, 0), tl.sum(r_valid, 0),
            tl.sum(obj_sum, 0), tl.sum(obj_clipped, 0), tl.sum(drift, 0), tl.sum(kept, 0))


@triton.jit
def _token_pass(logp_ptr, old_ptr, ref_ptr, ent_ptr, mask_ptr, roll_ptr, sel_ptr, coef_ptr,
                coef_ent_ptr, start, end, A, v, g_seq, J_seq, W_seq, keep_seq, xc_seq, x_seq,
                dx_seq, kl_seq, eps_low, eps_high, dual_clip, delta, param_pos, param_neg, cap,
                beta, rw_lo, rw_hi, RATIO: tl.constexpr, TWO_SIDED: tl.constexpr,
                DUAL: tl.constexpr, HAS_MASK: tl.constexpr, KL_IN_LOSS: tl.constexpr,
                HAS_ENT: tl.constexpr, ROLLOUT: tl.constexpr, RW_MASK: tl.constexpr,
                OBJECTIVE: tl.constexpr, HAS_DELTA: tl.constexpr, KL_BIAS: tl.constexpr,
                TOP_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: each token's objective and gradient coefficient (written to coef, and coef_ent
    for the entropy bonus). Returns the sums of the objective and of the entropy bonus's, for
    the token ratio its statistics' terms (clipped tokens, ratio sum, max, capped), and the
    sum of the KL terms as they enter the loss (KL_IN_LOSS)."""
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    obj_acc, ent_obj_acc, kl_acc = zero, zero, zero
    clip_acc, rsum_acc, rmax_acc, cap_acc = zero, zero, zero, zero
    for off in range(start, end, BLOCK):
        idx = off + cols
        inside = idx < end
        keep = inside
        if HAS_MASK:
            keep &= tl.load(mask_ptr + idx, mask=inside, other=0) != 0
        lp = tl.load(logp_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        c, obj, x, chi, clipped, kl_term = token_coefficient(
            lp, zero, old_ptr, ref_ptr, roll_ptr, sel_ptr, idx, keep, A, v, g_seq, J_seq,
            W_seq, keep_seq, xc_seq, x_seq, dx_seq, kl_seq, eps_low, eps_high, dual_clip, delta,
            param_pos, param_neg, cap, beta, rw_lo, rw_hi, RATIO, TWO_SIDED, DUAL, KL_IN_LOSS,
            ROLLOUT, RW_MASK, OBJECTIVE, HAS_DELTA, KL_BIAS, TOP_ENTROPY)
        obj_acc += obj
        kl_acc += kl_term
        if RATIO == TOKEN:
            k = keep.to(tl.float32)
            clip_acc += clipped * k
            rsum_acc += x * k
            rmax_acc = tl.maximum(rmax_acc, x * k)
            cap_acc = tl.maximum(cap_acc, (1.0 - chi) * k)
        tl.store(coef_ptr + idx, tl.where(keep, c, 0.0), mask=inside)
        if HAS_ENT:
            H = tl.load(ent_ptr + idx, mask=keep, other=0.0).to(tl.float32)
            ent_obj_acc += v * H
            tl.store(coef_ent_ptr + idx, tl.where(keep, -v, 0.0), mask=inside)
    return (tl.sum(obj_acc, 0), tl.sum(ent_obj_acc, 0), tl.sum(clip_acc, 0),
            tl.sum(rsum_acc, 0), tl.max(rmax_acc, 0), tl.max(cap_acc, 0), tl.sum(kl_acc, 0))


@triton.jit
def _ratio_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, ent_ptr, adv_ptr, cu_ptr, mask_ptr, roll_ptr, sel_ptr,
    coef_ptr, coef_ent_ptr, part_ptr, loss_ptr, stats_ptr, norm_ptr, counter_ptr, N, T, B,
    eps_low, eps_high, dual_clip, delta, param_pos, param_neg, param2_pos, param2_neg, cap,
    beta, rw_lo, rw_hi, opsm_threshold, num_tokens, num_sequences, max_len, entropy_coef,
    RATIO: tl.constexpr, TWO_SIDED: tl.constexpr, DUAL: tl.constexpr, PER_SEQ_MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, KL_IN_LOSS: tl.constexpr,
    HAS_ENT: tl.constexpr, ROLLOUT: tl.constexpr, RW_MASK: tl.constexpr, PADDED: tl.constexpr,
    FINALIZE: tl.constexpr, AGG: tl.constexpr, GIVEN_TOKENS: tl.constexpr,
    GIVEN_SEQUENCES: tl.constexpr, RW_PER_SEQ: tl.constexpr, OBJECTIVE: tl.constexpr,
    HAS_DELTA: tl.constexpr, KL_BIAS: tl.constexpr, OPSM: tl.constexpr,
    TOP_ENTROPY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program per sequence: pass 1 (_sequence_sums), the sampler correction's sequence
    weight, the sequence ratio's objective (_sequence_objective), pass 2 (_token_pass), then
    the sequence's row of partial sums. Sequence i is tokens [i T, (i + 1) T) of a padded
    batch (PADDED) or [cu[i], cu[i + 1]) (cu int32 or int64). With FINALIZE, the program that
    finishes last (counted in counter_ptr, which must hold 0) reduces every row into the
    loss (_reduce_partials): one launch in all; without, the finalize kernel does."""
    eps_low, eps_high, dual_clip = as_f32(eps_low), as_f32(eps_high), as_f32(dual_clip)
    delta, param_pos, param_neg = as_f32(delta), as_f32(param_pos), as_f32(param_neg)
    param2_pos, param2_neg = as_f32(param2_pos), as_f32(param2_neg)
    opsm_threshold = as_f32(opsm_threshold)
    cap, beta, rw_lo, rw_hi = as_f32(cap), as_f32(beta), as_f32(rw_lo), as_f32(rw_hi)
    i = tl.program_id(0)
    if PADDED:
        start = i.to(tl.int64) * T
        end = start + T
    else:
        start, end = segment_bounds(cu_ptr, i, N)
    A = tl.load(adv_ptr + i).to(tl.float32)
    (Delta, L, logp_sum, kl_sum, ent_sum, u_sum, w_sum, w_sq, w_max, w_min, w_zero, rkl_sum,
     r_valid, obj_sum, obj_clipped, drift, kept) = _sequence_sums(
        logp_ptr, old_ptr, ref_ptr, ent_ptr, mask_ptr, roll_ptr, sel_ptr, start, end, cap, rw_lo,
        rw_hi, A, eps_low, eps_high, HAS_MASK, HAS_REF, HAS_ENT, ROLLOUT, RW_MASK, OBJECTIVE,
        TWO_SIDED, OPSM, TOP_ENTROPY, BLOCK)
    nonempty = L > 0
    v = 1.0 / tl.maximum(L, 1.0) if PER_SEQ_MEAN else 1.0
    unit = nonempty.to(tl.float32)

    # the sampler correction: the sequence's weight W_seq (sequence modes), the weights' sum
    # over its tokens S_w, and the statistics' terms over its units
    W_seq = 1.0
    S_w = L
    if ROLLOUT == RW_SEQUENCE:
        W_seq = _rollout_weight(u_sum, rw_lo, rw_hi, cap, RW_MASK)
        S_w = L * W_seq
        rw_sum, rw_sq, rw_max = W_seq * unit, (W_seq > 0).to(tl.float32) * unit, W_seq * unit
        rw_min = tl.where(nonempty, W_seq, float("inf"))
        rw_zero = (W_seq == 0).to(tl.float32) * unit
    else:
        rw_sum, rw_sq, rw_max, rw_min, rw_zero = w_sum, w_sq, w_max, w_min, w_zero
        if ROLLOUT != 0:
            S_w = rw_sum

    if TOP_ENTROPY:  # the weights of the tokens the entropy quantile keeps
        S_w = kept * W_seq if ROLLOUT == RW_SEQUENCE else kept
    keep_seq = 1.0  # the off-policy mask keeps A >= 0, or a mean drift within the threshold
    if OPSM:
        low_drift = drift / tl.maximum(L, 1.0) <= opsm_threshold
        keep_seq = (((A >= 0).to(tl.float32) + low_drift.to(tl.float32)) > 0).to(tl.float32)
        S_w = S_w * keep_seq
    if OBJECTIVE == VESPO:  # its weight: phi of the trajectory's (and sampler's) log-weight
        log_w = obj_sum
        if ROLLOUT == RW_SEQUENCE:
            log_w += vespo_sampler_log_weight(W_seq)
        phi = vespo_weight(log_w, A, param_pos, param_neg, param2_pos, param2_neg)
    log_ratio_sum = Delta  # the sum the sequence ratio is formed from (GMPO's: clipped)
    if OBJECTIVE == GMPO:
        log_ratio_sum = obj_sum
    (obj, g_seq, J_seq, clipped_units, ratio_sum, capped_any, xc_seq, x_seq,
     dx_seq) = _sequence_objective(log_ratio_sum, L, A, v, S_w, eps_low, eps_high, dual_clip,
                                   delta, param_pos, param_neg, cap, RATIO, TWO_SIDED, DUAL,
                                   OBJECTIVE, HAS_DELTA)
    if OBJECTIVE == GMPO:  # per sequence: the fraction of its tokens whose log-ratio was clipped
        clipped_units = obj_clipped / tl.maximum(L, 1.0)
    if OBJECTIVE == VESPO:
        xc_seq = phi
    ratio_max = ratio_sum  # one ratio per sequence
    (tok_obj, ent_obj, tok_clipped, tok_ratio_sum, tok_ratio_max, tok_capped,
     kl_in_loss) = _token_pass(
        logp_ptr, old_ptr, ref_ptr, ent_ptr, mask_ptr, roll_ptr, sel_ptr, coef_ptr, coef_ent_ptr,
        start, end, A, v, g_seq, J_seq, W_seq, keep_seq, xc_seq, x_seq, dx_seq, kl_sum, eps_low,
        eps_high, dual_clip, delta, param_pos, param_neg, cap, beta, rw_lo, rw_hi, RATIO,
        TWO_SIDED, DUAL, HAS_MASK, KL_IN_LOSS, HAS_ENT, ROLLOUT, RW_MASK, OBJECTIVE, HAS_DELTA,
        KL_BIAS, TOP_ENTROPY, BLOCK)
    if RATIO == TOKEN:
        clipped_units, ratio_sum = tok_clipped, tok_ratio_sum
        ratio_max, capped_any = tok_ratio_max, tok_capped

    row = part_ptr + i * NPART
    tl.store(row + COL_OBJ, obj + tok_obj)
    tl.store(row + COL_ENT_OBJ, ent_obj)
    tl.store(row + COL_LEN, L)
    tl.store(row + COL_CLIPPED, clipped_units)
    tl.store(row + COL_RATIO_SUM, ratio_sum)
    tl.store(row + COL_RATIO_MAX, ratio_max)
    tl.store(row + COL_DELTA_ABS, tl.abs(Delta) * unit)
    tl.store(row + COL_CAPPED, capped_any)
    tl.store(row + COL_LOGP, logp_sum)
    # the KL statistic: of the term in the loss (times the ratio with KL_BIAS), else k3's
    tl.store(row + COL_KL, kl_in_loss if KL_BIAS and KL_IN_LOSS else kl_sum)
    tl.store(row + COL_ENT, ent_sum)
    tl.store(row + COL_RW_SUM, rw_sum)
    tl.store(row + COL_RW_SQ, rw_sq)
    tl.store(row + COL_RW_MAX, rw_max)
    tl.store(row + COL_RW_MIN, rw_min)
    tl.store(row + COL_RW_ZERO, rw_zero)
    tl.store(row + COL_RKL, rkl_sum)
    tl.store(row + COL_RVALID, r_valid)
    if FINALIZE:
        # The last program to finish reduces the rows, in a fixed order whichever it is: the
        # barrier orders every thread's stores before the count's release; the last program
        # acquires them and reads the rows from L2 (.cg, in _column), as the CUDA samples'
        # threadfence reduction does.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if done == B - 1:
            _reduce_partials(part_ptr, loss_ptr, stats_ptr, norm_ptr, B, num_tokens,
                             num_sequences, max_len, entropy_coef, RATIO, AGG, GIVEN_TOKENS,
                             GIVEN_SEQUENCES, RW_PER_SEQ, BLOCK_B)


@triton.jit
def _column(part_ptr, rows, keep, COL: tl.constexpr, other):
    return tl.load(part_ptr + rows * NPART + COL, mask=keep, other=other, cache_modifier=".cg")


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
    """One program reduces the (B, NPART) partial sums (_reduce_partials): for the callers
    that run the forward kernel more than once (the fused LM head, a chunk at a time)."""
    _reduce_partials(part_ptr, loss_ptr, stats_ptr, norm_ptr, B, num_tokens, num_sequences,
                     max_len, entropy_coef, RATIO, AGG, GIVEN_TOKENS, GIVEN_SEQUENCES,
                     RW_PER_SEQ, BLOCK)


@triton.jit
def normaliser(n_tok, n_seq, num_tokens, num_sequences, max_len, AGG: tl.constexpr,
               GIVEN_TOKENS: tl.constexpr, GIVEN_SEQUENCES: tl.constexpr):
    """The aggregation's normaliser from the batch's token and non-empty sequence counts (or
    the global ones given): 1/N', 1/B' or 1/(B' max_len)."""
    B_eff = tl.maximum(num_sequences if GIVEN_SEQUENCES else n_seq, 1.0)
    N_eff = tl.maximum(num_tokens if GIVEN_TOKENS else n_tok, 1.0)
    if AGG == TOKEN_MEAN:
        norm = 1.0 / N_eff
    elif AGG == SEQ_MEAN_TOKEN_SUM_NORM:
        norm = 1.0 / (B_eff * max_len)
    else:
        norm = 1.0 / B_eff
    return norm


@triton.jit
def _reduce_partials(part_ptr, loss_ptr, stats_ptr, norm_ptr, B, num_tokens, num_sequences,
                     max_len, entropy_coef, RATIO: tl.constexpr, AGG: tl.constexpr,
                     GIVEN_TOKENS: tl.constexpr, GIVEN_SEQUENCES: tl.constexpr,
                     RW_PER_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """Reduces the (B, NPART) partial sums in a fixed order (bitwise reproducible) into the
    loss, its normaliser and the statistics: no host value, so the loss can be captured in a
    CUDA graph."""
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
        L = _column(part_ptr, rows, keep, COL_LEN, 0.0)
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
    norm = normaliser(n_tok, n_seq, num_tokens, num_sequences, max_len, AGG, GIVEN_TOKENS,
                      GIVEN_SEQUENCES)
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


def rollout_code(config) -> int:
    """The ROLLOUT switch of the forward kernel for a LossConfig's sampler correction."""
    if config.rollout in ("", "weights"):
        return ROLLOUT_CODE[config.rollout or None]
    return ROLLOUT_CODE["sequence" if config.rollout_per_sequence else "token"]
