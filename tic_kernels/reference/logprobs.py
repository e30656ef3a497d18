"""The reference of ops 1, 6 and 7: per-token log-probabilities from logits, from the LM
head's hidden states (chunk by chunk), and over a vocabulary split across ranks."""
from __future__ import annotations

import math

import torch

from ..backend import first_order_only
from ..layout import row_chunks
from ..ops.vocab_parallel import combine_partials
from ..options import IGNORE_INDEX

# Elements of logits upcast at once: 64 MiB of fp32 per temporary. On 2 CPU cores, at
# (2048, 32000) fp32, 2^26 peaked 2.5x higher for ~20% less time, 2^22 took 1.7x longer.
CHUNK_ELEMENTS = 1 << 24


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
# its partial values combine into the whole vocabulary's with two all-reduces per call
# (tic_kernels.ops.vocab_parallel.combine_partials).
# --------------------------------------------------------------------------------------------
def vocab_partials(z, targets, temperature, start, with_entropy):
    """This shard's partial values for rows z (R, V_local), as the forward kernel writes them:
    logp of the target within the shard's own softmax (NaN where another shard holds it),
    max_logsum (R, 2) = (max of z / tau, log sum exp(z / tau - max)), and the entropy of the shard's
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


def vocab_logits_grad(z, targets, start, max_logsum, entropy, g, g_entropy, temperature):
    """dL/dz of this shard's rows z (R, V_local) from the whole vocabulary's max_logsum and entropy:
    (g (1[v = y] - p) - gH p (log p + H)) / tau, p the whole vocabulary's softmax
    (g_entropy None: no entropy term)."""
    log_p = (z / temperature - max_logsum[:, :1]) - max_logsum[:, 1:]
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
    forward; the backward forms each chunk's gradient from the saved whole-vocabulary max_logsum."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy, group, start):
        flat_t = targets.reshape(-1)
        dt = compute_dtype(logits)
        R, V = flat_t.numel(), logits.shape[-1]
        logp = torch.zeros(R, dtype=dt, device=logits.device)
        max_logsum = torch.zeros(R, 2, dtype=dt, device=logits.device)
        entropy = torch.zeros_like(logp)
        for base, chunk in _row_views(logits):
            t = flat_t[base:base + chunk.shape[0]]
            keep = (t != ignore_index).nonzero().squeeze(-1)  # ignored rows are never read
            rows = base + keep
            logp[rows], max_logsum[rows], entropy[rows] = vocab_partials(
                chunk[keep].to(dt), t[keep], temperature, start, with_entropy)
        logp, max_logsum, H = combine_partials(logp, max_logsum,
                                               entropy if with_entropy else None, flat_t,
                                               ignore_index, start, V, group)
        entropy = entropy if H is None else H
        ctx.save_for_backward(logits, targets, max_logsum, entropy)
        ctx.options = temperature, ignore_index, with_entropy, start
        return logp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_entropy):
        logits, targets, max_logsum, entropy = ctx.saved_tensors
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
                chunk[rows - base].to(dt), flat_t[rows], start, max_logsum[rows], entropy[rows],
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
class _LinearLogprobs(torch.autograd.Function):
    """logp (and entropy) of F.linear(hidden, weight, bias) chunk by chunk: the forward keeps
    only per-row values; the backward recomputes each chunk's logits and differentiates them
    with autograd, accumulating d weight and d bias across chunks (in fp32 unless told).

    With ``shard`` = (group, start) the weight holds rows [start, start + V_local) of the
    vocabulary (op 7): each chunk's partials are combined across the group in the forward and
    the backward forms each chunk's logits gradient from the saved whole-vocabulary max_logsum."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy,
                chunk_rows, fp32_accumulation, shard):
        h = hidden.reshape(-1, hidden.shape[-1])
        flat_t = targets.reshape(-1)
        keep = (flat_t != ignore_index).nonzero().squeeze(-1)  # rows never multiplied otherwise
        dt = compute_dtype(weight)
        logp = torch.zeros(h.shape[0], dtype=dt, device=h.device)
        entropy = torch.zeros_like(logp)
        max_logsum = torch.zeros(h.shape[0], 2, dtype=dt, device=h.device)
        for a, b in row_chunks(0, keep.numel(), chunk_rows):
            rows = keep[a:b]
            z = torch.nn.functional.linear(h[rows], weight, bias).to(dt)
            if shard is None:
                logp[rows], entropy[rows] = _rows_logprobs(z, flat_t[rows], temperature,
                                                           with_entropy)
                continue
            # every rank runs the same chunks (the rows are replicated): one combine each
            group, start = shard
            lp, max_logsum_c, H = vocab_partials(z, flat_t[rows], temperature, start, with_entropy)
            logp[rows], max_logsum[rows], H = combine_partials(
                lp, max_logsum_c, H if with_entropy else None, flat_t[rows], ignore_index,
                start, weight.shape[0], group)
            if with_entropy:
                entropy[rows] = H
        ctx.save_for_backward(hidden, weight, bias, targets, keep, max_logsum, entropy)
        ctx.options = temperature, with_entropy, chunk_rows, fp32_accumulation, shard
        return logp.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, keep, max_logsum, entropy = ctx.saved_tensors
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
                        z.detach(), t, shard[1], max_logsum[rows], entropy[rows], g_logp[rows],
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
