"""Op 4 from logits: log-softmax gather and the clipped ratio loss in one autograd node.

Traffic over the (N, V) logits, the only large tensor: one read in forward (logp, max_logsum and
entropy in one pass), one read and one write in backward (the gradient from the saved max_logsum and
the per-token coefficient the loss kernel wrote), so 3 N V s bytes for s-byte logits. With
``inplace_backward`` the gradient overwrites the logits buffer and the loss allocates O(N).
Padded rows under a zero mask are never read; their gradient rows are written with zeros.
"""
from __future__ import annotations

import warnings

import torch

from .. import ranks, reference
from .. import validation as check
from ..backend import dense, first_order_only, tracing, use_triton
from ..config import loss_call
from ..layout import ignoring_masked
from ..options import IGNORE_INDEX
from ..output import LossOutput
from . import tic_loss_two_pass as two_pass
from .ratio_loss import kernel_ratio_loss, loss_on_segments, scaled_coefficients, stats_dict
from .token_logprobs import kernel_logprobs, logits_grad, token_logprobs_fwd


class _TICLoss(torch.autograd.Function):
    """Logits to (loss, stats (len(STAT_KEYS),)) in one node; the gradient reaches the
    logits only. Eager: two kernels forward (the rows, then the loss with its reduction) and
    one backward (the coefficients scaled by the incoming gradient inside it); the inputs as
    they come (the mask of any dtype, int32 cu_seqlens). While torch.compile traces: the
    torch.library ops, whose glue Inductor fuses."""

    @staticmethod
    def forward(ctx, logits, call):
        # the inputs other than the logits in one tuple: each input of a node costs the forward
        # and the backward host time, and only the logits have a gradient
        (targets, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs, rollout,
         inplace_backward, config, shard) = call
        entropy_on = config.with_entropy
        if tracing(logits):
            targets = ignoring_masked(targets, mask)  # the kernel never reads those rows
            if shard is None:
                logp, max_logsum, entropy = token_logprobs_fwd(
                    logits, targets, config.temperature, IGNORE_INDEX, entropy_on)
            else:
                logp, max_logsum, entropy = kernel_logprobs(
                    logits, targets.reshape(-1).contiguous(), config.temperature, IGNORE_INDEX,
                    entropy_on, shard)
            row_mask = None
            loss, stats, coef, coef_ent, norm = loss_on_segments(
                logp, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
                entropy if entropy_on else None, rollout, config)
        else:
            targets, row_mask = dense(targets), dense(mask)
            # cleared by the row kernel for the loss kernel (with no row, nothing clears it:
            # the loss then takes its second launch)
            counter = torch.empty(1, dtype=torch.int32, device=logits.device) \
                if targets.numel() else None
            logp, max_logsum, entropy = kernel_logprobs(
                logits, targets, config.temperature, IGNORE_INDEX, entropy_on, shard,
                row_mask, counter)
            loss, stats, coef, coef_ent, norm = kernel_ratio_loss(
                logp, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
                entropy if entropy_on else None, rollout, config, counter)
        # the caller's tensors saved (autograd then checks that nothing modified them before
        # the backward); this call's own buffers, which nothing else sees, held as they are
        # (saving costs host time per tensor)
        ctx.save_for_backward(logits, targets, row_mask)
        ctx.buffers = max_logsum, entropy, coef, coef_ent, norm
        ctx.config, ctx.inplace_backward = config, inplace_backward
        ctx.vocab_start = 0 if shard is None else shard.start
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    @first_order_only
    def backward(ctx, g_loss, _g_stats):
        if g_loss is None:  # only the statistics were used: no gradient
            return None, None
        logits, targets, row_mask = ctx.saved_tensors
        max_logsum, entropy, coef, coef_ent, norm = ctx.buffers
        config = ctx.config
        # decided now: a backward may be traced (compiled autograd) after an eager forward
        traced = tracing(logits)
        kw = dict(inplace=ctx.inplace_backward, vocab_start=ctx.vocab_start, traced=traced)
        if traced:
            if row_mask is not None:  # saved by an eager forward: the op reads no mask
                targets = ignoring_masked(targets, row_mask)
            g_logp, g_entropy = scaled_coefficients(g_loss, norm, coef, coef_ent,
                                                    config.entropy_coef, config.entropy_bonus)
        else:
            g_logp, g_entropy = coef, coef_ent if config.entropy_bonus else None
            kw.update(mask=row_mask, scale=(g_loss, norm, config.entropy_coef))
        grad = logits_grad(logits, targets, max_logsum, entropy, g_logp, g_entropy,
                           config.temperature, IGNORE_INDEX, **kw)
        return grad, None


