"""Op 4 on per-token log-probabilities: the clipped ratio loss and its statistics.

Per token d_t = logp_t - logp_old_t (fp32), per sequence Delta_i = sum_t d_t. The ratio is
exp(Delta_i) ("trajectory", TIC-GRPO), exp(Delta_i / L_i) ("sequence_mean", GSPO), exp(d_t)
("token", GRPO/DAPO) or absent ("none": J = A_i logp_t). The log-ratio is capped to
[-max_log_ratio, max_log_ratio] before exp (gradient 0 beyond), then clipped:
J = min(x A, clip(x) A) [max(J, c A) for A < 0 with dual_clip=c], minus beta * k3-KL, and the
loss is -aggregate(J). See docs/spec.md, op 4, for the gradient of every mode.

The kernels (ops/ratio_loss_kernels.py) run one program per sequence, two passes over its
tokens, then one program that reduces the per-sequence sums in a fixed order: the loss, its
statistics, and each token's gradient coefficient, so that the backward is one multiply.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import reference
from .. import validation as check
from ..backend import (BLOCK_TOKENS, dense, first_order_only, flat, grads_by_name,
                       inputs_by_name, kernel_segments, launch, segments, triton_op, use_triton)
from ..config import LossConfig
from ..output import LossOutput, Stats
from .ratio_loss_kernels import (AGG_CODE, BLOCK_SEQS, NPART, STAT_KEYS,
                                 _ratio_loss_finalize_kernel, _ratio_loss_fwd_kernel,
                                 rollout_code)
from .ratio_objectives import OBJECTIVE_CODE, RATIO_CODE
from .token_selection import token_flags


def _finalize_args(config):
    """The finalize's scalar arguments and switches (both kernels take them)."""
    c = config
    return ((0.0 if c.num_tokens is None else c.num_tokens,
             0.0 if c.num_sequences is None else c.num_sequences,
             1.0 if c.max_len is None else c.max_len, c.entropy_coef),
            dict(RATIO=RATIO_CODE[c.ratio], AGG=AGG_CODE[c.aggregation],
                 GIVEN_TOKENS=c.num_tokens is not None,
                 GIVEN_SEQUENCES=c.num_sequences is not None,
                 RW_PER_SEQ=c.rollout_per_sequence))


@functools.lru_cache(maxsize=256)
def _fwd_args(config):
    """The per-sequence kernel's scalar arguments and switches that the config alone decides
    (made once per config: a call's host time)."""
    c = config
    scalars, switches = _finalize_args(c)
    return ((c.eps_low, c.eps_high, 0.0 if c.dual_clip is None else c.dual_clip,
             0.0 if c.delta is None else c.delta, *c.objective_parameters, c.max_log_ratio,
             c.beta, c.rollout_is_min, c.rollout_is_max,
             0.0 if c.off_policy_mask_threshold is None else c.off_policy_mask_threshold,
             *scalars),
            dict(TWO_SIDED=c.clip_mode == "two_sided", DUAL=c.dual_clip is not None,
                 PER_SEQ_MEAN=c.aggregation == "seq-mean-token-mean", KL_IN_LOSS=c.beta > 0,
                 ROLLOUT=rollout_code(c), RW_MASK=c.rollout_masks, **switches,
                 OBJECTIVE=OBJECTIVE_CODE[c.objective], HAS_DELTA=c.delta is not None,
                 KL_BIAS=c.kl_bias_correction, OPSM=c.off_policy_mask_threshold is not None,
                 TOP_ENTROPY=c.top_entropy_quantile < 1.0, BLOCK=BLOCK_TOKENS,
                 BLOCK_B=BLOCK_SEQS))


def launch_ratio_fwd(logp, old, ref, entropy, advantages, cu, mask, rollout, coef, coef_ent,
                     part, config, T=0, B=None, finalize=None, flags=None):
    """The per-sequence pass over B sequences: [cu[i], cu[i + 1]) (cu int32 or int64, row
    offsets into the flat per-token tensors, which are indexed globally), or with cu None
    the rows [i T, (i + 1) T) of a padded batch. Writes their tokens' coef and coef_ent and
    their rows of ``part`` (B, NPART). The fused LM head runs it on a slice of the sequences
    at a time, or on every sequence clipped to a range of rows. Optional inputs may be None;
    ``mask`` flat, of any dtype; ``rollout`` the sampler correction's tensor (config.rollout
    says which) over the same flat positions; ``flags`` token_flags' over them (needed with
    objective "kl_cov" and top_entropy_quantile < 1). ``finalize`` (loss, stats, norm,
    counter): the last program also reduces ``part`` into them (counter: an int32 holding 0),
    one launch in all."""
    B = cu.numel() - 1 if B is None else B
    if B:
        scalars, switches = _fwd_args(config)
        loss, stats, norm, counter = finalize if finalize is not None else (part,) * 4
        launch(_ratio_loss_fwd_kernel, (B,),
            logp, old, logp if ref is None else ref, logp if entropy is None else entropy,
            advantages, logp if cu is None else cu, logp if mask is None else mask,
            logp if rollout is None else rollout, logp if flags is None else flags, coef,
            coef if coef_ent is None else coef_ent, part, loss, stats, norm, counter,
            logp.numel(), T, B, *scalars,
            HAS_MASK=mask is not None, HAS_REF=ref is not None, HAS_ENT=entropy is not None,
            PADDED=cu is None, FINALIZE=finalize is not None, **switches)
    if finalize is not None and not B:  # no program to finish last: the loss of nothing
        launch_finalize(part, *finalize[:3], config)


