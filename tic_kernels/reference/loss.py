"""The reference of ops 2, 3 and 4 (with the sampler correction, 4b): per-sequence sums,
group-normalised advantages, and the clipped ratio loss from log-probabilities, from logits
and from the LM head."""
from __future__ import annotations

import math

import torch

from ..backend import first_order_only
from ..layout import aggregation_norm, ignoring_masked, lengths_of
from ..options import (IGNORE_INDEX, KL_COV_COEF, KL_COV_RATIO, VESPO_LOG_W_MAX,
                       VESPO_LOG_W_MIN, VESPO_MIN_LAMBDA, default_aggregation)
from ..output import LossOutput
from .logprobs import compute_dtype, linear_token_logprobs, token_logprobs, vocab_token_logprobs


def masked_rows(values, mask):
    """(B, T, ...) -> (N, ...) keeping mask positions in row-major order; masked ones never read."""
    return values[mask.bool()]


def segment_ids(lengths):
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def segment_sum(x, lengths):
    out = torch.zeros(lengths.numel(), dtype=x.dtype, device=x.device)
    return out.index_add(0, segment_ids(lengths), x)


# --------------------------------------------------------------------------------------------
# Op 2: per-sequence reduction
# --------------------------------------------------------------------------------------------
def sequence_logprobs(values, cu_seqlens=None, mask=None, reduce="sum"):
    """S_i = sum of values over sequence i (reduce="sum") or S_i / max(L_i, 1) ("mean")."""
    dt = compute_dtype(values)
    if mask is not None:
        values = masked_rows(values, mask)
    lengths = lengths_of(cu_seqlens, mask)
    s = segment_sum(values.to(dt), lengths)
    if reduce == "mean":
        s = s / lengths.clamp(min=1).to(dt)
    return s


# --------------------------------------------------------------------------------------------
# Op 3: group-normalised advantages
# --------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size=None, group_ids=None, scale="group", std="sample",
                     eps=1e-6, lengths=None, length_normalize=False):
    """A_i = (r_i - mean_g) / (std + eps), see docs/spec.md, op 3. No gradient.

    The O(B) statistics are computed in float64 whatever the input (rewards 1e7 apart by 1 are
    exact there), and the result is cast to the compute dtype.
    """
    out_dt = compute_dtype(rewards)
    dt = torch.float64
    r = rewards.detach().to(dt)
    if length_normalize:
        r = r / lengths.clamp(min=1).to(dt)
    B = r.numel()
    if group_ids is None:
        gid = torch.arange(B, device=r.device) // group_size
    else:
        gid = torch.unique(group_ids, return_inverse=True)[1]
    G = int(gid.max()) + 1 if B else 0
    count = torch.zeros(G, dtype=dt, device=r.device).index_add(0, gid, torch.ones_like(r))
    mean = torch.zeros(G, dtype=dt, device=r.device).index_add(0, gid, r) / count
    centered = r - mean[gid]
    ddof = 1 if std == "sample" else 0
    if scale == "group":
        ss = torch.zeros(G, dtype=dt, device=r.device).index_add(0, gid, centered * centered)
        sd = (ss / (count - ddof).clamp(min=1)).sqrt()[gid]
    elif scale == "batch":
        sd = r.std(correction=ddof) if B > ddof else r.new_zeros(())
    else:
        sd = None
    adv = centered if sd is None else centered / (sd + eps)
    # A group of one, or of equal rewards, has advantage exactly 0 (never NaN, never rounding).
    lo = torch.full((G,), float("inf"), dtype=dt, device=r.device).scatter_reduce(0, gid, r, "amin")
    hi = torch.full((G,), -float("inf"), dtype=dt, device=r.device).scatter_reduce(0, gid, r, "amax")
    return torch.where((lo == hi)[gid], torch.zeros_like(adv), adv).to(out_dt)


# --------------------------------------------------------------------------------------------
# Op 4: the clipped ratio loss
# --------------------------------------------------------------------------------------------
def clip_band(x, clip_mode="two_sided", eps_low=0.2, eps_high=0.28):
    """x clamped to [1 - eps_low, 1 + eps_high] (two_sided) or to at most 1 + eps_high."""
    hi = 1.0 + eps_high
    return x.clamp(1.0 - eps_low, hi) if clip_mode == "two_sided" else x.clamp(max=hi)


