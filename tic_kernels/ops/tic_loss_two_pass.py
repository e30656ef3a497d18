"""tic_loss for the token-level ratios with the gradient written in the forward: two passes
over the logits instead of three (a switch, ``ENABLED``, off until a GPU run shows it faster).

For ratio="token" and "none" (with token-level or given sampler weights) a token's gradient
coefficient c_t needs only its own row's log-sum-exp and per-token inputs, and the
normaliser, which depends on the mask alone. So:

1. one program computes each sequence's aggregation weight v_i and the normaliser from the
   layout (and clears the loss kernel's counter);
2. one program per row sweeps its logits twice: the online log-sum-exp (and entropy), then,
   with c_t known, the gradient of the loss (for an incoming gradient of 1) written to a new
   (N, V) buffer; the first sweep's loads ask L2 to keep the row (evict_last), the second's to
   drop it (evict_first), so that the second read can come from L2 rather than HBM;
3. the ratio-loss kernel reduces the loss and its statistics from the log-probs, as in the
   three-pass path.

The backward multiplies the buffer by the incoming gradient in place, a kernel that reads it
on the device and touches nothing when it is exactly 1 (the usual loss.backward()), and
returns it: one backward per forward. The gradient equals the three-pass path's bitwise at an
incoming gradient of 1 (the same operations in the same order). Whether the second sweep hits
L2 depends on how many rows are in flight (a 152k-vocabulary bf16 row is 300 KB): a GPU
measurement decides (benchmarks/bench_tic_loss.py times both).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import (BLOCK_TOKENS, as_f32, emulate_rne, first_order_only,
                       flat, kernel_segments, launch, segment_bounds)
from ..options import IGNORE_INDEX
from .ratio_loss import kernel_ratio_loss
from .scale import scale_once
from .ratio_loss_kernels import AGG_CODE, normaliser, rollout_code
from .ratio_objectives import CLIP, RATIO_CODE, token_coefficient
from .token_logprobs import (_launch_config, _row_offset, _row_target, _rows_layout, fwd_chunk,
                             new_row_buffers, row_gradient, row_logsumexp, store_row_values)

# The switch: tic_loss takes this path for the ratios and options it serves when True.
ENABLED = False


def serves(config, logits, inplace_backward, shard) -> bool:
    """Whether a tic_loss call takes this path: the switch on, the token-level ratios with no
    per-sequence sampler weight under the plain clipped objective, a gradient wanted and
    allocated, no vocabulary split."""
    return (ENABLED and config.ratio in ("token", "none") and not config.rollout_per_sequence
            and config.objective == "clip" and config.delta is None
            and not config.kl_bias_correction and config.off_policy_mask_threshold is None
            and config.top_entropy_quantile == 1.0
            and logits.requires_grad and not inplace_backward and shard is None
            and logits.shape[:-1].numel() > 0)


@triton.jit
def _sequence_weights_kernel(
    cu_ptr, mask_ptr, v_ptr, norm_ptr, counter_ptr, N, T, B,
    num_tokens, num_sequences, max_len,
    PADDED: tl.constexpr, PER_SEQ_MEAN: tl.constexpr, AGG: tl.constexpr,
    GIVEN_TOKENS: tl.constexpr, GIVEN_SEQUENCES: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: each sequence's length L_i (loss tokens), then v_i (1/L_i or 1) into
    v_ptr and the normaliser into norm_ptr, as the loss kernel computes them; clears the
    counter of the loss kernel that follows."""
    num_tokens, num_sequences = as_f32(num_tokens), as_f32(num_sequences)
    max_len = as_f32(max_len)
    tl.store(counter_ptr, 0)
    cols = tl.arange(0, BLOCK)
    n_tok = 0.0
    n_seq = 0.0
    for i in range(0, B):
        if PADDED:
            count = tl.zeros([BLOCK], dtype=tl.float32)
            for off in range(0, T, BLOCK):
                t = off + cols
                count += (tl.load(mask_ptr + i * T + t, mask=t < T, other=0)
                          != 0).to(tl.float32)
            L = tl.sum(count, 0)
        else:
            start, end = segment_bounds(cu_ptr, i, N)
            L = (end - start).to(tl.float32)
        n_tok += L
        n_seq += (L > 0).to(tl.float32)
        tl.store(v_ptr + i, 1.0 / tl.maximum(L, 1.0) if PER_SEQ_MEAN else 1.0)
    tl.store(norm_ptr, normaliser(n_tok, n_seq, num_tokens, num_sequences, max_len, AGG,
                                  GIVEN_TOKENS, GIVEN_SEQUENCES))


