"""Naive per-element oracles of ops 1-4 of docs/spec.md: Python floats and loops, no tensors.

They exist only to check the reference (tic_kernels/reference/) element by element, including
the closed-form gradients, so they are written from docs/spec.md, not from the reference.
"""
import math


def token_logprob(row, target, temperature=1.0):
    """logp, entropy and d(logp)/dz, d(H)/dz of one row (list of floats)."""
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    p = [math.exp(v - lse) for v in z]
    H = -sum(pi * (v - lse) for pi, v in zip(p, z))
    d_logp = [((1.0 if j == target else 0.0) - pj) / temperature for j, pj in enumerate(p)]
    d_H = [-pj * ((v - lse) + H) / temperature for pj, v in zip(p, z)]
    return z[target] - lse, H, d_logp, d_H


def group_advantages(rewards, groups, scale="group", std="sample", eps=1e-6):
    """rewards: list of floats; groups: list of group keys (any hashable)."""
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    ddof = 1 if std == "sample" else 0

    def sd(vals):
        n = len(vals)
        mu = sum(vals) / n
        return math.sqrt(sum((v - mu) ** 2 for v in vals) / max(n - ddof, 1))

    batch_sd = sd(rewards) if len(rewards) > ddof else 0.0
    out = [0.0] * len(rewards)
    for idx in members.values():
        vals = [rewards[i] for i in idx]
        mu = sum(vals) / len(vals)
        for i in idx:
            if len(idx) == 1 or max(vals) == min(vals):
                out[i] = 0.0
            elif scale == "group":
                out[i] = (rewards[i] - mu) / (sd(vals) + eps)
            elif scale == "batch":
                out[i] = (rewards[i] - mu) / (batch_sd + eps)
            else:
                out[i] = rewards[i] - mu
    return out


def _clip(x, A, clip_mode, eps_low, eps_high, dual_clip):
    """J and dJ/dx for one ratio x and advantage A (the clipping of docs/spec.md)."""
    hi, lo = 1.0 + eps_high, 1.0 - eps_low
    xc = min(max(x, lo), hi) if clip_mode == "two_sided" else min(x, hi)
    unclipped, constant = x * A, xc * A
    J, dJ, clipped = (unclipped, A, False) if unclipped <= constant else (constant, 0.0, True)
    if dual_clip is not None and A < 0 and J < dual_clip * A:
        J, dJ, clipped = dual_clip * A, 0.0, True
    return J, dJ, clipped


def rollout(seqs, values, mode, lo, hi, cap):
    """Op 4b: (per-token weights as seqs' lists, statistics). ``values``: per token, the
    sampler's log-prob (a ROLLOUT_IS mode) or the weight itself (mode "weights")."""
    if mode == "weights":
        weights = [list(v) for v in values]
        units = [w for v in weights for w in v]
        stats = {}
    else:
        lo, hi = (0.0 if lo is None else lo), (math.inf if hi is None else hi)

        def bounded(log_w):
            w = math.exp(max(-cap, min(cap, log_w)))
            if mode.endswith("_mask"):
                return 0.0 if (w > hi or w < lo) else w
            return min(max(w, lo), hi)
        us = [[0.0 if math.isnan(o - r) else o - r for (_, o, _, _), r in zip(s, v)]
              for s, v in zip(seqs, values)]
        if mode.startswith("sequence"):
            weights = [[bounded(sum(u))] * len(u) for u in us]
            units = [w[0] for w in weights if w]
        else:
            weights = [[bounded(x) for x in u] for u in us]
            units = [w for ws in weights for w in ws]
        scored = [max(-cap, min(cap, o - r)) for s, v in zip(seqs, values)
                  for (_, o, _, _), r in zip(s, v) if not math.isnan(o - r)]
        k3 = [math.exp(-x) + x - 1.0 for x in scored]
        stats = {"rollout_kl": sum(k3) / len(k3) if k3 else 0.0}
    n = len(units)
    square = sum(w * w for w in units)
    stats.update(rollout_is_mean=sum(units) / n if n else 0.0,
                 rollout_is_max=max(units) if n else 0.0,
                 rollout_is_min=min(units) if n else 0.0,
                 rollout_masked_fraction=sum(w == 0 for w in units) / n if n else 0.0,
                 rollout_ess=sum(units) ** 2 / (n * square) if square else 0.0)
    return weights, stats