def launch_finalize(part, loss, stats, norm, config):
    """Reduces ``part`` (B, NPART) into loss (), stats (len(STAT_KEYS),) and norm ()."""
    scalars, switches = _finalize_args(config)
    launch(_ratio_loss_finalize_kernel, (1,), part, loss, stats, norm, part.shape[0], *scalars,
           **switches, BLOCK=BLOCK_SEQS)


def new_partials(B, device):
    """Buffers of the loss's reduction: part (B, NPART), loss (), stats (len(STAT_KEYS),),
    norm ()."""
    def f32(*shape):
        return torch.empty(*shape, dtype=torch.float32, device=device)
    return f32(B, NPART.value), f32(()), f32(len(STAT_KEYS)), f32(())


@triton_op("tic_kernels::ratio_loss", mutates_args=())
def ratio_loss(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, cu: torch.Tensor,
               mask: Optional[torch.Tensor], ref: Optional[torch.Tensor],
               entropy: Optional[torch.Tensor], rollout: Optional[torch.Tensor], config: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (len(STAT_KEYS),), coef (R,), coef_entropy (R,) or (0,), norm) over flat
    per-token tensors of R positions split by the segments (cu, mask); ``config`` an encoded
    LossConfig, ``rollout`` its sampler correction's tensor; see the module docstring."""
    loss, stats, coef, coef_ent, norm = kernel_ratio_loss(logp, old, advantages, cu, mask, ref,
                                                          entropy, rollout,
                                                          LossConfig.decode(config))
    return loss, stats, coef, coef.new_empty(0) if coef_ent is None else coef_ent, norm


def kernel_ratio_loss(logp, old, advantages, cu_seqlens, mask, ref, entropy, rollout, config,
                      counter=None):
    """Op 4 on the launchers: (loss, stats (len(STAT_KEYS),), coef (R,), coef_entropy (R,) or
    None without the entropy, norm). The per-token tensors are read as they come
    (contiguous, any shape), split by ``cu_seqlens`` (int32 or int64; ``mask`` then of R
    entries or None) or, without it, by the rows of a padded (B, T) ``mask`` of any dtype;
    ``config`` a LossConfig. ``counter``: an int32 that a kernel launched before set to 0
    (then one launch in all, else two)."""
    cu, B, T = kernel_segments(cu_seqlens, mask)
    dev, R = logp.device, logp.numel()
    coef = torch.empty(R, dtype=torch.float32, device=dev)
    coef_ent = None if entropy is None else torch.empty(R, dtype=torch.float32, device=dev)
    part, loss, stats, norm = new_partials(B, dev)
    flags = token_flags(config, logp, entropy, advantages, cu, mask, T)
    launch_ratio_fwd(dense(logp), dense(old), dense(ref), dense(entropy), dense(advantages),
                     cu, dense(mask), dense(rollout), coef, coef_ent, part, config, T, B,
                     None if counter is None else (loss, stats, norm, counter), flags)
    if counter is None:
        launch_finalize(part, loss, stats, norm, config)
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
    ctx.entropy_coef = LossConfig.decode(args["config"]).entropy_coef
    ctx.with_entropy = args["entropy"] is not None


@first_order_only
def _backward(ctx, g_loss, *_unused):
    coef, coef_ent, norm = ctx.saved_tensors
    g_logp, g_entropy = scaled_coefficients(g_loss, norm, coef, coef_ent, ctx.entropy_coef,
                                            ctx.with_entropy)
    return grads_by_name(ratio_loss, logp=g_logp, entropy=g_entropy)


ratio_loss.register_autograd(_backward, setup_context=_setup_context)


