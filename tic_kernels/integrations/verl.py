"""tic_kernels' losses as verl policy losses (``actor_rollout_ref.actor.policy_loss.loss_mode``).

Importing this module registers thirteen losses with verl's ``register_policy_loss``
(``verl.trainer.ppo.core_algos``); ``register()`` does it again (idempotent), for a registry
that was reset. ``import tic_kernels`` never imports verl; only this module does.

=============  =================================================================================
loss_mode      what tic_kernels computes (``tic_loss_from_logprobs``)
=============  =================================================================================
``tic``        TIC-GRPO: trajectory ratio exp(sum_t (log_prob - old_log_prob)), two-sided clip
               [1 - clip_ratio_low, 1 + clip_ratio_high], verl's dual clip ``clip_ratio_c`` for
               negative advantages (as verl's ``vanilla`` applies it, always).
``tic_upper``  the same with the upper-only clip (``clip_mode="upper"``, eps_high =
               clip_ratio_high: the paper's), dual clip ``clip_ratio_c`` too.
``tic_gspo``   GSPO, ratio exp(mean_t (log_prob - old_log_prob)): equals verl's ``gspo``
               (``compute_policy_loss_gspo``) in value and gradient, its log-ratio capped at 10
               as verl's is, no dual clip (verl's gspo has none).
``tic_token``  the per-token ratio (GRPO / DAPO / PPO): equals verl's ``vanilla``
               (``compute_policy_loss_vanilla``) in value and gradient, dual clip included.
``tic_cispo``  CISPO: each token's log-probability weighted by its detached token ratio
               clamped to [1 - clip_ratio_low, 1 + clip_ratio_high]; equals verl's ``cispo``.
``tic_sapo``   SAPO: the soft gate sigmoid(tau (r - 1)) 4 / tau of the token ratio, tau =
               ``tau_pos`` for A > 0 else ``tau_neg``; equals verl's ``sapo``, which
               aggregates "seq-mean-token-mean" whatever loss_agg_mode says (so does this).
``tic_gpg``    GPG: -A log pi (tic_kernels' ratio "none"); equals verl's ``gpg``.
``tic_dppo_tv``  DPPO: each token's log-probability weighted by its detached ratio, capped
``tic_dppo_kl``  at ``clip_ratio_c``, where its probability moved within the trust region
               (clip_ratio_low / clip_ratio_high on p - p_old, or on the binary KL); equal
               to verl's ``dppo_tv`` / ``dppo_kl``.
``tic_dro``    DRO: A log_prob - dro_beta / 2 (log_prob - old_log_prob)^2 per token,
               ``config.policy_loss.dro_beta`` > 0; equals verl's ``dro`` (loss, gradient and
               its one metric, ``actor/ppo_kl``).
``tic_geo_mean``  GMPO: exp of the mean over the response of each token's log-ratio clipped
               on its advantage's side (at clip_ratio_high for A > 0, -clip_ratio_low for
               A < 0), times A, averaged over the micro-batch's rows whatever loss_agg_mode
               and global_batch_info say, rollout_is_weights entering as each sequence's
               geometric mean; equals verl's ``geo_mean``.
``tic_clip_cov``  Clip-Cov: the token ratio's clipped objective (no dual clip) with the
               gradient cut at a few unclipped tokens of high advantage-logp covariance,
               drawn at random as verl draws them (``policy_loss.clip_cov_ratio``,
               ``clip_cov_lb``, ``clip_cov_ub``; one host read for the count); equals verl's
               ``clip_cov`` under the same torch random state.
``tic_kl_cov``  KL-Cov: the token ratio unclipped, -A r, plus ``policy_loss.ppo_kl_coef`` times
               |log_prob - old_log_prob| on the max(1, int(``policy_loss.kl_cov_ratio`` N))
               response tokens of largest advantage-logp covariance; equals verl's
               ``kl_cov`` (its metric ``actor/ppo_kl``: the mean |log-ratio|). The selection
               runs on the device without a host sync (verl's copies to the host); tied
               covariances go to the earlier token, where verl's top-k picks among them as
               torch.topk does.
=============  =================================================================================

Arguments and result are those of verl's own policy losses: ``(old_log_prob, log_prob,
advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` with (B, T) tensors,
returning ``(loss, metrics)``. ``loss`` is tic_kernels' scalar (float32; float64 for float64
inputs), times ``dp_size`` as in verl's ``agg_loss``; ``metrics`` holds Python floats: verl's
``actor/pg_clipfrac``, ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower`` with verl's definitions
(token-weighted means over the response mask; for the sequence ratios every token carries its
sequence's decision, as in verl's gspo), plus tic_kernels' statistics as ``actor/tic_<name>``
(clip_fraction, ratio_mean, ratio_max, cap_fraction, delta_abs_mean, logp_mean, and
rollout_is_mean, ..., rollout_ess when rollout_is_weights are given; see
``tic_kernels.LossOutput``). All metrics come back to the host in one read, as verl's own
``.item()`` calls do.

**Advantages.** tic_kernels takes one advantage per sequence. verl passes (B, T) advantages;
the outcome estimators (grpo, rloo, reinforce_plus_plus, remax, opo, gpg, ...) broadcast one
value over each response, and these losses take it. Advantages that vary over a sequence's
response tokens (GAE, or any token-level estimator) raise a ValueError for every mode,
``tic_token`` included: use verl's ``vanilla`` there. The check compares each sequence's
largest and smallest advantage over its response tokens (tolerance 1e-5 * max(1, |A|)) and
reads one boolean back to the host; like tic_kernels' own value checks it is skipped under
``TIC_KERNELS_CHECK_VALUES=0`` and while torch.compile traces (the loss then uses each
sequence's largest advantage over its response tokens).

**Aggregation** (``actor.loss_agg_mode``) maps to tic_kernels' aggregation of the same name,
with verl's global normalisers from ``config.global_batch_info`` (set by verl's ``ppo_loss``
before each micro-batch): "token-mean" divides by ``batch_num_tokens`` (``num_tokens``), the
seq-mean modes by ``global_batch_size`` (``num_sequences``), each times ``dp_size``; without
them (``dp_size`` 1) the micro-batch's own counts (its tokens; its non-empty sequences), as
verl's ``agg_loss``. "seq-mean-token-sum-norm" is "seq-mean-token-sum" divided further by
``global_batch_info["loss_scale_factor"]`` or, when that is None, by the mask's T: any value
> 0, as verl accepts it (a factor shorter than the longest response included). "token-sum" is
"token-mean" with ``num_tokens=1`` (times ``dp_size``). Other modes raise a ValueError.

**Errors** raised through these losses name verl's arguments and config keys (``log_prob``,
``old_log_prob``, ``response_mask``, ``rollout_is_weights``, ``config.clip_ratio_low``, ...),
not tic_kernels' own.

**rollout_is_weights** (verl's rollout correction) are passed to tic_kernels as
``rollout_weights``: each token's objective is multiplied by its detached weight before the
aggregation, which is exactly verl's ``pg_losses * rollout_is_weights`` for ``tic_token``. For
the sequence ratios the weighted loss is a function of one ratio per sequence, so a token's
gradient is its sequence's summed weight times the ratio's derivative (tic_kernels' definition).
verl's gspo instead writes its ratio per token as sg[s_i] * pi_t / sg[pi_t] (the "GSPO-token"
form), which sends each token's weight to that token's gradient alone: the two agree when the
weights are constant over each sequence (verl's rollout_is="sequence") and differ for
token-level weights. ``tic_gspo`` follows verl: with rollout_is_weights it evaluates that
GSPO-token form with tic_kernels' token ratio (old log-probs shifted to log_prob - sg[mean_t
log-ratio], so that each token's ratio is the sequence's s_i); its ``actor/tic_*`` statistics
are then per token (clip_fraction, ratio_mean) rather than per sequence. ``tic`` and
``tic_upper`` keep tic_kernels' definition.

**Differences from verl that remain** (all but the last two at the level of rounding): tic_kernels
computes in float32 (float64 inputs: in float64, on its reference path), verl in the inputs'
dtype; verl's "seq-mean-token-mean" divides by L + 1e-8, tic_kernels by L; ``tic_gspo`` caps the mean
log-ratio to [-10, 10] where verl caps it above only, so a sequence with mean log-ratio below
-10 (ratio < 4.6e-5) contributes exp(-10) * A and no gradient instead of its (smaller) ratio;
``tic_geo_mean`` caps GMPO's mean clipped log-ratio at +-20 where verl leaves it uncapped (they
differ only for a mean beyond 20 in magnitude, A < 0 above or A > 0 below); ``tic_kl_cov``
caps its ratio's log at +-20 where verl's does not, and takes the earliest of tokens whose
covariances tie at the selection's edge.

Using it in verl: make every worker import this module, e.g.
``actor_rollout_ref.model.external_lib=tic_kernels.integrations.verl`` (verl imports it in
each process that builds the model config) or ``VERL_USE_EXTERNAL_MODULES=
tic_kernels.integrations.verl`` in the workers' environment, and select
``actor_rollout_ref.actor.policy_loss.loss_mode=tic`` (or another name of LOSS_MODES).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

from verl.trainer.ppo import core_algos as _core_algos

from .. import validation as _check
from ..reference.loss import dppo_weight as _dppo_weight
from ._names import renamer
from ..ops.ratio_loss import tic_loss_from_logprobs

__all__ = ["LOSS_MODES", "METRIC_PREFIX", "compute_policy_loss_tic",
           "compute_policy_loss_tic_cispo", "compute_policy_loss_tic_clip_cov",
           "compute_policy_loss_tic_dppo_kl",
           "compute_policy_loss_tic_dppo_tv", "compute_policy_loss_tic_dro",
           "compute_policy_loss_tic_geo_mean", "compute_policy_loss_tic_gpg",
           "compute_policy_loss_tic_gspo", "compute_policy_loss_tic_kl_cov",
           "compute_policy_loss_tic_sapo",
           "compute_policy_loss_tic_token", "compute_policy_loss_tic_upper", "register"]

# tic_kernels' own statistics are reported as METRIC_PREFIX + their name
METRIC_PREFIX = "actor/tic_"

# verl's clamp of the log-ratio: vanilla clamps it to [-20, 20], gspo above at 10
_VANILLA_CAP = 20.0
_GSPO_CAP = 10.0

# loss_agg_mode -> tic_kernels' aggregation ("token-sum" is token-mean over num_tokens=1)
_AGGREGATIONS = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",  # then divided by loss_scale_factor
}

# tic_kernels' argument names -> verl's, in the errors raised through this adapter
_VERL_NAMES = {
    "logprobs": "log_prob", "old_logprobs": "old_log_prob", "mask": "response_mask",
    "rollout_weights": "rollout_is_weights", "eps_low": "config.clip_ratio_low",
    "eps_high": "config.clip_ratio_high", "dual_clip": "config.clip_ratio_c",
    "num_tokens": "config.global_batch_info['batch_num_tokens']",
    "num_sequences": "config.global_batch_info['global_batch_size']",
    "aggregation": "loss_agg_mode", "sapo_tau_pos": "config.tau_pos",
    "sapo_tau_neg": "config.tau_neg", "delta": "config.clip_ratio_c",
    "dro_beta": "config.policy_loss.dro_beta",
    "kl_cov_ratio": "config.policy_loss.kl_cov_ratio",
    "kl_cov_coef": "config.policy_loss.ppo_kl_coef",
}
_in_verl_terms = renamer(_VERL_NAMES)

# loss_mode -> (tic_kernels ratio, clip_mode, dual clip from clip_ratio_c, |log-ratio| cap,
# objective)
_MODES = {
    "tic": ("trajectory", "two_sided", True, _VANILLA_CAP, "clip"),
    "tic_upper": ("trajectory", "upper", True, _VANILLA_CAP, "clip"),
    "tic_gspo": ("sequence_mean", "two_sided", False, _GSPO_CAP, "clip"),
    "tic_token": ("token", "two_sided", True, _VANILLA_CAP, "clip"),
    "tic_cispo": ("token", "two_sided", False, _VANILLA_CAP, "cispo"),
    "tic_sapo": ("token", "two_sided", False, _VANILLA_CAP, "sapo"),
    "tic_gpg": ("none", "two_sided", False, _VANILLA_CAP, "clip"),
    "tic_dppo_tv": ("token", "two_sided", False, _VANILLA_CAP, "dppo_tv"),
    "tic_dppo_kl": ("token", "two_sided", False, _VANILLA_CAP, "dppo_kl"),
    "tic_dro": ("token", "two_sided", False, _VANILLA_CAP, "dro"),
    "tic_geo_mean": ("sequence_mean", "two_sided", False, _VANILLA_CAP, "gmpo"),
    "tic_clip_cov": ("token", "two_sided", False, _VANILLA_CAP, "clip"),
    "tic_kl_cov": ("token", "two_sided", False, _VANILLA_CAP, "kl_cov"),
}


def _get(config, key, default=None):
    """config.key for verl's ActorConfig (a dataclass with .get) or an omegaconf DictConfig."""
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _number(name, value):
    """A Python float from an int, float or one-element tensor (one host read)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"config.global_batch_info[{name!r}] must be a number, got {value!r}")
    return float(value)


def _policy_option(config, key, default=None):
    """config.policy_loss.<key> (verl's PolicyLossConfig), ``default`` where it is unset."""
    value = _get(_get(config, "policy_loss", None) or {}, key, None)
    return default if value is None else value


def _clip_ratios(config, loss_mode, dual=True):
    """(eps_low, eps_high, clip_ratio_c) as verl's vanilla reads them; ``dual``: clip_ratio_c
    is the dual clip, which must exceed 1 (the DPPOs' cap on their weight need not)."""
    if config is None:
        raise ValueError(f"policy loss {loss_mode!r} needs the actor config (clip ratios)")
    clip_ratio = _get(config, "clip_ratio")
    low = _get(config, "clip_ratio_low")
    high = _get(config, "clip_ratio_high")
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    if low is None or high is None:
        raise ValueError(f"policy loss {loss_mode!r}: the config sets neither clip_ratio_low/high "
                         "nor clip_ratio")
    clip_c = float(_get(config, "clip_ratio_c", 3.0))
    if dual and not clip_c > 1.0:
        raise ValueError(f"config.clip_ratio_c (the dual clip of negative advantages) must be > 1, "
                         f"got {clip_c!r}")
    return float(low), float(high), clip_c


def _aggregation(loss_agg_mode, config, response_mask):
    """(tic_kernels keywords, factor on the loss) mirroring verl's agg_loss with the config's
    global_batch_info (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    "seq-mean-token-sum-norm" is "seq-mean-token-sum" divided by loss_scale_factor (by T when
    it is None), which verl accepts at any value > 0, shorter than a response included."""
    if loss_agg_mode not in _AGGREGATIONS:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not supported by tic_kernels' verl "
                         "losses; accepted values: " + ", ".join(repr(m) for m in _AGGREGATIONS))
    info = _get(config, "global_batch_info", None) or {}
    dp_size = info.get("dp_size", 1)
    dp_size = 1 if dp_size is None else int(_number("dp_size", dp_size))
    keywords = dict(aggregation=_AGGREGATIONS[loss_agg_mode])
    factor = float(dp_size)
    if loss_agg_mode == "token-sum":
        keywords["num_tokens"] = 1.0
    elif loss_agg_mode == "token-mean":
        batch_num_tokens = info.get("batch_num_tokens")
        if batch_num_tokens is not None:
            keywords["num_tokens"] = _number("batch_num_tokens", batch_num_tokens)
        elif dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1 "
                             "(config.global_batch_info, set by verl's ppo_loss)")
    else:
        global_batch_size = info.get("global_batch_size")
        if global_batch_size is not None:
            keywords["num_sequences"] = _number("global_batch_size", global_batch_size)
        elif dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1 "
                             "(config.global_batch_info, set by verl's ppo_loss)")
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = info.get("loss_scale_factor")
            scale = (float(response_mask.shape[-1]) if scale is None
                     else _number("loss_scale_factor", scale))
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"config.global_batch_info['loss_scale_factor'] must be a "
                                 f"finite number > 0 (None: the response length), got {scale!r}")
            factor /= scale
    return keywords, factor