def loss(seqs, A, *, ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
         dual_clip=None, max_log_ratio=20.0, aggregation=None, beta=0.0, entropy_coef=0.0,
         num_tokens=None, num_sequences=None, max_len=None, rollout_values=None,
         rollout_mode=None, rollout_is_min=None, rollout_is_max=3.0):
    """seqs: list of sequences, each a list of (logp, old, ref, entropy) tuples;
    ``rollout_values`` (lists like seqs) and ``rollout_mode``: op 4b, see rollout().

    Returns (loss, grads, stats) with grads[i][t] = dL/dlogp of token t of sequence i.
    """
    if aggregation is None:
        aggregation = "token-mean" if ratio == "token" else "seq-mean-token-mean"
    cap = max_log_ratio
    n_tok = sum(len(s) for s in seqs)
    n_seq = sum(1 for s in seqs if s)
    B_eff = max(num_sequences if num_sequences is not None else n_seq, 1)
    N_eff = max(num_tokens if num_tokens is not None else n_tok, 1)

    def weight(L):
        return {"seq-mean-token-mean": 1.0 / (B_eff * L) if L else 0.0,
                "token-mean": 1.0 / N_eff,
                "seq-mean-token-sum": 1.0 / B_eff,
                "seq-mean-token-sum-norm": 1.0 / (B_eff * (max_len or 1))}[aggregation]

    if rollout_values is not None:
        weights, rollout_stats = rollout(seqs, rollout_values, rollout_mode, rollout_is_min,
                                         rollout_is_max, max_log_ratio)
    else:
        weights, rollout_stats = [[1.0] * len(s) for s in seqs], {}
    total, grads = 0.0, []
    units = clipped_units = capped_seqs = 0
    ratio_sum, ratio_max, delta_abs, logp_sum, kl_sum, ent_sum = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for i, s in enumerate(seqs):
        L = len(s)
        w = weight(L)
        wr = weights[i]
        delta = sum(lp - old for lp, old, _, _ in s)
        g = [0.0] * L
        if L:
            delta_abs += abs(delta)
        if ratio in ("trajectory", "sequence_mean") and L:
            lr = delta if ratio == "trajectory" else delta / L
            x = math.exp(max(-cap, min(cap, lr)))
            J, dJ, clipped = _clip(x, A[i], clip_mode, eps_low, eps_high, dual_clip)
            chi = 0.0 if abs(lr) > cap else 1.0
            for t in range(L):
                total -= w * wr[t] * J
                g[t] -= w * sum(wr) * dJ * x * chi / (L if ratio == "sequence_mean" else 1)
            units += 1
            clipped_units += clipped
            capped_seqs += abs(lr) > cap
            ratio_sum += x
            ratio_max = max(ratio_max, x)
        seq_capped = False
        for t, (lp, old, ref, H) in enumerate(s):
            if ratio == "token":
                lr = lp - old
                x = math.exp(max(-cap, min(cap, lr)))
                J, dJ, clipped = _clip(x, A[i], clip_mode, eps_low, eps_high, dual_clip)
                total -= w * wr[t] * J
                g[t] -= w * wr[t] * dJ * x * (0.0 if abs(lr) > cap else 1.0)
                units += 1
                clipped_units += clipped
                seq_capped |= abs(lr) > cap
                ratio_sum += x
                ratio_max = max(ratio_max, x)
            elif ratio == "none":
                total -= w * wr[t] * A[i] * lp
                g[t] -= w * wr[t] * A[i]
            if ref is not None:
                u = max(-cap, min(cap, ref - lp))
                kl = math.exp(u) - u - 1.0
                kl_sum += kl
                total += w * beta * kl
                if abs(ref - lp) <= cap:
                    g[t] += beta * w * (1.0 - math.exp(u))
            if H is not None:
                ent_sum += H
                total -= entropy_coef * w * H
            logp_sum += lp
        capped_seqs += seq_capped
        grads.append(g)
    stats = {
        "clip_fraction": clipped_units / units if units else 0.0,
        "ratio_mean": (ratio_sum / units if units else 0.0) if ratio != "none" else 1.0,
        "ratio_max": ratio_max if ratio != "none" else 1.0,
        "cap_fraction": capped_seqs / n_seq if n_seq else 0.0,
        "delta_abs_mean": delta_abs / n_seq if n_seq else 0.0,
        "logp_mean": logp_sum / n_tok if n_tok else 0.0,
    }
    if any(t[2] is not None for s in seqs for t in s):
        stats["kl_mean"] = kl_sum / n_tok if n_tok else 0.0
    if any(t[3] is not None for s in seqs for t in s):
        stats["entropy_mean"] = ent_sum / n_tok if n_tok else 0.0
    stats.update(rollout_stats)
    return total, grads, stats
