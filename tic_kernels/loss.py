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

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from . import validation as check
from .backend import (BLOCK_TOKENS, grads_by_name, inputs_by_name, launch, segment_bounds,
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

# Columns of the per-sequence partial sums that the loss kernel writes and the finalize kernel
# reduces: the objective, the entropy bonus's objective, the length, then the statistics' sums.
(COL_OBJ, COL_ENT_OBJ, COL_LEN, COL_CLIPPED, COL_RATIO_SUM, COL_RATIO_MAX, COL_DELTA_ABS,
 COL_CAPPED, COL_LOGP, COL_KL, COL_ENT) = (tl.constexpr(i) for i in range(11))
NPART = tl.constexpr(11)

# The statistics, in the order of the stats tensor the finalize kernel writes.
STAT_KEYS = ("clip_fraction", "ratio_mean", "ratio_max", "cap_fraction", "delta_abs_mean",
             "logp_mean", "entropy_mean", "kl_mean")
(STAT_CLIP, STAT_RATIO_MEAN, STAT_RATIO_MAX, STAT_CAP, STAT_DELTA_ABS, STAT_LOGP, STAT_ENT,
 STAT_KL) = (tl.constexpr(i) for i in range(len(STAT_KEYS)))


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
def _ratio_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, ent_ptr, adv_ptr, cu_ptr, mask_ptr,
    coef_ptr, coef_ent_ptr, part_ptr, N,
    eps_low, eps_high, dual_clip, cap, beta,
    RATIO: tl.constexpr, TWO_SIDED: tl.constexpr, DUAL: tl.constexpr, PER_SEQ_MEAN: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_REF: tl.constexpr, KL_IN_LOSS: tl.constexpr,
    HAS_ENT: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    start, end = segment_bounds(cu_ptr, i, N)
    A = tl.load(adv_ptr + i).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)

    # pass 1: Delta_i, L_i and the sums of the statistics
    delta, count, logp_sum, kl_sum, ent_sum = zero, zero, zero, zero, zero
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
    Delta = tl.sum(delta, 0)
    L = tl.sum(count, 0)
    nonempty = L > 0
    v = 1.0 / tl.maximum(L, 1.0) if PER_SEQ_MEAN else 1.0

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
        obj = tl.where(nonempty, v * L * J_seq, 0.0)  # an empty sequence adds nothing, not NaN
        # dL/dlogp_t / norm = -W_i dJ/dx x chi (/ L_i for GSPO), W_i / norm = v L
        g_seq = -v * L * dJ * x * chi
        if RATIO == SEQUENCE_MEAN:
            g_seq = g_seq / tl.maximum(L, 1.0)
        unit = nonempty.to(tl.float32)
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
        if RATIO == TOKEN:
            old = tl.load(old_ptr + idx, mask=keep, other=0.0).to(tl.float32)
            x, chi = _capped_exp(lp - old, cap)
            J_tok, dJ, clipped = _clipped_objective(x, A, eps_low, eps_high, dual_clip,
                                                    TWO_SIDED, DUAL)
            obj_acc += tl.where(keep, v * J_tok, 0.0)
            c = -v * dJ * x * chi
            k = keep.to(tl.float32)
            clip_acc += clipped * k
            rsum_acc += x * k
            rmax_acc = tl.maximum(rmax_acc, x * k)
            cap_acc = tl.maximum(cap_acc, (1.0 - chi) * k)
        elif RATIO == NO_RATIO:
            J_tok = A * lp
            obj_acc += tl.where(keep, v * J_tok, 0.0)
            c = zero - v * A
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


@triton.jit
def _column_sum(part_ptr, rows, keep, COL: tl.constexpr):
    return tl.sum(tl.load(part_ptr + rows * NPART + COL, mask=keep, other=0.0), 0)