def _sequence_advantages(advantages, response_mask, loss_mode):
    """(B,) advantages from verl's (B, T), which must hold one value per response (a value
    check, skippable like tic_kernels' own)."""
    _check.float_tensor("advantages", advantages)
    if advantages.dim() != 2 or advantages.shape != response_mask.shape:
        raise ValueError(f"advantages must be (B, T) like response_mask "
                         f"{tuple(response_mask.shape)}, got shape {tuple(advantages.shape)}")
    adv = advantages.detach()
    keep = response_mask.bool()
    has_tokens = keep.any(dim=-1)
    largest = torch.where(keep, adv, -math.inf).amax(dim=-1)
    per_seq = torch.where(has_tokens, largest, 0.0)
    if _check.checking_values(advantages, response_mask):
        smallest = torch.where(keep, adv, math.inf).amin(dim=-1)
        spread = torch.where(has_tokens, largest - smallest, 0.0)
        varies = spread > 1e-5 * torch.maximum(largest.abs(), smallest.abs()).clamp(min=1.0)

        def error():
            i = int(varies.nonzero()[0, 0])
            raise ValueError(
                f"policy loss {loss_mode!r} takes one advantage per sequence, but sequence {i}'s "
                f"advantages vary over its response tokens (from {smallest[i].item():.6g} to "
                f"{largest[i].item():.6g}), as a token-level estimator such as GAE gives. Use an "
                "outcome-level estimator (grpo, rloo, reinforce_plus_plus, ...) or verl's own "
                "'vanilla' loss for token-level advantages.")
        _check.value_check(varies.any(), error)
    return per_seq