@triton.jit
def _sequence_of(row, cu_ptr, T, B, PADDED: tl.constexpr, BLOCK: tl.constexpr):
    """The sequence a row belongs to: row // T padded, else the number of sequence ends
    cu[1..B] at or before it (empty sequences included)."""
    if PADDED:
        return row // T
    count = tl.zeros([BLOCK], dtype=tl.int32)
    cols = tl.arange(0, BLOCK)
    for off in range(0, B, BLOCK):
        j = off + cols
        ends = tl.load(cu_ptr + 1 + j, mask=j < B, other=0).to(tl.int64)
        count += ((j < B) & (ends <= row)).to(tl.int32)
    return tl.sum(count, 0)


@triton.jit
def _rows_with_gradient_kernel(
    logits_ptr, grad_ptr, targets_ptr, mask_ptr, logp_ptr, max_logsum_ptr, entropy_ptr,
    old_ptr, ref_ptr, roll_ptr, adv_ptr, cu_ptr, v_ptr, norm_ptr,
    stride_b, stride_t, stride_v, stride_gb, stride_gt, stride_gv,
    T, V, T_seq, B, inv_temperature, ignore_index, entropy_coef,
    eps_low, eps_high, dual_clip, cap, beta, rw_lo, rw_hi,
    WITH_ENTROPY: tl.constexpr, HAS_MASK: tl.constexpr, PADDED: tl.constexpr,
    RATIO: tl.constexpr, TWO_SIDED: tl.constexpr, DUAL: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, ROLLOUT: tl.constexpr, RW_MASK: tl.constexpr,
    EMULATE_RNE: tl.constexpr, UNIT_STRIDE_V: tl.constexpr, UNIT_STRIDE_GV: tl.constexpr,
    BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One program per row: sweep 1, the row's log-sum-exp (op 1's forward kernel: logp,
    max_logsum, entropy stored for the loss kernel); the token's coefficient (op 4's
    token_coefficient) times the normaliser; sweep 2, the row's gradient (op 1's backward
    kernel's formula) into grad."""
    inv_temperature, entropy_coef = as_f32(inv_temperature), as_f32(entropy_coef)
    eps_low, eps_high, dual_clip = as_f32(eps_low), as_f32(eps_high), as_f32(dual_clip)
    cap, beta, rw_lo, rw_hi = as_f32(cap), as_f32(beta), as_f32(rw_lo), as_f32(rw_hi)
    row = tl.program_id(0)
    target = _row_target(targets_ptr, mask_ptr, row, ignore_index, HAS_MASK)
    active = target != ignore_index
    base = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    gbase = grad_ptr + _row_offset(row, T, stride_gb, stride_gt)
    # sweep 1 asks L2 to keep the row for sweep 2, which lets it go
    logp, m, log_s, H = row_logsumexp(base, target, active, V, stride_v, inv_temperature,
                                      WITH_ENTROPY, UNIT_STRIDE_V, BLOCK_V, CHUNK, "evict_last")
    store_row_values(logp_ptr, max_logsum_ptr, entropy_ptr, row, logp, m, log_s, H,
                     WITH_ENTROPY)

    i = _sequence_of(row, cu_ptr, T_seq, B, PADDED, BLOCK_B)
    A = tl.load(adv_ptr + i).to(tl.float32)
    v = tl.load(v_ptr + i)
    c, _obj, _x, _chi, _clipped, _kl = token_coefficient(
        logp, 0.0, old_ptr, ref_ptr, roll_ptr, roll_ptr, row, active, A, v, 0.0, 0.0, 1.0, 1.0, 1.0,
        1.0, 0.0, 0.0, eps_low, eps_high, dual_clip, 0.0, 1.0, 1.0, cap, beta, rw_lo, rw_hi,
        RATIO, TWO_SIDED, DUAL, KL_IN_LOSS, ROLLOUT, RW_MASK, CLIP, False, False, False)
    scale = inv_temperature * tl.load(norm_ptr)  # as op 1's backward for a gradient of 1
    g = tl.where(active, c, 0.0) * scale
    gH = 0.0
    if WITH_ENTROPY:
        gH = tl.where(active, -v, 0.0) * scale * entropy_coef
    row_gradient(base, gbase, 0, V, active, target, g, gH, H, m, log_s, V, inv_temperature,
                 stride_v, stride_gv, WITH_ENTROPY, EMULATE_RNE, UNIT_STRIDE_V, UNIT_STRIDE_GV,
                 BLOCK_V, "evict_first")