@triton.jit
def _ratio_loss_finalize_kernel(
    part_ptr, loss_ptr, stats_ptr, norm_ptr, B,
    num_tokens, num_sequences, max_len, entropy_coef,
    RATIO: tl.constexpr, AGG: tl.constexpr, GIVEN_TOKENS: tl.constexpr,
    GIVEN_SEQUENCES: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program reduces the (B, NPART) partial sums in a fixed order (bitwise
    reproducible) into the loss, its normaliser and the statistics: one launch, no host
    value, so the loss can be captured in a CUDA graph."""
    cols = tl.arange(0, BLOCK)
    obj, ent_obj, n_tok, n_seq, clipped, rsum, delta_abs, capped, logp, kl, ent = (
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    rmax = 0.0
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
        rmax = tl.maximum(rmax, tl.max(tl.load(part_ptr + rows * NPART + COL_RATIO_MAX,
                                               mask=keep, other=0.0), 0))
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


def launch_ratio_fwd(logp, old, ref, entropy, advantages, cu, mask, coef, coef_ent, part, *,
                     ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                     beta):
    """The per-sequence pass over the B = cu.numel() - 1 sequences of ``cu`` (row offsets into
    the flat per-token tensors, which are indexed globally): writes their tokens' coef and
    coef_ent and their rows of ``part`` (B, NPART). The fused LM head runs it on a slice of
    the sequences at a time. Optional inputs may be None."""
    B = cu.numel() - 1
    if B:
        launch(_ratio_loss_fwd_kernel, (B,),
            logp, old, logp if ref is None else ref, logp if entropy is None else entropy,
            advantages, cu, logp if mask is None else mask, coef, coef_ent, part, logp.numel(),
            eps_low, eps_high, 0.0 if dual_clip is None else dual_clip, max_log_ratio, beta,
            RATIO=RATIO_CODE[ratio], TWO_SIDED=clip_mode == "two_sided",
            DUAL=dual_clip is not None, PER_SEQ_MEAN=aggregation == "seq-mean-token-mean",
            HAS_MASK=mask is not None, HAS_REF=ref is not None, KL_IN_LOSS=beta > 0,
            HAS_ENT=entropy is not None, BLOCK=BLOCK_TOKENS)


def launch_finalize(part, loss, stats, norm, *, ratio, aggregation, entropy_coef, num_tokens,
                    num_sequences, max_len):
    """Reduces ``part`` (B, NPART) into loss (), stats (8,) and norm ()."""
    launch(_ratio_loss_finalize_kernel, (1,),
        part, loss, stats, norm, part.shape[0], 0.0 if num_tokens is None else num_tokens,
        0.0 if num_sequences is None else num_sequences, 1.0 if max_len is None else max_len,
        entropy_coef, RATIO=RATIO_CODE[ratio], AGG=AGG_CODE[aggregation],
        GIVEN_TOKENS=num_tokens is not None, GIVEN_SEQUENCES=num_sequences is not None,
        BLOCK=BLOCK_SEQS)


def new_partials(B, device):
    """Buffers of the loss's reduction: part (B, NPART), loss (), stats (8,), norm ()."""
    def f32(*shape):
        return torch.empty(*shape, dtype=torch.float32, device=device)
    return f32(B, NPART.value), f32(()), f32(len(STAT_KEYS)), f32(())


@triton_op("tic_kernels::ratio_loss", mutates_args=())
def ratio_loss(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, cu: torch.Tensor,
               mask: Optional[torch.Tensor], ref: Optional[torch.Tensor],
               entropy: Optional[torch.Tensor], ratio: str, clip_mode: str, eps_low: float,
               eps_high: float, dual_clip: Optional[float], max_log_ratio: float,
               aggregation: str, beta: float, entropy_coef: float, num_tokens: Optional[float],
               num_sequences: Optional[float], max_len: Optional[float]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (8,), coef (R,), coef_entropy (R,) or (0,), norm) over flat per-token
    tensors of R positions split by the segments (cu, mask); see the module docstring."""
    R, B = logp.numel(), cu.numel() - 1
    dev = logp.device
    coef = torch.empty(R, dtype=torch.float32, device=dev)
    coef_ent = torch.empty(R if entropy is not None else 0, dtype=torch.float32, device=dev)
    part, loss, stats, norm = new_partials(B, dev)

    def flat(t):  # the kernel reads flat positions and per-sequence entries by index
        return None if t is None else t.reshape(-1).contiguous()
    launch_ratio_fwd(flat(logp), flat(old), flat(ref), flat(entropy), advantages.contiguous(),
                     cu.contiguous(), flat(mask), coef, coef_ent, part, ratio=ratio,
                     clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high,
                     dual_clip=dual_clip, max_log_ratio=max_log_ratio, aggregation=aggregation,
                     beta=beta)
    launch_finalize(part, loss, stats, norm, ratio=ratio, aggregation=aggregation,
                    entropy_coef=entropy_coef, num_tokens=num_tokens,
                    num_sequences=num_sequences, max_len=max_len)
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


def stats_keys(has_entropy, has_ref):
    """The statistics reported, in sorted order (entropy and KL only when computed)."""
    return sorted(k for k in STAT_KEYS
                  if (k != "entropy_mean" or has_entropy) and (k != "kl_mean" or has_ref))


def stats_dict(stats, has_entropy, has_ref):
    return {k: stats[STAT_KEYS.index(k)] for k in stats_keys(has_entropy, has_ref)}


def loss_on_segments(logp, old, advantages, cu_seqlens, mask, ref_logprobs, entropy, *,
                     ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                     beta, entropy_coef, num_tokens, num_sequences, max_len):
    """Runs the ratio_loss op on either layout; returns (loss, stats (8,), coef, coef_ent, norm)
    (stats_dict names the statistics)."""
    aggregation = aggregation or default_aggregation(ratio)
    if mask is not None and max_len is None:
        max_len = mask.shape[1]
    cu, flat_mask = segments(cu_seqlens, mask, logp.device)

    def flat(t):
        return None if t is None else t.reshape(-1)
    loss, stats, coef, coef_ent, norm = ratio_loss(
        flat(logp), flat(old), advantages.detach().float(), cu, flat_mask,
        flat(ref_logprobs), flat(entropy), ratio, clip_mode, float(eps_low), float(eps_high),
        None if dual_clip is None else float(dual_clip), float(max_log_ratio), aggregation,
        float(beta), float(entropy_coef), None if num_tokens is None else float(num_tokens),
        None if num_sequences is None else float(num_sequences),
        None if max_len is None else float(max_len))
    return loss, stats, coef, coef_ent, norm


def tic_loss_from_logprobs(logprobs, old_logprobs, advantages, *, cu_seqlens=None, mask=None,
                           ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                           dual_clip=None, max_log_ratio=20.0, aggregation=None,
                           ref_logprobs=None, beta=0.0, num_tokens=None, num_sequences=None,
                           max_len=None):
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

    Returns:
        LossOutput(loss, stats): ``loss`` a float32 scalar, differentiable w.r.t. logprobs;
        ``stats`` a dict of float32 scalars (see LossOutput), computed without a host sync.
    """
    check.float_tensor("logprobs", logprobs)
    options = check.loss_options(ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio,
                                 aggregation, ref_logprobs, beta, num_tokens, num_sequences,
                                 max_len, mask is not None)
    check.loss_inputs(logprobs, "logprobs", cu_seqlens, mask, old_logprobs, advantages,
                      ref_logprobs, ("logprobs", logprobs), max_len)
    if not use_triton(logprobs):
        return reference.tic_loss_from_logprobs(logprobs, old_logprobs, advantages,
                                                cu_seqlens=cu_seqlens, mask=mask,
                                                ref_logprobs=ref_logprobs, **options)
    loss, stats, *_ = loss_on_segments(logprobs, old_logprobs, advantages, cu_seqlens, mask,
                                       ref_logprobs, None, entropy_coef=0.0, **options)
    return LossOutput(loss, stats_dict(stats, False, ref_logprobs is not None))