def _overlapping(t: torch.Tensor) -> bool:
    """True when two indices of t may share an element (an expanded tensor): dimensions sorted
    by stride must each step past everything the smaller ones span."""
    span = 0
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def inplace_refusal(logits: torch.Tensor):
    """Why the gradient must not be written over ``logits``, or None when it may.

    The logits buffer may be overwritten when it is produced by autograd (an LM head's output
    or a slice of it) and its elements do not overlap. A leaf, or a view of a leaf that
    requires grad, is the caller's storage (a parameter); an expanded tensor would have one
    element written by many rows. A graph node that saved the logits themselves (say a tanh
    whose output they are) sees them modified and autograd raises its in-place error.
    """
    if not logits.requires_grad:
        return None  # no backward will run
    if _overlapping(logits):
        return "their elements overlap (an expanded or stride-0 tensor)"
    if torch.compiler.is_compiling():
        return None
    if logits.is_leaf:
        return "they are a leaf tensor, whose storage belongs to the caller"
    base = logits._base
    if base is not None and base.is_leaf and base.requires_grad:
        return "they are a view of a leaf tensor that requires grad (a parameter)"
    return None


def tic_loss(logits, targets, old_logprobs, advantages, *, cu_seqlens=None, mask=None,
             ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
             dual_clip=None, max_log_ratio=20.0, aggregation=None, temperature=1.0,
             ref_logprobs=None, beta=0.0, entropy_coef=0.0, num_tokens=None,
             num_sequences=None, max_len=None, inplace_backward=False, process_group=None,
             rollout_logprobs=None, rollout_is=None, rollout_is_max=None, rollout_is_min=None,
             rollout_weights=None, objective="clip", delta=None, sapo_tau_pos=1.0,
             sapo_tau_neg=1.05, dro_beta=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
             vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_cov_ratio=None, kl_cov_coef=None,
             kl_bias_correction=False, off_policy_mask_threshold=None,
             top_entropy_quantile=1.0):
    """TIC-GRPO (and GSPO / GRPO / DAPO / CISPO / SAPO) loss straight from the policy's logits.

    Args:
        logits: packed (N, V) with ``cu_seqlens`` (B+1,) int32 or int64, or padded (B, T, V) with
            ``mask`` (B, T) bool or 0/1 marking the loss tokens; float16, bfloat16 or float32
            (float64 runs the reference). Masked rows are never read and get zero gradient.
        targets: (N,) or (B, T) int32/int64 token ids in [0, V) at every loss token.
        old_logprobs: per-token log-probabilities of the sampling policy, like targets.
        advantages: (B,) per sequence.
        temperature: > 0, the sampling temperature (logits are divided by it).
        entropy_coef: weight of the entropy bonus, loss -= entropy_coef * aggregate(H).
        inplace_backward: write the logits gradient into the logits buffer (no (N, V)
            allocation; the logits are overwritten in backward, so do not reuse them). Only
            for logits that autograd produced (a model's output or a slice of it) whose
            elements do not overlap; for a leaf, a view of a leaf that requires grad, or an
            expanded tensor the gradient is allocated instead, with a warning.
        process_group: the vocabulary is split over this torch.distributed group (op 7): the
            logits hold this rank's columns [rank V_local, (rank + 1) V_local), targets are
            global ids, every other input is replicated; the loss and statistics are the
            whole vocabulary's on every rank, the gradient this rank's slice of it. See
            :func:`tic_kernels.token_logprobs` for the communication.
        Other keywords (the sampler correction rollout_* included): as in
            :func:`tic_kernels.tic_loss_from_logprobs`.

    Returns:
        LossOutput(loss, stats): float32 scalar loss with autograd to logits, and a dict of
        float32 statistics (see LossOutput), computed without a host sync.
    """
    keywords = dict(
        ratio=ratio, clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        max_log_ratio=max_log_ratio, aggregation=aggregation, beta=beta,
        entropy_coef=entropy_coef, temperature=temperature, num_tokens=num_tokens,
        num_sequences=num_sequences, max_len=max_len, ref_logprobs=ref_logprobs, mask=mask,
        rollout_logprobs=rollout_logprobs, rollout_is=rollout_is, rollout_is_max=rollout_is_max,
        rollout_is_min=rollout_is_min, rollout_weights=rollout_weights, objective=objective,
        delta=delta, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, kl_cov_ratio=kl_cov_ratio, kl_cov_coef=kl_cov_coef,
        kl_bias_correction=kl_bias_correction,
        off_policy_mask_threshold=off_policy_mask_threshold,
        top_entropy_quantile=top_entropy_quantile)

    def checks(vocab):
        check.float_tensor("logits", logits)
        checked = loss_call("logits", logits, "V", vocab, targets, old_logprobs, advantages,
                            cu_seqlens, mask, ref_logprobs, keywords)
        check.boolean("inplace_backward", inplace_backward)
        return checked

    (config, rollout), shard = ranks.agree(
        process_group, "tic_loss", checks, ranks.columns_of(logits), "logits",
        ranks.rows_of(targets), lambda checked: ranks.loss_inputs(
            *checked, targets, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
            **{"logits' dtype": logits.dtype}, **ranks.path_of(logits)))
    if not use_triton(logits):
        return reference.tic_loss(logits, targets, old_logprobs, advantages,
                                  cu_seqlens=cu_seqlens, mask=mask,
                                  temperature=config.temperature, ref_logprobs=ref_logprobs,
                                  shard=None if shard is None else shard.pair,
                                  **config.reference_keywords(rollout))
    if inplace_backward and (why := inplace_refusal(logits)) is not None:
        warnings.warn(f"tic_loss: inplace_backward=True ignored, the gradient is allocated: the "
                      f"logits cannot be overwritten because {why}", stacklevel=2)
        inplace_backward = False
    if two_pass.serves(config, logits, inplace_backward, shard) and not tracing(logits):
        loss, stats = two_pass.TICLossTwoPass.apply(logits, targets, old_logprobs, advantages,
                                                    cu_seqlens, mask, ref_logprobs, rollout,
                                                    config)
    else:
        loss, stats = _TICLoss.apply(logits, (targets, old_logprobs, advantages, cu_seqlens,
                                              mask, ref_logprobs, rollout, inplace_backward,
                                              config, shard))
    return LossOutput(loss, stats_dict(stats, config))


class TICLoss(torch.nn.Module):
    """``tic_loss`` with its keywords fixed at construction; call-time keywords override them.

    >>> loss_fn = TICLoss(ratio="trajectory", eps_low=0.2, eps_high=0.28)
    >>> out = loss_fn(logits, targets, old_logprobs, advantages, mask=mask)
    """

    def __init__(self, **keywords):
        super().__init__()
        self.keywords = keywords

    def forward(self, logits, targets, old_logprobs, advantages, **keywords):
        return tic_loss(logits, targets, old_logprobs, advantages, **{**self.keywords, **keywords})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