def stats_dict(stats, config):
    """The statistics reported, by name, in sorted order, detached (the loss op's stats output
    is a function of logp to autograd, though never differentiated): a Stats, whose views are
    made when first read; a dict while torch.compile traces (its graph returns the values)."""
    if torch.compiler.is_compiling():  # (it warns on tracing an lru_cache)
        values = stats.detach().unbind(0)
        return {k: values[STAT_KEYS.index(k)] for k in _reported(config)}
    # (the ratio_loss op's stats have a graph: held detached, they do not keep it alive)
    return Stats(stats.detach() if stats.requires_grad else stats, _reported_index(config))


def _reported(config):
    """The names of the statistics a config reports, sorted: the entropy's, the KL's and the
    sampler correction's only when computed, its k3 only from the sampler's log-probs."""
    def reported(k):
        if k.startswith("rollout_"):
            return config.rollout != "" and (k != "rollout_kl" or config.rollout != "weights")
        return (k != "entropy_mean" or config.with_entropy) and (k != "kl_mean" or config.ref)
    return tuple(sorted(filter(reported, STAT_KEYS)))


@functools.lru_cache(maxsize=256)
def _reported_index(config):
    """{name: its position in STAT_KEYS} of the statistics a config reports, sorted."""
    return {k: STAT_KEYS.index(k) for k in _reported(config)}


def loss_on_segments(logp, old, advantages, cu_seqlens, mask, ref_logprobs, entropy, rollout,
                     config):
    """Runs the ratio_loss op on either layout (``rollout``: the sampler correction's tensor
    of ``config``); returns (loss, stats (len(STAT_KEYS),), coef, coef_ent, norm)
    (stats_dict names the statistics)."""
    cu, flat_mask = segments(cu_seqlens, mask, logp.device)
    return ratio_loss(flat(logp), flat(old), advantages.detach().float(), cu, flat_mask,
                      flat(ref_logprobs), flat(entropy),
                      None if rollout is None else flat(rollout.detach()), config.encode())


