"""The executable specification: every op of docs/spec.md in plain PyTorch.

Tests, benchmarks and the CPU path all use these functions. They are written for clarity
first, with two exceptions that matter at real sizes:

* the logits are processed in row chunks, so a (16k, 152k) bf16 batch never has an fp32 copy of
  the whole (N, V) matrix in memory (the backward recomputes each chunk's softmax);
* log-ratios are formed per token (logp - logp_old) in fp32 before any reduction, never as a
  difference of two per-sequence sums (that loses ~1e-2 of Delta at 8k tokens).

Inputs are assumed valid (``tic_kernels.validation`` checks them in the public API). Float64
inputs compute in float64 (for gradcheck); everything else computes in float32. Outputs that are
log-probabilities, ratios, losses or statistics are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from .options import IGNORE_INDEX, default_aggregation
from .output import LossOutput

# Elements of logits upcast at once: 64 MiB of fp32 per temporary. On 2 CPU cores, at
# (2048, 32000) fp32, 2^26 peaked 2.5x higher for ~20% less time, 2^22 took 1.7x longer.
CHUNK_ELEMENTS = 1 << 24


def first_order_only(backward):
    """Wraps a backward of the reference or of the kernels: under create_graph=True (grad mode
    on inside backward) it raises instead of returning a gradient with no graph, which would be
    silently wrong."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("tic_kernels ops are differentiable once: double backward "
                               "(create_graph=True) is not supported")
        return backward(ctx, *grads)
    return wrapper


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Op 1: per-token log-softmax gather (with temperature and entropy)
# --------------------------------------------------------------------------------------------
def _rows_logprobs(z: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """logp (and entropy, else zeros) of a 2-D block of rows in the compute dtype.

    Every log-probability is formed relative to the row's max m, (z - m) - log sum exp(z - m):
    subtracting a logsumexp of logits near FLT_MAX would round its log-sum away.
    """
    z = z / temperature
    m = z.detach().amax(-1, keepdim=True)
    zs = z - torch.where(m == -torch.inf, 0.0, m)  # a row of -inf (no distribution) keeps its NaN
    log_s = torch.logsumexp(zs, dim=-1)
    logp = zs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_s
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    log_p = zs - log_s.unsqueeze(-1)
    p = log_p.exp()
    # p log p -> 0 as p -> 0: a -inf logit (a masked-out vocabulary entry) contributes exactly
    # 0, where 0 * -inf would be NaN; log_p is replaced before the product so that the
    # gradient is clean too
    return logp, -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)


def _matrices(x: torch.Tensor, base: int = 0):
    """(first flat row, 2-D view) pairs covering x (..., V) in row-major order, as views
    whatever the rank and strides (a (V,) tensor is one row)."""
    if x.dim() <= 2:
        yield base, x.reshape(1, -1) if x.dim() == 1 else x
        return
    rows = math.prod(x.shape[1:-1])
    for b in range(x.shape[0]):
        yield from _matrices(x[b], base + b * rows)


def _row_views(logits: torch.Tensor):
    """(first flat row, 2-D view) pairs covering logits (..., V) without copying it, in chunks
    of at most CHUNK_ELEMENTS elements."""
    V = logits.shape[-1]
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for base, mat in _matrices(logits):
        for start in range(0, mat.shape[0], rows):
            yield base + start, mat[start:start + rows]