@torch.no_grad()
def _verl_metrics(log_ratio, keep, adv, level, eps_low, eps_high, upper, clip_c, cap_lo, cap_hi):
    """verl's pg_clipfrac, ppo_kl and pg_clipfrac_lower (0-d tensors), with its definitions:
    token-weighted means over the mask; ``level`` "token" or "trajectory" / "sequence_mean"."""
    m = keep.to(log_ratio.dtype)
    d = log_ratio * m
    n = m.sum()
    # ppo_kl of the log-ratio clamped to +-20 as verl's vanilla has it (its gspo: unclamped)
    kl_log = d if level == "sequence_mean" else log_ratio.clamp(-_VANILLA_CAP, _VANILLA_CAP) * m
    ppo_kl = -kl_log.sum() / (n + 1e-8)
    if level == "token":
        x_log, A, weight = d, adv.unsqueeze(-1), m
    else:
        lengths = m.sum(dim=-1)
        x_log = d.sum(dim=-1)
        if level == "sequence_mean":
            x_log = x_log / lengths.clamp(min=1.0)
        A, weight = adv, lengths
    x = torch.exp(x_log.clamp(min=cap_lo, max=cap_hi))
    xc = x.clamp(max=1.0 + eps_high) if upper else x.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped, constant = A * x, A * xc
    clipped = unclipped > constant  # verl: -A clip(x) > -A x
    if clip_c is None:
        lower = torch.zeros_like(clipped)
    else:  # verl: max(-A x, -A clip(x)) > -A c for A < 0
        lower = (A < 0) & (torch.minimum(unclipped, constant) < A * clip_c)
    return {
        "actor/pg_clipfrac": (clipped.to(m.dtype) * weight).sum() / (n + 1e-8),
        "actor/ppo_kl": ppo_kl,
        "actor/pg_clipfrac_lower": (lower.to(m.dtype) * weight).sum() / (n + 1e-8),
    }


