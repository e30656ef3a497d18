"""Op 4 on per-token log-probabilities: the clipped ratio loss and its statistics.

Per token d_t = logp_t - logp_old_t (fp32), per sequence Delta_i = sum_t d_t. The ratio is
exp(Delta_i) ("trajectory", TIC-GRPO), exp(Delta_i / L_i) ("sequence_mean", GSPO), exp(d_t)
("token", GRPO/DAPO) or absent ("none": J = A_i logp_t). The log-ratio is capped to
[-max_log_ratio, max_log_ratio] before exp (gradient 0 beyond), then clipped:
J = min(x A, clip(x) A) [max(J, c A) for A < 0 with dual_clip=c], minus beta * k3-KL, and the
loss is -aggregate(J). See SPEC op 4 for the gradient of every mode.
"""
from __future__ import annotations

from . import reference
from . import validation as check


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
    check.loss_options(ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                       ref_logprobs, beta, num_tokens, num_sequences, max_len, mask is not None)
    check.loss_inputs(logprobs, "logprobs", cu_seqlens, mask, old_logprobs, advantages,
                      ref_logprobs, logprobs)
    return reference.tic_loss_from_logprobs(
        logprobs, old_logprobs, advantages, cu_seqlens=cu_seqlens, mask=mask, ratio=ratio,
        clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        max_log_ratio=max_log_ratio, aggregation=aggregation, ref_logprobs=ref_logprobs,
        beta=beta, num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len)