class _TokenLogprobs(torch.autograd.Function):
    """Chunked forward; the backward recomputes each chunk and differentiates it with autograd."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy):
        flat_t = targets.reshape(-1)
        dt = compute_dtype(logits)
        logp = torch.zeros(flat_t.numel(), dtype=dt, device=logits.device)
        entropy = torch.zeros_like(logp)
        for start, chunk in _row_views(logits):
            t = flat_t[start:start + chunk.shape[0]]
            keep = (t != ignore_index).nonzero().squeeze(-1)  # ignored rows are never read
            lp, h = _rows_logprobs(chunk[keep].to(dt), t[keep], temperature, with_entropy)
            logp[start + keep] = lp
            entropy[start + keep] = h
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy
        return logp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_entropy):
        logits, targets = ctx.saved_tensors
        flat_t = targets.reshape(-1)
        dt = compute_dtype(logits)
        g_logp = g_logp.reshape(-1).to(dt)
        g_entropy = g_entropy.reshape(-1).to(dt)
        # contiguous, whatever the logits' strides (a permuted or expanded input included)
        grad = logits.new_zeros(logits.shape)
        flat_grad = grad.view(-1, logits.shape[-1])
        for start, chunk in _row_views(logits):
            t = flat_t[start:start + chunk.shape[0]]
            keep = (t != ctx.ignore_index).nonzero().squeeze(-1)
            rows = start + keep
            with torch.enable_grad():
                z = chunk[keep].detach().to(dt).requires_grad_(True)
                lp, h = _rows_logprobs(z, t[keep], ctx.temperature, ctx.with_entropy)
                outs, grads = ((lp, h), (g_logp[rows], g_entropy[rows])) if ctx.with_entropy \
                    else ((lp,), (g_logp[rows],))
                (gz,) = torch.autograd.grad(outs, z, grads)
            flat_grad[rows] = gz.to(grad.dtype)
        return grad, None, None, None, None


def token_logprobs(logits, targets, temperature=1.0, ignore_index=IGNORE_INDEX, return_entropy=False):
    """logp[..., t] = log softmax(logits / temperature)[targets]; see docs/spec.md, op 1.

    logits (..., V) float; targets (...) int. Returns logp (...) (and entropy (...)); rows whose
    target equals ignore_index get 0 for both and a zero gradient.
    """
    if torch.compiler.is_compiling():
        logp, entropy = _traced_logprobs(logits, targets, temperature, ignore_index,
                                         return_entropy)
    else:
        logp, entropy = _TokenLogprobs.apply(logits, targets, float(temperature),
                                             int(ignore_index), bool(return_entropy))
    return (logp, entropy) if return_entropy else logp


def _traced_logprobs(logits, targets, temperature, ignore_index, with_entropy):
    """What _TokenLogprobs computes, for torch.compile: every row at once (a compiled graph
    fuses the pass; chunks would not bound its memory) and ignored rows masked rather than
    skipped, so that no size depends on the data. Their logits never reach a result or a
    gradient."""
    keep = targets != ignore_index
    z = torch.where(keep.unsqueeze(-1), logits, 0).to(compute_dtype(logits))
    logp, entropy = _rows_logprobs(z.reshape(-1, z.shape[-1]),
                                   torch.where(keep, targets, 0).reshape(-1), temperature,
                                   with_entropy)
    return (torch.where(keep, logp.view(targets.shape), 0.0),
            torch.where(keep, entropy.view(targets.shape), 0.0))


# --------------------------------------------------------------------------------------------
# Op 7: vocabulary parallelism. A rank holds columns [start, start + V_local) of the vocabulary;
# its partial values combine into the whole vocabulary's with two all-reduces per call.
# --------------------------------------------------------------------------------------------
def vocab_partials(z, targets, temperature, start, with_entropy):
    """This shard's partial values for rows z (R, V_local), as the forward kernel writes them:
    logp of the target within the shard's own softmax (NaN where another shard holds it),
    lse (R, 2) = (max of z / tau, log sum exp(z / tau - max)), and the entropy of the shard's
    own softmax (zeros unless with_entropy)."""
    z = z / temperature
    m = z.amax(-1)
    zs = z - torch.where(m == -torch.inf, 0.0, m).unsqueeze(-1)
    e = zs.exp()
    s = e.sum(-1)
    log_s = s.log()
    t = targets - start
    owned = (t >= 0) & (t < z.shape[-1])
    zt = zs.gather(-1, t.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(owned, zt - log_s, torch.nan)
    H = log_s - (e * torch.where(e > 0, zs, 0.0)).sum(-1) / s if with_entropy \
        else torch.zeros_like(logp)
    return logp, torch.stack([m, log_s], -1), H


def vocab_combine(logp, lse, entropy, targets, ignore_index, start, V_local, group):
    """The whole vocabulary's (logp, lse (R, 2), entropy) from every rank's partials (entropy
    None: not wanted). With M the row max over the ranks and a_r = sum over shard r of
    exp(z - M): log S = log sum_r a_r, logp = (logp_r + log a_r) - log S on the rank r owning
    the target, H = sum_r a_r (H_r - log a_r) / S + log S. Communication per row: one MAX
    all-reduce of 1 float and one SUM all-reduce of 2 floats (3 with the entropy), in the
    partials' dtype: 12 bytes (16) in fp32."""
    import torch.distributed as dist
    m, log_s = lse.unbind(-1)
    M = m.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(M == -torch.inf, 0.0, M)
    log_a = (m - shift) + log_s  # -inf when every logit of the shard is -inf
    a = log_a.exp()
    t = targets - start
    owned = (t >= 0) & (t < V_local)
    parts = [a, torch.where(owned, torch.where(m == -torch.inf, -torch.inf, logp + log_a), 0.0)]
    if entropy is not None:
        parts.append(torch.where(a > 0, a * (entropy - log_a), 0.0))
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=group)
    log_S = sums[0].log()
    active = targets != ignore_index
    # a target that no rank holds (outside the whole vocabulary, reachable only with the value
    # checks off) has no owner term: NaN, as op 1 gives it, never the plausible -log S
    whole = V_local * dist.get_world_size(group)
    held = (targets >= 0) & (targets < whole)
    logp = torch.where(active, torch.where(held, sums[1] - log_S, torch.nan), 0.0)
    H = None if entropy is None else torch.where(active, sums[2] / sums[0] + log_S, 0.0)
    return logp, torch.stack([torch.where(active, shift, 0.0),
                              torch.where(active, log_S, 0.0)], -1), H