def tic_loss_from_logprobs(logprobs, old_logprobs, advantages, *, cu_seqlens=None, mask=None,
                           ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                           dual_clip=None, max_log_ratio=20.0, aggregation=None,
                           ref_logprobs=None, beta=0.0, num_tokens=None, num_sequences=None,
                           max_len=None, rollout_logprobs=None, rollout_is=None,
                           rollout_is_max=None, rollout_is_min=None, rollout_weights=None,
                           objective="clip", delta=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                           dro_beta=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                           vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_cov_ratio=None,
                           kl_cov_coef=None, kl_bias_correction=False,
                           off_policy_mask_threshold=None, top_entropy_quantile=1.0,
                           entropy=None):
    """The TIC-GRPO / GSPO / GRPO (and CISPO, SAPO, DPPO, DRO, GMPO, VESPO, KL-Cov) loss from
    log-probabilities the caller already has.

    Args:
        logprobs: per-token log-probabilities under the current policy, packed (N,) with
            ``cu_seqlens`` (B+1,) int32 or int64, or padded (B, T) with ``mask`` (B, T). Any float
            dtype.
        old_logprobs, ref_logprobs: the same shape, from the sampling and reference policies.
        advantages: (B,) per sequence.
        ratio: "trajectory" (default), "sequence_mean", "token" or "none".
        clip_mode: "two_sided" or "upper"; eps_low in [0, 1), eps_high >= 0; dual_clip > 1.
        max_log_ratio: cap on |log-ratio| (and on the KL's log-ratio) before exp.
        aggregation: None (the mode's default: "token-mean" for token, else
            "seq-mean-token-mean"), "token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (normaliser B * max_len; max_len defaults to T when padded).
        objective: what each unit's ratio x (a token's, or its sequence's) makes of the
            advantage A (docs/spec.md, op 4): "clip" (default), min(x' A, clip(x) A) with x'
            = min(x, ``delta``) when delta is given (INTELLECT-2's bound, TRL's ``delta``);
            "cispo", sg(clip(x)) A log pi per token (the clip band of clip_mode, eps_low,
            eps_high: verl's two-sided clip, or TRL's absolute cap epsilon_high with
            clip_mode="upper" and eps_high = epsilon_high - 1); "sapo", the soft gate
            sigmoid(tau (x - 1)) 4 / tau A with tau = ``sapo_tau_pos`` for A > 0 else
            ``sapo_tau_neg``; "dppo_tv" / "dppo_kl", DPPO's detached ratio (at most delta)
            on log pi inside a trust region of the token's probability (eps_low / eps_high
            bound the change of p, or the binary KL); "dro", A log pi - dro_beta / 2
            (log pi - log pi_old)^2 per token (verl's DRO; ``dro_beta`` > 0, its log-ratio not
            capped); "gmpo", x A with x = exp(mean_t d'_t), each token's log-ratio d_t
            clipped on its advantage's side (min(d_t, eps_high) for A > 0, max(d_t,
            -eps_low) for A < 0: GMPO, verl's geo_mean); "vespo", phi(w) A log pi per
            token with the detached gamma weight phi(w) = exp(lambda + k log w - lambda w)
            of the trajectory's log-weight log w = sum_t clamp(log-ratio_t, +-max_log_ratio)
            (plus the sampler's log-weights, which then do not multiply the loss), clamped
            to [log 1e-8, 20]; (k, lambda) = (``vespo_k_pos``, ``vespo_lambda_pos``) for
            A >= 0, else (``vespo_k_neg``, ``vespo_lambda_neg``), lambda at least 1e-4
            (TRL's vespo; the unit's ratio serves the KL's bias correction and the
            statistics); "kl_cov", KL-Cov (verl's kl_cov): the unclipped x A per token,
            less ``kl_cov_coef`` (None: 0.1) times |log pi - log pi_old| (not capped) on
            the max(1, floor(``kl_cov_ratio`` N)) of the batch's N loss tokens (None:
            0.0002) whose covariance (A - mean A)(sg(log pi) - mean sg(log pi)) (means over
            the N tokens) is largest, ties to the earlier position; the selection is made on
            the device (no host sync) and clip_fraction reports the share it penalises.
            Only clip takes dual_clip; "none" has no ratio for the others; the DPPOs, DRO
            and kl_cov take the token ratio, gmpo sequence_mean.
        beta: weight of the k3 KL to ``ref_logprobs``, added per token inside the aggregation;
            ``kl_bias_correction=True`` multiplies each token's KL by its unit's ratio x (not
            detached), TRL's ``use_bias_correction_kl``.
        off_policy_mask_threshold: None (default), or a number: the off-policy sequence mask
            (DeepSeek-V3.2's, TRL's option of the same name) drops the policy objective of a
            sequence with A < 0 whose mean over its tokens of sg(reference_t - logp_t)
            exceeds it, the reference being rollout_logprobs when given, else old_logprobs
            (a NaN difference counts 0). The KL and entropy terms and the normalisers keep
            the sequence.
        top_entropy_quantile: 1.0 (default: every token), or the share rho in (0, 1] of the
            batch's loss tokens whose policy objective counts: those whose entropy is at
            least the (1 - rho)-quantile of the batch's entropies (linear interpolation,
            torch.quantile's; TRL's option of the same name, within one process). The KL
            term and the normalisers keep every token; chosen on the device, no host sync.
            tic_kernels.tic_loss and linear_tic_loss compute the entropies themselves; here
            ``entropy`` must give them, laid out like logprobs (read detached; it also adds
            the entropy_mean statistic), and is refused otherwise.
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
    config, rollout = LossConfig.of(
        ratio=ratio, clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high,
        dual_clip=dual_clip, max_log_ratio=max_log_ratio, aggregation=aggregation, beta=beta,
        entropy_coef=0.0, temperature=1.0, num_tokens=num_tokens,
        num_sequences=num_sequences, max_len=max_len,
        ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, rollout_is=rollout_is,
        rollout_is_max=rollout_is_max, rollout_is_min=rollout_is_min,
        rollout_weights=rollout_weights, mask=mask, objective=objective, delta=delta,
        sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, kl_cov_ratio=kl_cov_ratio, kl_cov_coef=kl_cov_coef,
        kl_bias_correction=kl_bias_correction,
        off_policy_mask_threshold=off_policy_mask_threshold,
        top_entropy_quantile=top_entropy_quantile)
    if (entropy is None) != (config.top_entropy_quantile == 1.0):
        raise ValueError("entropy is read by the top-entropy selection alone: pass it (per token, "
                         "like logprobs) exactly when top_entropy_quantile < 1, got "
                         f"top_entropy_quantile={top_entropy_quantile!r} and entropy "
                         f"{'None' if entropy is None else 'given'}")
    with check.one_read():
        check.loss_inputs(logprobs, "logprobs", cu_seqlens, mask, old_logprobs, advantages,
                          ref_logprobs, ("logprobs", logprobs), max_len,
                          config.rollout_inputs(rollout))
        if entropy is not None:
            check.float_tensor("entropy", entropy)
            check.shape("entropy", entropy, logprobs.shape, " (logprobs' shape)")
            check.same_device("logprobs", logprobs, entropy=entropy)
            entropy = entropy.detach()
    if not use_triton(logprobs):
        return reference.tic_loss_from_logprobs(logprobs, old_logprobs, advantages,
                                                cu_seqlens=cu_seqlens, mask=mask,
                                                ref_logprobs=ref_logprobs, entropy=entropy,
                                                **config.reference_keywords(rollout))
    loss, stats, *_ = loss_on_segments(logprobs, old_logprobs, advantages, cu_seqlens, mask,
                                       ref_logprobs, entropy, rollout, config)
    return LossOutput(loss, stats_dict(stats, config))
