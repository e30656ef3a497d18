"""Naive per-element oracles of ops 1-4 of docs/spec.md: Python floats and loops, no tensors.

They exist only to check the reference (tic_kernels/reference.py) element by element, including
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


def loss(seqs, A, *, ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
         dual_clip=None, max_log_ratio=20.0, aggregation=None, beta=0.0, entropy_coef=0.0,
         num_tokens=None, num_sequences=None, max_len=None):
    """seqs: list of sequences, each a list of (logp, old, ref, entropy) tuples.

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

    total, grads = 0.0, []
    units = clipped_units = capped_seqs = 0
    ratio_sum, ratio_max, delta_abs, logp_sum, kl_sum, ent_sum = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for i, s in enumerate(seqs):
        L = len(s)
        w = weight(L)
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
                total -= w * J
                g[t] -= w * L * dJ * x * chi / (L if ratio == "sequence_mean" else 1)
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
                total -= w * J
                g[t] -= w * dJ * x * (0.0 if abs(lr) > cap else 1.0)
                units += 1
                clipped_units += clipped
                seq_capped |= abs(lr) > cap
                ratio_sum += x
                ratio_max = max(ratio_max, x)
            elif ratio == "none":
                total -= w * A[i] * lp
                g[t] -= w * A[i]
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
    return total, grads, stats