@torch.no_grad()
def _verl_objective_metrics(loss_mode, log_ratio, keep, eps_low, eps_high, clip_c, logp, old,
                            adv):
    """verl's metrics of cispo (pg_clipfrac: the tokens whose ratio the band moved), sapo
    (no clipping: 0), the DPPOs (pg_clipfrac: the tokens outside the trust region;
    pg_clipfrac_lower: those inside it whose ratio exceeds clip_ratio_c), dro (ppo_kl of the
    log-ratio, unclamped, alone), kl_cov (its mean |log-ratio|, alone), geo_mean (the tokens
    whose log-ratio lies outside [-clip_ratio_low, clip_ratio_high], for A > 0 and A < 0)
    and gpg (none)."""
    if loss_mode == "tic_gpg":
        return {}
    m = keep.to(log_ratio.dtype)
    n = m.sum()

    def mean(x):
        return (x.to(m.dtype) * m).sum() / (n + 1e-8)
    if loss_mode == "tic_dro":
        return {"actor/ppo_kl": -mean(log_ratio)}
    if loss_mode == "tic_kl_cov":  # the mean |log-ratio|, unclamped
        return {"actor/ppo_kl": mean(log_ratio.abs())}
    if loss_mode == "tic_geo_mean":  # the tokens outside the band, by the advantage's sign
        outside = log_ratio != log_ratio.clamp(-eps_low, eps_high)
        return {"actor/pg_clipfrac": mean(outside & (adv[:, None] > 0)),
                "actor/ppo_kl": -mean(log_ratio),
                "actor/pg_clipfrac_lower": mean(outside & (adv[:, None] < 0))}
    clamped = log_ratio.clamp(-_VANILLA_CAP, _VANILLA_CAP)  # as verl's losses clamp it
    ppo_kl = -mean(clamped)
    clipfrac = lower = ppo_kl * 0
    r = torch.exp(clamped)
    if loss_mode == "tic_cispo":
        clipfrac = mean(r != r.clamp(1.0 - eps_low, 1.0 + eps_high))
    elif loss_mode.startswith("tic_dppo"):
        valid = _dppo_weight(logp, old, r, adv[:, None], loss_mode[4:], eps_low,
                             eps_high) != 0
        clipfrac, lower = mean(~valid), mean((r > clip_c) & valid)
    return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl,
            "actor/pg_clipfrac_lower": lower}