def forward_with_gradient(logits, targets, old_logprobs, advantages, cu_seqlens, mask,
                          ref_logprobs, rollout, config):
    """(loss, stats, grad): three kernels (the sequence weights, the rows with their
    gradient, the loss); grad is dL/dlogits for an incoming gradient of 1, contiguous."""
    dev = logits.device
    flat_t, flat_mask = flat(targets), flat(mask)
    R = flat_t.numel()
    cu, B, T_seq = kernel_segments(cu_seqlens, mask)
    c = config
    v = torch.empty(B, dtype=torch.float32, device=dev)
    norm = torch.empty((), dtype=torch.float32, device=dev)
    counter = torch.empty(1, dtype=torch.int32, device=dev)
    launch(_sequence_weights_kernel, (1,), flat_t if cu is None else cu,
           flat_t if flat_mask is None else flat_mask, v, norm, counter, R, T_seq, B,
           0.0 if c.num_tokens is None else c.num_tokens,
           0.0 if c.num_sequences is None else c.num_sequences,
           1.0 if c.max_len is None else c.max_len, PADDED=cu is None,
           PER_SEQ_MEAN=c.aggregation == "seq-mean-token-mean", AGG=AGG_CODE[c.aggregation],
           GIVEN_TOKENS=c.num_tokens is not None, GIVEN_SEQUENCES=c.num_sequences is not None,
           BLOCK=BLOCK_TOKENS)
    logp, max_logsum, entropy = new_row_buffers(R, c.with_entropy, dev)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=dev)
    T, sb, st, sv = _rows_layout(logits)
    _, gb, gt, gv = _rows_layout(grad)
    block, warps = _launch_config("fwd", logits.shape[-1])
    old, ref, roll = flat(old_logprobs), flat(ref_logprobs), flat(rollout)
    launch(_rows_with_gradient_kernel, (R,),
           logits, grad, flat_t, flat_t if flat_mask is None else flat_mask, logp, max_logsum,
           logp if entropy is None else entropy, old, logp if ref is None else ref,
           logp if roll is None else roll,
           advantages.contiguous(), flat_t if cu is None else cu, v, norm,
           sb, st, sv, gb, gt, gv, T, logits.shape[-1], T_seq, B, 1.0 / c.temperature,
           IGNORE_INDEX, c.entropy_coef, c.eps_low, c.eps_high,
           0.0 if c.dual_clip is None else c.dual_clip, c.max_log_ratio, c.beta,
           c.rollout_is_min, c.rollout_is_max, WITH_ENTROPY=c.with_entropy,
           HAS_MASK=flat_mask is not None, PADDED=cu is None, RATIO=RATIO_CODE[c.ratio],
           TWO_SIDED=c.clip_mode == "two_sided", DUAL=c.dual_clip is not None,
           KL_IN_LOSS=c.beta > 0, ROLLOUT=rollout_code(c), RW_MASK=c.rollout_masks,
           EMULATE_RNE=emulate_rne(grad.dtype), UNIT_STRIDE_V=sv == 1, UNIT_STRIDE_GV=gv == 1,
           BLOCK_V=block, CHUNK=fwd_chunk(block), BLOCK_B=BLOCK_TOKENS, num_warps=warps)
    loss, stats, *_ = kernel_ratio_loss(logp, old_logprobs, advantages, cu_seqlens, mask,
                                        ref_logprobs, entropy,
                                        rollout, config, counter)
    return loss, stats, grad


class TICLossTwoPass(torch.autograd.Function):
    """Logits to (loss, stats) with the gradient formed in the forward (see the module)."""

    @staticmethod
    def forward(ctx, logits, targets, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
                rollout, config):
        loss, stats, grad = forward_with_gradient(logits, targets, old_logprobs, advantages,
                                                  cu_seqlens, mask, ref_logprobs, rollout,
                                                  config)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    @first_order_only
    def backward(ctx, g_loss, _g_stats):
        if g_loss is None:
            return (None,) * 9
        grad, = scale_once(ctx, g_loss, ctx.saved_tensors, "tic_loss with the gradient in the "
                           "forward (tic_kernels.ops.tic_loss_two_pass.ENABLED)")
        return (grad,) + (None,) * 8