def clipped_objective(x, A, clip_mode="two_sided", eps_low=0.2, eps_high=0.28, dual_clip=None,
                      delta=None):
    """J = min(x' A, clip(x) A) [, max(J, c A) for A < 0], x' = min(x, delta) when delta is
    given; returns J and the clipped mask.

    dJ/dx is A where the unclipped branch is selected (ties included) and 0 where the constant
    branch is: the constant branch is detached rather than left to min()'s tie rule.
    """
    xc = clip_band(x, clip_mode, eps_low, eps_high)
    xu = x if delta is None else x.clamp(max=delta)
    unclipped, constant = xu * A, xc * A
    take = unclipped <= constant
    J = torch.where(take, unclipped, constant.detach())
    clipped = ~take
    if dual_clip is not None:
        floor = dual_clip * A
        lift = (A < 0) & (J < floor)
        J = torch.where(lift, floor.detach(), J)
        clipped = clipped | lift
    return J, clipped


def _mean(x, n):
    return x.sum() / n.clamp(min=1)


class _NaNGradientWhere(torch.autograd.Function):
    """Zero in value; its gradient w.r.t. ``x`` is NaN where ``bad`` and 0 elsewhere.

    Adding it to the loss implements the NaN rule (docs/spec.md): a token whose objective is
    NaN gets a NaN gradient, whichever branch of the clip or the cap the NaN went through
    (the constant branch and the cap would otherwise pass a zero gradient)."""

    @staticmethod
    def forward(ctx, x, bad):
        ctx.save_for_backward(bad)
        return x.new_zeros(())

    @staticmethod
    @first_order_only
    def backward(ctx, g):
        (bad,) = ctx.saved_tensors
        return torch.where(bad, float("nan"), 0.0).to(g.dtype) * g, None


def _k3(u):
    """The k3 estimator exp(u) - u - 1 of a log-ratio u."""
    return u.exp() - u - 1.0


def _largest(x, unit):
    """The largest of the finite x >= 0 where ``unit``; 0 when there are none (no branch on a
    size, which may depend on the data)."""
    return torch.cat([torch.where(unit, x, 0.0).reshape(-1), x.new_zeros(1)]).max()


def _smallest(x, unit):
    """The smallest of the finite x >= 0 where ``unit``; 0 when there are none."""
    m = torch.cat([torch.where(unit, x, torch.inf).reshape(-1), x.new_full((1,), torch.inf)]).min()
    return torch.where(m == torch.inf, 0.0, m)


def rollout_correction(old, lengths, cap, dt, rollout_logprobs=None, rollout_weights=None,
                       rollout_is=None, rollout_is_max=3.0, rollout_is_min=None):
    """Op 4b on flat per-token tensors of the sequences of ``lengths``: (w per token, its
    statistics). u_t = old_t - rollout_t (a NaN rollout log-prob: u_t = 0); the weight is
    exp(u_t) per token or exp(sum_t u_t) per sequence, its log capped at ``cap``, truncated to
    or masked outside [rollout_is_min, rollout_is_max]; or ``rollout_weights`` as given.
    The statistics are over the weighted units (tokens, or non-empty sequences) and of the
    weights applied."""
    stats = {}
    per_seq = rollout_weights is None and rollout_is.startswith("sequence")
    if rollout_weights is not None:
        units = rollout_weights.detach().to(dt)
    else:
        u = old.to(dt) - rollout_logprobs.detach().to(dt)
        valid = ~torch.isnan(u)
        u = torch.where(valid, u, 0.0)
        log_w = segment_sum(u, lengths) if per_seq else u
        units = log_w.clamp(-cap, cap).exp()
        lo = 0.0 if rollout_is_min is None else float(rollout_is_min)
        hi = math.inf if rollout_is_max is None else float(rollout_is_max)
        if rollout_is.endswith("_mask"):
            units = torch.where((units > hi) | (units < lo), 0.0, units)
        else:
            units = units.clamp(lo, hi)
        # k3 of the sampler against the old policy, over the tokens the sampler scored
        kl = _k3((-u).clamp(-cap, cap))
        stats["rollout_kl"] = _mean(torch.where(valid, kl, 0.0), valid.sum())
    w = units[segment_ids(lengths)] if per_seq else units
    # the units: tokens, or the non-empty sequences; masked rather than selected, so that no
    # size depends on the data (torch.compile traces it without a graph break)
    unit = lengths > 0 if per_seq else torch.ones_like(units, dtype=torch.bool)
    n = unit.sum().to(dt)
    units = torch.where(unit, units, 0.0)
    top = _largest(units, unit)  # weights are >= 0
    scaled = units / torch.where(top > 0, top, 1.0)  # squares of 1e20 or 1e-25 stay finite
    square = (scaled * scaled).sum()
    stats.update(
        rollout_is_mean=_mean(units, n),
        rollout_is_max=top,
        rollout_is_min=_smallest(units, unit),
        rollout_masked_fraction=_mean(((units == 0) & unit).to(dt), n),
        rollout_ess=torch.where(square > 0, scaled.sum() ** 2 / (n * square), 0.0))
    return w, stats