def _geometric_mean_weights(weights, response_mask):
    """verl's geo_mean weighs each sequence by the geometric mean of its tokens' weights,
    exp(sum_t log(w_t + 1e-10) / (L + 1e-8)): that value on each of its tokens."""
    m = response_mask.to(torch.promote_types(weights.dtype, torch.float32))
    log_mean = (torch.log(weights + 1e-10) * m).sum(-1) / (m.sum(-1) + 1e-8)
    return torch.exp(log_mean).unsqueeze(-1).expand(weights.shape)


@torch.no_grad()
def _clip_cov_weights(old_log_prob, log_prob, advantages, response_mask, config, eps_low,
                      eps_high):
    """verl's clip_cov selection as (B, T) weights: 0 on the tokens whose gradient it cuts,
    else 1. Candidates: response tokens the clip leaves alone whose covariance term (A_t -
    mean A)(logp_t - mean logp) (means over the response tokens) lies strictly inside
    (clip_cov_lb, clip_cov_ub); max(1, int(clip_cov_ratio * tokens)) of them are drawn with
    torch.randperm, the draw verl makes, so that the same random state cuts the same tokens."""
    share = _policy_option(config, "clip_cov_ratio", 0.0002)
    lb = _policy_option(config, "clip_cov_lb", 1.0)
    ub = _policy_option(config, "clip_cov_ub", 5.0)
    if not share > 0:
        raise ValueError(f"config.policy_loss.clip_cov_ratio must be > 0, got {share!r}")
    _check.float_tensor("advantages", advantages)
    m = response_mask.to(log_prob.dtype)
    on = response_mask > 0
    lp = log_prob.detach()
    r = torch.exp(lp - old_log_prob)
    clipped = (-advantages * r.clamp(1 - eps_low, 1 + eps_high) > -advantages * r) & on

    def mean(x):
        return (x * m).sum() / (m.sum() + 1e-8)
    cov = (advantages - mean(advantages)) * (lp - mean(lp))
    candidates = torch.nonzero((cov < ub) & (cov > lb) & on & ~clipped)
    weights = torch.ones_like(lp)
    if len(candidates):
        count = max(int(share * m.sum().item()), 1)
        picked = candidates[torch.randperm(len(candidates))[:min(count, len(candidates))]]
        weights[picked[:, 0], picked[:, 1]] = 0.0
    return weights