def vocab_logits_grad(z, targets, start, lse, entropy, g, g_entropy, temperature):
    """dL/dz of this shard's rows z (R, V_local) from the whole vocabulary's lse and entropy:
    (g (1[v = y] - p) - gH p (log p + H)) / tau, p the whole vocabulary's softmax
    (g_entropy None: no entropy term)."""
    log_p = (z / temperature - lse[:, :1]) - lse[:, 1:]
    p = log_p.exp()
    d = -g.unsqueeze(-1) * p
    t = targets - start
    owned = ((t >= 0) & (t < z.shape[-1])).nonzero().squeeze(-1)
    d[owned, t[owned]] += g[owned]
    if g_entropy is not None:
        d -= g_entropy.unsqueeze(-1) * p * torch.where(p > 0, log_p + entropy.unsqueeze(-1), 0.0)
    return d / temperature


class _VocabTokenLogprobs(torch.autograd.Function):
    """Op 1 over a shard of the vocabulary: chunked partials combined across the group in the
    forward; the backward forms each chunk's gradient from the saved whole-vocabulary lse."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy, group, start):
        flat_t = targets.reshape(-1)
        dt = compute_dtype(logits)
        R, V = flat_t.numel(), logits.shape[-1]
        logp = torch.zeros(R, dtype=dt, device=logits.device)
        lse = torch.zeros(R, 2, dtype=dt, device=logits.device)
        entropy = torch.zeros_like(logp)
        for base, chunk in _row_views(logits):
            t = flat_t[base:base + chunk.shape[0]]
            keep = (t != ignore_index).nonzero().squeeze(-1)  # ignored rows are never read
            rows = base + keep
            logp[rows], lse[rows], entropy[rows] = vocab_partials(
                chunk[keep].to(dt), t[keep], temperature, start, with_entropy)
        logp, lse, H = vocab_combine(logp, lse, entropy if with_entropy else None, flat_t,
                                     ignore_index, start, V, group)
        entropy = entropy if H is None else H
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.options = temperature, ignore_index, with_entropy, start
        return logp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, start = ctx.options
        flat_t = targets.reshape(-1)
        dt = compute_dtype(logits)
        g_logp, g_entropy = g_logp.reshape(-1).to(dt), g_entropy.reshape(-1).to(dt)
        grad = logits.new_zeros(logits.shape)
        flat_grad = grad.view(-1, logits.shape[-1])
        for base, chunk in _row_views(logits):
            t = flat_t[base:base + chunk.shape[0]]
            rows = base + (t != ignore_index).nonzero().squeeze(-1)
            flat_grad[rows] = vocab_logits_grad(
                chunk[rows - base].to(dt), flat_t[rows], start, lse[rows], entropy[rows],
                g_logp[rows], g_entropy[rows] if with_entropy else None,
                temperature).to(grad.dtype)
        return grad, None, None, None, None, None, None


def vocab_token_logprobs(logits, targets, temperature, ignore_index, return_entropy, group,
                         start):
    """token_logprobs over columns [start, start + V_local) of the vocabulary held by this rank
    of ``group`` (targets are global ids): the whole vocabulary's values, this shard's
    gradient."""
    logp, entropy = _VocabTokenLogprobs.apply(logits, targets, float(temperature),
                                              int(ignore_index), bool(return_entropy), group,
                                              int(start))
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# Op 6: the fused LM head (log-probs from hidden states, one chunk of logits at a time)
# --------------------------------------------------------------------------------------------
def row_chunks(a: int, b: int, rows: int):
    """[a, b) in the fewest pieces of at most ``rows``, of equal sizes (no ragged last GEMM)."""
    if b <= a:
        return []
    pieces = -(-(b - a) // rows)
    size = -(-(b - a) // pieces)
    return [(s, min(s + size, b)) for s in range(a, b, size)]


class _LinearLogprobs(torch.autograd.Function):
    """logp (and entropy) of F.linear(hidden, weight, bias) chunk by chunk: the forward keeps
    only per-row values; the backward recomputes each chunk's logits and differentiates them
    with autograd, accumulating d weight and d bias across chunks (in fp32 unless told).

    With ``shard`` = (group, start) the weight holds rows [start, start + V_local) of the
    vocabulary (op 7): each chunk's partials are combined across the group in the forward and
    the backward forms each chunk's logits gradient from the saved whole-vocabulary lse."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy,
                chunk_rows, fp32_accumulation, shard):
        h = hidden.reshape(-1, hidden.shape[-1])
        flat_t = targets.reshape(-1)
        keep = (flat_t != ignore_index).nonzero().squeeze(-1)  # rows never multiplied otherwise
        dt = compute_dtype(weight)
        logp = torch.zeros(h.shape[0], dtype=dt, device=h.device)
        entropy = torch.zeros_like(logp)
        lse = torch.zeros(h.shape[0], 2, dtype=dt, device=h.device)
        for a, b in row_chunks(0, keep.numel(), chunk_rows):
            rows = keep[a:b]
            z = torch.nn.functional.linear(h[rows], weight, bias).to(dt)
            if shard is None:
                logp[rows], entropy[rows] = _rows_logprobs(z, flat_t[rows], temperature,
                                                           with_entropy)
                continue
            # every rank runs the same chunks (the rows are replicated): one combine each
            group, start = shard
            lp, lse_c, H = vocab_partials(z, flat_t[rows], temperature, start, with_entropy)
            logp[rows], lse[rows], H = vocab_combine(lp, lse_c, H if with_entropy else None,
                                                     flat_t[rows], ignore_index, start,
                                                     weight.shape[0], group)
            if with_entropy:
                entropy[rows] = H
        ctx.save_for_backward(hidden, weight, bias, targets, keep, lse, entropy)
        ctx.options = temperature, with_entropy, chunk_rows, fp32_accumulation, shard
        return logp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, keep, lse, entropy = ctx.saved_tensors
        temperature, with_entropy, chunk_rows, fp32_accumulation, shard = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h = hidden.reshape(-1, hidden.shape[-1])
        dt = compute_dtype(weight)
        g_logp, g_entropy = g_logp.reshape(-1).to(dt), g_entropy.reshape(-1).to(dt)
        acc = dt if fp32_accumulation else weight.dtype
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for a, b in row_chunks(0, keep.numel(), chunk_rows):
            rows = keep[a:b]
            with torch.enable_grad():
                x = h[rows].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                c = None if bias is None else bias.detach().requires_grad_(need_b)
                z = torch.nn.functional.linear(x, w, c).to(dt)
                t = targets.reshape(-1)[rows]
                if shard is not None:  # the closed form: z's gradient needs the other shards
                    outs, grads = (z,), (vocab_logits_grad(
                        z.detach(), t, shard[1], lse[rows], entropy[rows], g_logp[rows],
                        g_entropy[rows] if with_entropy else None, temperature),)
                else:
                    lp, ent = _rows_logprobs(z, t, temperature, with_entropy)
                    outs, grads = ((lp, ent), (g_logp[rows], g_entropy[rows])) \
                        if with_entropy else ((lp,), (g_logp[rows],))
                wrt = [t for t, need in ((x, need_h), (w, need_w), (c, need_b)) if need]
                got = list(torch.autograd.grad(outs, wrt, grads))
            if need_h:
                dh[rows] = got.pop(0)
            if need_w:
                dw += got.pop(0)
            if need_b:
                db += got.pop(0)
        return (None if dh is None else dh.view(hidden.shape),
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype)) + (None,) * 7