def dppo_weight(logp, old, x, A, objective, eps_low=0.2, eps_high=0.28, delta=None):
    """DPPO's detached weight of each token: its ratio x (at most delta), 0 outside the trust
    region of its probability (total variation, "dppo_tv", or binary KL, "dppo_kl", within
    eps_high for A > 0 and eps_low otherwise; the binary KL's region also keeps a probability
    that moved against the advantage's push)."""
    p, p_old = logp.detach().exp(), old.exp()
    if objective == "dppo_tv":
        up, down = (p - p_old) <= eps_high, (p - p_old) >= -eps_low
    else:
        kl = p_old * (old - logp.detach()) + (1 - p_old) * torch.log(
            (1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        up, down = (kl <= eps_high) | (p <= p_old), (kl <= eps_low) | (p >= p_old)
    w = x.detach() if delta is None else x.detach().clamp(max=delta)
    return torch.where(torch.where(A > 0, up, down), w, 0.0)


def gmpo_log_ratio(d, A, clip_mode="two_sided", eps_low=0.2, eps_high=0.28):
    """GMPO's token log-ratios d clipped on the side the advantage pushes them: min(d,
    eps_high) for A > 0, max(d, -eps_low) for A < 0 (unclipped with clip_mode="upper"), 0 for
    A = 0; the gradient passes where the bound did not replace d. Returns (clipped d, the
    tokens where the bound replaced d)."""
    up = d > eps_high
    down = (d < -eps_low) if clip_mode == "two_sided" else torch.zeros_like(up)
    clipped = torch.where(A > 0, up, torch.where(A < 0, down, False))
    bound = torch.where(A > 0, eps_high, -eps_low).to(d.dtype)
    d_clip = torch.where(clipped, bound, d)
    return torch.where(A == 0, d * 0, d_clip), clipped


def vespo_weight(log_w, A, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w) of each sequence's
    log-weight clamped to [log 1e-8, 20], (k, lambda) by A >= 0 or not, lambda at least 1e-4;
    a NaN or infinite phi is 0 (TRL's get_gamma_weights). Detached."""
    log_w = log_w.detach().clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
    k = torch.where(A >= 0, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(A >= 0, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=VESPO_MIN_LAMBDA)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def covariance_selection(logp, A, share=KL_COV_RATIO):
    """KL-Cov's tokens among the loss tokens (flat logp and per-token A): the max(1,
    floor(share N)) of largest covariance (A - mean A)(logp - mean logp) (the means in
    float64, rounded to the values' dtype), ties to the earlier token; a bool per token.
    Detached."""
    logp, A = logp.detach(), A.detach()

    def mean(x):
        return x.double().mean().to(x.dtype)
    cov = (A - mean(A)) * (logp - mean(logp))
    k = max(1, math.floor(cov.numel() * share))
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    chosen[torch.sort(cov, descending=True, stable=True).indices[:k]] = True
    return chosen


def entropy_selection(entropy, keep):
    """The loss tokens (flat) whose entropy is at least the (1 - keep)-quantile of theirs
    (torch.quantile's linear interpolation, over their float32 values); a bool per token."""
    H = entropy.detach().float()
    if not H.numel():
        return torch.zeros_like(H, dtype=torch.bool)
    return H >= torch.quantile(H, 1.0 - keep)


def sapo_objective(x, A, tau_pos=1.0, tau_neg=1.05):
    """SAPO's soft gate: sigmoid(tau (x - 1)) 4 / tau A, tau = tau_pos for A > 0 else tau_neg."""
    tau = torch.where(A > 0, tau_pos, tau_neg).to(x.dtype)
    return torch.sigmoid(tau * (x - 1.0)) * (4.0 / tau) * A


def tic_loss_from_logprobs(logprobs, old_logprobs, advantages, cu_seqlens=None, mask=None,
                           ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                           dual_clip=None, max_log_ratio=20.0, aggregation=None,
                           ref_logprobs=None, beta=0.0, num_tokens=None, num_sequences=None,
                           max_len=None, entropy=None, entropy_coef=0.0, objective="clip",
                           delta=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, dro_beta=None,
                           vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, kl_cov_ratio=KL_COV_RATIO,
                           kl_cov_coef=KL_COV_COEF, kl_bias_correction=False,
                           off_policy_mask_threshold=None, top_entropy_quantile=1.0, **rollout):
    """The loss of docs/spec.md, op 4, on per-token log-probabilities; returns LossOutput(loss, stats).

    ``objective``: "clip" (with ``delta``), "cispo" (sg(clip(x)) A log pi per token),
    "sapo" (sapo_objective), "dppo_tv" / "dppo_kl" (dppo_weight), "dro" (A log pi -
    dro_beta / 2 (log pi - old)^2 per token), "gmpo" (x A, x the geometric mean of the
    ratios of gmpo_log_ratio), "vespo" (vespo_weight(log w) A log pi per token, log w the
    sum of the sequence's capped log-ratios and of its sampler log-weights, which then do
    not multiply the objective) or "kl_cov" (x A per token, less kl_cov_coef |log pi - old|
    on the tokens of covariance_selection(kl_cov_ratio)); ``kl_bias_correction``: the KL
    term times its unit's ratio; ``off_policy_mask_threshold``: the policy objective of a
    sequence with A < 0 whose mean sg(sampler or old - logp) (NaN counts 0) exceeds it is
    dropped; ``top_entropy_quantile`` < 1: only the tokens of entropy_selection keep their
    policy objective (``entropy`` required).

    ``entropy`` (same layout as logprobs) feeds the entropy bonus and the entropy statistic;
    ``rollout``: op 4b's keywords (rollout_logprobs or rollout_weights, rollout_is,
    rollout_is_max, rollout_is_min), see rollout_correction.
    """
    aggregation = aggregation or default_aggregation(ratio)
    dt = compute_dtype(logprobs)
    if mask is not None:
        if max_len is None:
            max_len = mask.shape[1]
        logprobs, old_logprobs = masked_rows(logprobs, mask), masked_rows(old_logprobs, mask)
        ref_logprobs = None if ref_logprobs is None else masked_rows(ref_logprobs, mask)
        entropy = None if entropy is None else masked_rows(entropy, mask)
        for k in ("rollout_logprobs", "rollout_weights"):
            if rollout.get(k) is not None:
                rollout[k] = masked_rows(rollout[k], mask)
    lengths = lengths_of(cu_seqlens, mask)
    seg = segment_ids(lengths)
    cap = float(max_log_ratio)

    logp = logprobs.to(dt)
    # old, ref (and rollout) log-probs and advantages are data: never differentiated
    old_logprobs = old_logprobs.detach()
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.detach()
    d = logp - old_logprobs.to(dt)  # per-token difference first (see the module docstring)
    A = advantages.detach().to(dt)
    L = lengths.to(dt)
    nonempty = (lengths > 0).to(dt)
    n_seq = nonempty.sum()
    Delta = segment_sum(d, lengths)  # per sequence (``delta`` is the objective's bound)

    stats, stats_of = {}, {}
    w_rollout = None
    if rollout.get("rollout_logprobs") is not None or rollout.get("rollout_weights") is not None:
        w_rollout, stats_of = rollout_correction(old_logprobs, lengths, cap, dt, **rollout)
    x_tok = None  # each token's unit ratio, not detached (the KL's bias correction)
    if ratio == "none":
        J_tok = A[seg] * logp
        zero = logp.new_zeros(())
        stats.update(clip_fraction=zero, ratio_mean=zero + 1, ratio_max=zero + 1, cap_fraction=zero)
    else:
        if ratio == "token":
            log_ratio, A_unit, n_units, unit_ok = d, A[seg], d.new_tensor(d.numel()), None
        elif objective == "gmpo":  # sequence_mean (validation says so) of clipped log-ratios
            d_clip, clipped_tok = gmpo_log_ratio(d, A[seg], clip_mode, eps_low, eps_high)
            log_ratio = segment_sum(d_clip, lengths) / L.clamp(min=1)
            A_unit, n_units, unit_ok = A, n_seq, nonempty.bool()
        else:
            log_ratio = Delta if ratio == "trajectory" else Delta / L.clamp(min=1)
            A_unit, n_units, unit_ok = A, n_seq, nonempty.bool()
        capped = log_ratio.abs() > cap
        x = log_ratio.clamp(-cap, cap).exp()  # clamp's gradient is 0 beyond the cap
        x_tok = x if ratio == "token" else x[seg]
        if objective == "cispo":  # a detached weight on each token's log-probability
            xc = clip_band(x, clip_mode, eps_low, eps_high).detach()
            clipped = xc != x.detach()
            J_tok = (xc if ratio == "token" else xc[seg]) * A[seg] * logp
        elif objective in ("dppo_tv", "dppo_kl"):  # the token ratio (validation says so)
            xc = dppo_weight(logp, old_logprobs.to(dt), x, A_unit, objective, eps_low,
                             eps_high, delta)
            clipped = xc == 0
            J_tok = xc * A_unit * logp
        elif objective == "dro":  # the token ratio (validation says so)
            J_tok = A_unit * logp - 0.5 * dro_beta * d * d
            clipped = torch.zeros_like(x, dtype=torch.bool)
        elif objective == "kl_cov":  # the token ratio, unclipped; the statistic: the penalised
            clipped = covariance_selection(logp, A_unit, kl_cov_ratio)
            J_tok = x * A_unit - kl_cov_coef * clipped * d.abs()
        elif objective == "vespo":  # the trajectory's weight on every token's log-probability
            log_w = segment_sum(d.detach().clamp(-cap, cap), lengths)
            if w_rollout is not None:  # the sampler's weights enter w, once per sequence
                log_w_s = torch.log(w_rollout).clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
                once = (rollout.get("rollout_weights") is None
                        and rollout["rollout_is"].startswith("sequence"))
                log_w = log_w + segment_sum(log_w_s, lengths) / (L.clamp(min=1) if once else 1)
            phi = vespo_weight(log_w, A, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                               vespo_lambda_neg)
            J_tok = phi[seg] * A[seg] * logp
            clipped = torch.zeros_like(x, dtype=torch.bool)
        elif objective == "gmpo":  # no clip of x: its tokens' log-ratios were clipped
            J_tok = (A_unit * x)[seg]
            # per sequence, the fraction of its tokens whose log-ratio was clipped
            clipped = segment_sum(clipped_tok.to(dt), lengths) / L.clamp(min=1)
        else:
            if objective == "sapo":
                J_unit = sapo_objective(x, A_unit, sapo_tau_pos, sapo_tau_neg)
                clipped = torch.zeros_like(x, dtype=torch.bool)
            else:
                J_unit, clipped = clipped_objective(x, A_unit, clip_mode, eps_low, eps_high,
                                                    dual_clip, delta)
            J_tok = J_unit if ratio == "token" else J_unit[seg]
        xd = x.detach()
        if unit_ok is not None:  # empty sequences are not units
            clipped, capped, xd = clipped * unit_ok, capped & unit_ok, xd * unit_ok
        seq_capped = capped if ratio != "token" else segment_sum(capped.to(dt), lengths) > 0
        stats.update(clip_fraction=_mean(clipped.to(dt), n_units),
                     ratio_mean=_mean(xd, n_units),
                     ratio_max=_largest(xd, torch.ones_like(xd, dtype=torch.bool)),
                     cap_fraction=_mean(seq_capped.to(dt), n_seq))

    if w_rollout is not None and objective != "vespo":
        J_tok = J_tok * w_rollout  # a detached weight on the policy objective only
    if off_policy_mask_threshold is not None:  # the off-policy sequence mask, as TRL's
        base = rollout.get("rollout_logprobs")
        base = old_logprobs if base is None else base
        t = base.detach().to(dt) - logp.detach()
        drift = segment_sum(torch.where(torch.isnan(t), 0.0, t), lengths) / L.clamp(min=1)
        J_tok = J_tok * ((A >= 0) | (drift <= off_policy_mask_threshold))[seg]
    if top_entropy_quantile < 1.0:
        J_tok = J_tok * entropy_selection(entropy, top_entropy_quantile)
    stats.update(stats_of)

    n_tok = logp.new_tensor(float(logp.numel()))
    if ref_logprobs is not None:
        # k3 estimator; the cap keeps exp finite, gradient 0 beyond it
        kl = _k3((ref_logprobs.to(dt) - logp).clamp(-cap, cap))
        if beta:
            if kl_bias_correction and x_tok is not None:  # the KL term times its unit's ratio
                kl = kl * x_tok
            J_tok = J_tok - beta * kl
        stats["kl_mean"] = _mean(kl.detach(), n_tok)  # the KL as it enters the loss

    norm = aggregation_norm(aggregation, n_seq, n_tok, num_sequences, num_tokens, max_len)
    w = norm / L[seg] if aggregation == "seq-mean-token-mean" else norm.expand(logp.shape)
    loss = -(w * J_tok).sum() + _NaNGradientWhere.apply(logp, torch.isnan(J_tok.detach()))
    if entropy is not None:
        H = entropy.to(dt)
        if entropy_coef:
            loss = loss - entropy_coef * (w * H).sum()
        stats["entropy_mean"] = _mean(H.detach(), n_tok)

    stats["delta_abs_mean"] = _mean(Delta.detach().abs(), n_seq)
    stats["logp_mean"] = _mean(logp.detach(), n_tok)
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    return LossOutput(loss.to(out_dt), {k: stats[k].to(out_dt) for k in sorted(stats)})


def _loss_from_rows(logprobs_of, targets, old_logprobs, advantages, cu_seqlens, mask,
                    entropy_coef, loss_options):
    """tic_loss_from_logprobs on logprobs_of(targets, with_entropy), masked rows ignored."""
    with_entropy = entropy_coef != 0.0 or loss_options.get("top_entropy_quantile", 1.0) < 1.0
    logp, entropy = logprobs_of(ignoring_masked(targets, mask), with_entropy)
    return tic_loss_from_logprobs(logp, old_logprobs, advantages, cu_seqlens=cu_seqlens,
                                  mask=mask, entropy=entropy if with_entropy else None,
                                  entropy_coef=entropy_coef, **loss_options)


def tic_loss(logits, targets, old_logprobs, advantages, cu_seqlens=None, mask=None,
             temperature=1.0, entropy_coef=0.0, shard=None, **loss_options):
    """tic_loss_from_logprobs applied to token_logprobs(logits, targets); see docs/spec.md, op 4.
    ``shard`` = (group, start): the logits are vocabulary columns [start, start + V_local)
    (op 7)."""
    def logprobs_of(t, with_entropy):
        if shard is not None:
            out = vocab_token_logprobs(logits, t, temperature, IGNORE_INDEX, with_entropy, *shard)
            return out if with_entropy else (out, None)
        return token_logprobs(logits, t, temperature, IGNORE_INDEX, return_entropy=True) \
            if with_entropy else (token_logprobs(logits, t, temperature, IGNORE_INDEX), None)
    return _loss_from_rows(logprobs_of, targets, old_logprobs, advantages, cu_seqlens, mask,
                           entropy_coef, loss_options)


def linear_tic_loss(hidden, weight, targets, old_logprobs, advantages, bias=None,
                    cu_seqlens=None, mask=None, temperature=1.0, entropy_coef=0.0,
                    chunk_size=None, fp32_accumulation=True, shard=None, **loss_options):
    """tic_loss(F.linear(hidden, weight, bias), ...) through linear_token_logprobs (op 6;
    ``shard`` as there, op 7)."""
    def logprobs_of(t, with_entropy):
        out = linear_token_logprobs(hidden, weight, t, bias, temperature, IGNORE_INDEX,
                                    return_entropy=with_entropy, chunk_size=chunk_size,
                                    fp32_accumulation=fp32_accumulation, shard=shard)
        return out if with_entropy else (out, None)
    return _loss_from_rows(logprobs_of, targets, old_logprobs, advantages, cu_seqlens, mask,
                           entropy_coef, loss_options)