def _policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                 config, rollout_is_weights):
    ratio, clip_mode, dual, cap, objective = _MODES[loss_mode]
    if loss_mode in ("tic_gpg", "tic_sapo", "tic_dro", "tic_kl_cov"):  # these read no clip ratio
        if config is None:
            raise ValueError(f"policy loss {loss_mode!r} needs the actor config")
        eps_low, eps_high, clip_c = 0.2, 0.2, None
    else:
        eps_low, eps_high, clip_c = _clip_ratios(config, loss_mode, dual)
    if loss_mode == "tic_sapo":  # verl's sapo aggregates per sequence whatever the mode says
        loss_agg_mode = "seq-mean-token-mean"
    _check.float_tensor("log_prob", log_prob)
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, T), got shape {tuple(log_prob.shape)}")
    with _check.one_read():
        _check.mask_ok(response_mask, log_prob.shape, "response_mask")
        _check.float_tensor("old_log_prob", old_log_prob)
        _check.shape("old_log_prob", old_log_prob, log_prob.shape, " (log_prob's shape)")
        if loss_mode == "tic_geo_mean":  # verl's: the mean over the micro-batch's rows
            keywords, factor = dict(aggregation="seq-mean-token-mean",
                                    num_sequences=float(max(log_prob.shape[0], 1))), 1.0
        else:
            keywords, factor = _aggregation(loss_agg_mode, config, response_mask)
        adv = _sequence_advantages(advantages, response_mask, loss_mode)
    if rollout_is_weights is not None:
        weights = rollout_is_weights.detach()
        if loss_mode in ("tic_geo_mean", "tic_clip_cov"):  # transformed before tic checks them
            _check.float_tensor("rollout_is_weights", weights)
            _check.shape("rollout_is_weights", weights, response_mask.shape,
                         " (response_mask's shape)")
        if loss_mode == "tic_geo_mean":
            weights = _geometric_mean_weights(weights, response_mask)
        keywords["rollout_weights"] = weights
    if loss_mode == "tic_clip_cov":  # the cut tokens: a weight 0 on their policy term
        cut = _clip_cov_weights(old_log_prob, log_prob, advantages, response_mask, config,
                                eps_low, eps_high)
        if rollout_is_weights is not None:
            cut = cut * keywords["rollout_weights"]
        keywords["rollout_weights"] = cut
    if objective != "clip":
        keywords["objective"] = objective
    if objective == "sapo":
        keywords.update(sapo_tau_pos=float(_get(config, "tau_pos", 1.0)),
                        sapo_tau_neg=float(_get(config, "tau_neg", 1.05)))
    if objective.startswith("dppo"):  # verl truncates DPPO's weight at clip_ratio_c
        keywords["delta"] = clip_c
    if objective == "dro":
        keywords["dro_beta"] = _policy_option(config, "dro_beta")
    if objective == "kl_cov":
        # verl's kl_cov falls back to these where its config holds None
        keywords.update(kl_cov_ratio=_policy_option(config, "kl_cov_ratio", 0.0002),
                        kl_cov_coef=_policy_option(config, "ppo_kl_coef", 1.0))

    # the log-ratio in at least float32, for verl's metrics and GSPO-token's shift
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    keep = response_mask.bool()
    log_ratio = torch.where(keep, log_prob.detach().to(dtype) - old_log_prob.detach().to(dtype),
                            0.0)
    old = old_log_prob
    kernel_ratio = ratio
    if loss_mode == "tic_gspo" and rollout_is_weights is not None:
        # verl's GSPO-token: per-token ratio sg[s_i] pi_t / sg[pi_t], i.e. tic_kernels' token
        # ratio against old'_t = sg[log_prob_t] - sg[mean log-ratio of i]
        lengths = keep.sum(dim=-1).clamp(min=1).to(dtype)
        mean = log_ratio.sum(dim=-1) / lengths
        old = log_prob.detach().to(dtype) - mean.unsqueeze(-1)
        kernel_ratio = "token"

    try:
        out = tic_loss_from_logprobs(
            log_prob, old, adv, mask=response_mask, ratio=kernel_ratio, clip_mode=clip_mode,
            eps_low=eps_low, eps_high=eps_high, dual_clip=clip_c if dual else None,
            max_log_ratio=cap, **keywords)
    except (TypeError, ValueError) as e:
        raise _in_verl_terms(e) from None
    loss = out.loss * factor if factor != 1 else out.loss

    if loss_mode == "tic_gspo":
        metrics = _verl_metrics(log_ratio, keep, adv.to(dtype), "sequence_mean", eps_low,
                                eps_high, False, None, -math.inf, _GSPO_CAP)
    elif loss_mode == "tic_clip_cov":  # verl's two: the cut tokens' share, the unclamped KL
        n = keep.sum().to(dtype) + 1e-8
        metrics = {"actor/pg_clipfrac": ((cut == 0) & keep).sum().to(dtype) / n,
                   "actor/ppo_kl": -log_ratio.sum() / n}
    elif objective != "clip" or ratio == "none":
        metrics = _verl_objective_metrics(loss_mode, log_ratio, keep, eps_low, eps_high,
                                          clip_c, log_prob.detach().to(dtype),
                                          old_log_prob.detach().to(dtype), adv.to(dtype))
    else:
        metrics = _verl_metrics(log_ratio, keep, adv.to(dtype), ratio, eps_low, eps_high,
                                clip_mode == "upper", clip_c, -_VANILLA_CAP, _VANILLA_CAP)
    metrics.update({METRIC_PREFIX + k: v for k, v in out.stats.items()})
    names = list(metrics)
    values = torch.stack([metrics[k].detach().to(torch.float64).reshape(()) for k in names])
    return loss, dict(zip(names, values.tolist()))  # one host read for all metrics