def linear_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0,
                          ignore_index=IGNORE_INDEX, return_entropy=False, chunk_size=None,
                          fp32_accumulation=True, shard=None):
    """token_logprobs(F.linear(hidden, weight, bias), targets, ...) without the logits: at most
    ``chunk_size`` rows of them at a time (default: CHUNK_ELEMENTS elements, as the other
    chunked ops here); see docs/spec.md, op 6. ``shard`` = (group, start): the weight holds
    vocabulary rows [start, start + V_local) (op 7); d hidden is this rank's partial."""
    if torch.compiler.is_compiling() and shard is None:  # as token_logprobs traces
        # ignored rows are zeros before the GEMM: whatever they hold reaches no gradient
        x = torch.where((targets != ignore_index).unsqueeze(-1), hidden, 0)
        logp, entropy = _traced_logprobs(torch.nn.functional.linear(x, weight, bias), targets,
                                         temperature, ignore_index, return_entropy)
        return (logp, entropy) if return_entropy else logp
    rows = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])  # as token_logprobs chunks
    logp, entropy = _LinearLogprobs.apply(hidden, weight, bias, targets, float(temperature),
                                          int(ignore_index), bool(return_entropy), rows,
                                          bool(fp32_accumulation), shard)
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# Layouts: padded (B, T) + mask  <->  packed (N,) + cu_seqlens
# --------------------------------------------------------------------------------------------
def lengths_of(cu_seqlens=None, mask=None):
    if cu_seqlens is not None:
        return (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return mask.bool().sum(1)


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
def clipped_objective(x, A, clip_mode="two_sided", eps_low=0.2, eps_high=0.28, dual_clip=None):
    """J = min(x A, clip(x) A) [, max(J, c A) for A < 0]; returns J and the clipped mask.

    dJ/dx is A where the unclipped branch is selected (ties included) and 0 where the constant
    branch is: the constant branch is detached rather than left to min()'s tie rule.
    """
    hi = 1.0 + eps_high
    xc = x.clamp(1.0 - eps_low, hi) if clip_mode == "two_sided" else x.clamp(max=hi)
    unclipped, constant = x * A, xc * A
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


def tic_loss_from_logprobs(logprobs, old_logprobs, advantages, cu_seqlens=None, mask=None,
                           ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                           dual_clip=None, max_log_ratio=20.0, aggregation=None,
                           ref_logprobs=None, beta=0.0, num_tokens=None, num_sequences=None,
                           max_len=None, entropy=None, entropy_coef=0.0, **rollout):
    """The loss of docs/spec.md, op 4, on per-token log-probabilities; returns LossOutput(loss, stats).

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
    delta = segment_sum(d, lengths)

    stats = {}
    if ratio == "none":
        J_tok = A[seg] * logp
        zero = logp.new_zeros(())
        stats.update(clip_fraction=zero, ratio_mean=zero + 1, ratio_max=zero + 1, cap_fraction=zero)
    else:
        if ratio == "token":
            log_ratio, A_unit, n_units, unit_ok = d, A[seg], d.new_tensor(d.numel()), None
        else:
            log_ratio = delta if ratio == "trajectory" else delta / L.clamp(min=1)
            A_unit, n_units, unit_ok = A, n_seq, nonempty.bool()
        capped = log_ratio.abs() > cap
        x = log_ratio.clamp(-cap, cap).exp()  # clamp's gradient is 0 beyond the cap
        J_unit, clipped = clipped_objective(x, A_unit, clip_mode, eps_low, eps_high, dual_clip)
        J_tok = J_unit if ratio == "token" else J_unit[seg]
        xd = x.detach()
        if unit_ok is not None:  # empty sequences are not units
            clipped, capped, xd = clipped & unit_ok, capped & unit_ok, xd * unit_ok
        seq_capped = capped if ratio != "token" else segment_sum(capped.to(dt), lengths) > 0
        stats.update(clip_fraction=_mean(clipped.to(dt), n_units),
                     ratio_mean=_mean(xd, n_units),
                     ratio_max=_largest(xd, torch.ones_like(xd, dtype=torch.bool)),
                     cap_fraction=_mean(seq_capped.to(dt), n_seq))

    stats_of = {}
    if rollout.get("rollout_logprobs") is not None or rollout.get("rollout_weights") is not None:
        w_rollout, stats_of = rollout_correction(old_logprobs, lengths, cap, dt, **rollout)
        J_tok = J_tok * w_rollout  # a detached weight on the policy objective only
    stats.update(stats_of)

    n_tok = logp.new_tensor(float(logp.numel()))
    if ref_logprobs is not None:
        # k3 estimator; the cap keeps exp finite, gradient 0 beyond it
        kl = _k3((ref_logprobs.to(dt) - logp).clamp(-cap, cap))
        if beta:
            J_tok = J_tok - beta * kl
        stats["kl_mean"] = _mean(kl.detach(), n_tok)

    norm = aggregation_norm(aggregation, n_seq, n_tok, num_sequences, num_tokens, max_len)
    w = norm / L[seg] if aggregation == "seq-mean-token-mean" else norm.expand(logp.shape)
    loss = -(w * J_tok).sum() + _NaNGradientWhere.apply(logp, torch.isnan(J_tok.detach()))
    if entropy is not None:
        H = entropy.to(dt)
        if entropy_coef:
            loss = loss - entropy_coef * (w * H).sum()
        stats["entropy_mean"] = _mean(H.detach(), n_tok)

    stats["delta_abs_mean"] = _mean(delta.detach().abs(), n_seq)
    stats["logp_mean"] = _mean(logp.detach(), n_tok)
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    return LossOutput(loss.to(out_dt), {k: stats[k].to(out_dt) for k in sorted(stats)})


def aggregation_norm(aggregation, n_seq, n_tok, num_sequences=None, num_tokens=None,
                     max_len=None):
    """The loss's normaliser, from the counts of non-empty sequences and of tokens (tensors):
    1/N_tok (token-mean), 1/(B' max_len) (seq-mean-token-sum-norm), else 1/B'; the given
    global counts replace the batch's. A token's aggregation weight is norm, or norm / L_i
    under seq-mean-token-mean."""
    B = (n_seq if num_sequences is None else n_seq.new_tensor(float(num_sequences))).clamp(min=1)
    if aggregation == "token-mean":
        return 1.0 / (n_tok if num_tokens is None else n_tok.new_tensor(float(num_tokens))).clamp(min=1)
    if aggregation == "seq-mean-token-sum-norm":
        return 1.0 / (B * float(max_len))
    return 1.0 / B


def ignoring_masked(targets, mask):
    """targets with the positions outside ``mask`` set to IGNORE_INDEX (mask None: unchanged):
    the losses' way of never reading a padded row."""
    if mask is None:
        return targets
    return torch.where(mask.bool(), targets, torch.full_like(targets, IGNORE_INDEX))


def _loss_from_rows(logprobs_of, targets, old_logprobs, advantages, cu_seqlens, mask,
                    entropy_coef, loss_options):
    """tic_loss_from_logprobs on logprobs_of(targets, with_entropy), masked rows ignored."""
    logp, entropy = logprobs_of(ignoring_masked(targets, mask), entropy_coef != 0.0)
    return tic_loss_from_logprobs(logp, old_logprobs, advantages, cu_seqlens=cu_seqlens,
                                  mask=mask, entropy=entropy if entropy_coef != 0.0 else None,
                                  entropy_coef=entropy_coef, **loss_options)


def tic_loss(logits, targets, old_logprobs, advantages, cu_seqlens=None, mask=None,
             temperature=1.0, entropy_coef=0.0, inplace_backward=False, shard=None,
             **loss_options):
    """tic_loss_from_logprobs applied to token_logprobs(logits, targets); see docs/spec.md, op 4.
    ``shard`` = (group, start): the logits are vocabulary columns [start, start + V_local)
    (op 7).

    ``inplace_backward`` is accepted for signature parity and ignored: the reference allocates.
    """
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


# --------------------------------------------------------------------------------------------
# Op 5: variable-length packing (the C++/CUDA extension computes the same)
# --------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """Packed tokens of a padded (B, T) batch; N_all kept tokens, N loss rows.

    input_ids (N_all,) kept ids, row-major; cu_seqlens (B+1,) int32; position_ids (N_all,)
    int64 restarting at 0 per sequence; indices (N_all,) int64 flat positions b * T + t of the
    kept tokens (for unpack); loss_rows (N,) int64 packed positions whose next kept token is a
    completion token; loss_targets (N,) those next tokens; loss_cu_seqlens (B+1,) int32 the loss
    rows per sequence; max_seqlen int, the longest sequence. The order is the extension op's.
    """
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    indices: torch.Tensor
    loss_rows: torch.Tensor
    loss_targets: torch.Tensor
    loss_cu_seqlens: torch.Tensor
    max_seqlen: int

    def tensors(self):
        """The seven tensors, in order (for comparing two packings)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "max_seqlen")


def varlen_pack(input_ids, attention_mask, completion_mask):
    """Padded (B, T) batch -> PackedBatch (tic_kernels.packing.pack). A loss row is a packed
    position whose next kept token in the same sequence is a completion token; its target is
    that token."""
    B, T = attention_mask.shape
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    indices = keep.reshape(-1).nonzero().squeeze(1)
    packed = input_ids.reshape(-1)[indices]
    position_ids = (keep.long().cumsum(1) - 1).reshape(-1)[indices]
    completion = completion_mask.bool().reshape(-1)[indices]
    has_prev = position_ids > 0
    src = (completion & has_prev).nonzero().squeeze(1)  # packed positions of predicted tokens
    loss_rows = src - 1
    seq = segment_ids(lengths)
    loss_lengths = torch.bincount(seq[src], minlength=B)
    return PackedBatch(packed, cu_seqlens_from(lengths), position_ids, indices, loss_rows,
                       packed[src], cu_seqlens_from(loss_lengths),
                       int(lengths.max()) if B and T else 0)


def cu_seqlens_from(lengths):
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def varlen_unpack(values, indices, batch, seqlen, pad=0.0):
    """(N, ...) values scattered to (batch, seqlen, ...) at the flat ``indices``; ``pad``
    elsewhere. Differentiable w.r.t. values."""
    out = values.new_full((batch * seqlen, *values.shape[1:]), pad)
    out = out.index_put((indices,), values)
    return out.view(batch, seqlen, *values.shape[1:])