_DOC = """verl policy loss {name!r} (tic_kernels): see tic_kernels.integrations.verl.

    Args (verl's): old_log_prob, log_prob, advantages, response_mask: (B, T); loss_agg_mode
    (default {default!r}, as verl's counterpart); config: the actor config (clip_ratio_low/high,
    clip_ratio_c, tau_pos/tau_neg, policy_loss.dro_beta / clip_cov_* / kl_cov_ratio /
    ppo_kl_coef, global_batch_info);
    rollout_is_weights: (B, T) or None.
    Returns (loss, metrics dict of floats)."""


def _loss_function(name, default_agg):
    """verl's policy-loss function for loss_mode ``name``: verl's signature, keywords
    included (its ppo_loss calls them by name), and loss_agg_mode's default."""
    def loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor, loss_agg_mode: str = default_agg,
             config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        return _policy_loss(name, old_log_prob, log_prob, advantages, response_mask,
                            loss_agg_mode, config, rollout_is_weights)
    loss.__name__ = loss.__qualname__ = f"compute_policy_loss_{name}"
    loss.__doc__ = _DOC.format(name=name, default=default_agg)
    return loss


# loss_mode -> its function, with verl's counterpart's default aggregation
LOSS_MODES = {name: _loss_function(name, agg) for name, agg in (
    ("tic", "seq-mean-token-mean"), ("tic_upper", "seq-mean-token-mean"),
    ("tic_gspo", "seq-mean-token-mean"), ("tic_token", "token-mean"),
    ("tic_cispo", "token-mean"), ("tic_sapo", "seq-mean-token-mean"),
    ("tic_gpg", "token-mean"), ("tic_dppo_tv", "token-mean"), ("tic_dppo_kl", "token-mean"),
    ("tic_dro", "token-mean"), ("tic_geo_mean", "token-mean"), ("tic_clip_cov", "token-mean"),
    ("tic_kl_cov", "token-mean"))}
compute_policy_loss_tic = LOSS_MODES["tic"]
compute_policy_loss_tic_upper = LOSS_MODES["tic_upper"]
compute_policy_loss_tic_gspo = LOSS_MODES["tic_gspo"]
compute_policy_loss_tic_token = LOSS_MODES["tic_token"]
compute_policy_loss_tic_cispo = LOSS_MODES["tic_cispo"]
compute_policy_loss_tic_sapo = LOSS_MODES["tic_sapo"]
compute_policy_loss_tic_gpg = LOSS_MODES["tic_gpg"]
compute_policy_loss_tic_dppo_tv = LOSS_MODES["tic_dppo_tv"]
compute_policy_loss_tic_dppo_kl = LOSS_MODES["tic_dppo_kl"]
compute_policy_loss_tic_dro = LOSS_MODES["tic_dro"]
compute_policy_loss_tic_geo_mean = LOSS_MODES["tic_geo_mean"]
compute_policy_loss_tic_clip_cov = LOSS_MODES["tic_clip_cov"]
compute_policy_loss_tic_kl_cov = LOSS_MODES["tic_kl_cov"]


def register() -> None:
    """Registers the losses of LOSS_MODES with verl's policy-loss registry (idempotent). A different
    loss already registered under one of the names is replaced, with a warning."""
    registry = _core_algos.POLICY_LOSS_REGISTRY
    for name, fn in LOSS_MODES.items():
        current = registry.get(name)
        if current is fn:
            continue
        if current is not None and getattr(current, "__module__", None) != __name__:
            warnings.warn(f"tic_kernels.integrations.verl replaces verl's policy loss {name!r} "
                          f"({getattr(current, '__qualname__', current)!r})", stacklevel=2)
        _core_algos.register_policy_loss(name)(fn)


register()
