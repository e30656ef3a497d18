"""Op 6: the fused LM head. Log-probabilities and the TIC loss from the last hidden states and
the LM head's weight, never holding the (N, V) logits.

The logits exist one chunk of rows at a time, in one reused (rows, V) buffer in the weight's
dtype: a GEMM (torch.mm / addmm, fp32 accumulation) fills it, the row kernels of op 1 read it,
and the chunk's gradient is written over it before two more GEMMs turn it into d hidden and
d weight. Rows that carry no loss (mask 0, ignore_index) are never multiplied.

``linear_tic_loss`` (bf16, fp32) forms the gradient in the forward: when a chunk holds whole
sequences, their ratios are known as soon as the chunk's log-probs are, so the chunk's logits gradient,
d hidden and d weight follow at once, scaled by the incoming gradient in the backward: three
GEMMs per chunk, like the unfused path. A sequence longer than a chunk is done in two passes
(log-probs over its chunks, then each chunk recomputed for the gradient: one more GEMM). With
no gradient required only the forward runs. ``linear_token_logprobs`` does not know its
incoming gradient in the forward: it keeps the per-row logsumexp and recomputes each chunk in
the backward (four GEMMs). So does ``linear_tic_loss`` in fp16, where the incoming gradient
carries the loss scale that keeps small gradients representable (GradScaler): a gradient
rounded to fp16 before it is scaled would lose them.

Memory beyond inputs and outputs: one chunk of logits (``chunk_size`` rows; by default the
rows that fit options.LM_HEAD_CHUNK_BYTES = 1 GiB), O(N) floats, the gradient of hidden and
of the bias, and d weight accumulated across chunks in an fp32 (V, H) buffer unless
``fp32_accumulation=False`` or the weight is fp32 (then the gradient itself accumulates). On a
GPU each chunk's d weight GEMM accumulates into the fp32 buffer directly; on the CPU (and on
a torch whose GEMM cannot) each chunk's product is rounded to the weight's dtype once, block
by block, before it is added.

The ops are opaque torch.library custom ops: they plan the chunks on the host (reading
cu_seqlens, and the mask's or the targets' active rows: host syncs), so torch.compile calls
them as they are and traces around them.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import reference, vocab_parallel
from . import validation as check
from .backend import grads_by_name, use_triton
from .logprobs import launch_bwd, launch_fwd
from .loss import (STAT_KEYS, Rollout, launch_finalize, launch_ratio_fwd, loss_on_segments,
                   new_partials, stats_dict)
from .options import IGNORE_INDEX, default_aggregation, lm_head_chunk_rows
from .output import LossOutput


_MIXED_GEMM = {"cuda": True}  # whether torch.addmm(..., out_dtype=float32) runs here
_FALLBACK_ROWS = 8192  # rows of d weight formed at once when the GEMM cannot accumulate in fp32


def _accumulate_mm(acc, a, b):
    """acc += a @ b, with the GEMM accumulating into acc's dtype where the device can."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MIXED_GEMM["cuda"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as e:  # a torch without the mixed-dtype GEMM
            _MIXED_GEMM["cuda"] = False
            warnings.warn(f"fused LM head: torch.addmm(out_dtype=float32) failed ({e}); d weight "
                          "is now formed in the weight's dtype, block by block, and summed in fp32")
    # each block of the product is rounded to a's dtype once, then summed in acc's: a bounded
    # temporary (8192 rows of d weight), not a second (V, H) matrix
    for v in range(0, acc.shape[0], _FALLBACK_ROWS):
        acc[v:v + _FALLBACK_ROWS] += a[v:v + _FALLBACK_ROWS] @ b


class _Head:
    """The LM head over ``rows`` of hidden (None: all, in order): a chunk's logits into the
    reused buffer, and a chunk's logits gradient (written over them) into d hidden, d weight
    and d bias."""

    def __init__(self, hidden, weight, bias, rows, chunk, temperature, ignore_index,
                 fp32_accumulation, need_dh, need_dw, need_db, shard=None):
        n = hidden.shape[0] if rows is None else rows.numel()
        V = weight.shape[0]
        self.hidden, self.weight, self.bias, self.rows = hidden, weight, bias, rows
        self.shard, self.vocab_start = shard, 0 if shard is None else shard.start
        self.temperature, self.ignore_index = temperature, ignore_index
        self.buf = torch.empty(min(chunk, n), V, dtype=weight.dtype, device=weight.device)
        acc = torch.float32 if fp32_accumulation else weight.dtype
        self.dh = torch.zeros_like(hidden) if need_dh else hidden.new_empty(0)
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw \
            else weight.new_empty(0)
        self.db = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_db \
            else weight.new_empty(0)

    def logits(self, a, b):
        """(logits, hidden rows) of selected rows [a, b)."""
        x = self.hidden[a:b] if self.rows is None else self.hidden[self.rows[a:b]]
        z = self.buf[:b - a]
        if self.bias is None:
            torch.mm(x, self.weight.t(), out=z)
        else:
            torch.addmm(self.bias, x, self.weight.t(), out=z)
        return z, x

    def forward(self, a, b, targets, logp, lse, entropy):
        """Logits of rows [a, b) and their logp, lse (and entropy) into the buffers' [a, b);
        under op 7 this shard's partials (see combine)."""
        z, x = self.logits(a, b)
        launch_fwd(z, targets[a:b], logp[a:b], lse[2 * a:2 * b],
                   entropy[a:b] if entropy.numel() else entropy, self.temperature,
                   self.ignore_index, entropy.numel() > 0, self.vocab_start)
        return z, x

    def combine(self, a, b, targets, logp, lse, entropy):
        """Op 7: rows [a, b)'s partials made the whole vocabulary's, in place (two
        all-reduces; every rank runs the same rows in the same order)."""
        if self.shard is None or b <= a:
            return
        e = entropy[a:b] if entropy.numel() else entropy
        logp[a:b], lse[2 * a:2 * b], e[:] = vocab_parallel.combine(
            logp[a:b], lse[2 * a:2 * b], e, targets[a:b], self.ignore_index, self.shard)

    def backward(self, z, x, a, b, targets, lse, entropy, g, g_entropy):
        """The gradient of rows [a, b) written over their logits z, then into the gradients."""
        launch_bwd(z, z, targets[a:b], lse[2 * a:2 * b],
                   entropy[a:b] if g_entropy.numel() else entropy, g, g_entropy,
                   self.temperature, self.ignore_index, self.vocab_start)
        if self.dh.numel():
            if self.rows is None:
                torch.mm(z, self.weight, out=self.dh[a:b])
            else:
                self.dh.index_copy_(0, self.rows[a:b], z @ self.weight)
        if self.dw.numel():
            _accumulate_mm(self.dw, z.t(), x)
        if self.db.numel():
            self.db += z.sum(0, dtype=torch.float32)

    def grads(self):
        dw = self.dw.to(self.weight.dtype) if self.dw.numel() else self.dw
        db = self.db.to(self.bias.dtype) if self.db.numel() else self.db
        return self.dh, dw, db


def _active_rows(keep):
    """Indices of the rows to multiply, or None when every row is (one host sync)."""
    rows = keep.nonzero().squeeze(-1)
    return None if rows.numel() == keep.numel() else rows


def _compact(t, rows):
    return t if rows is None else t[rows]


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: forward keeps per-row values, backward recomputes each chunk
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tic_kernels::linear_logprobs", mutates_args=())
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, temperature: float, ignore_index: int,
                    with_entropy: bool, chunk_rows: int, fp32_accumulation: bool, group_name: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (R,), lse (2R,), entropy (R,) or (0,)) fp32 of rows hidden (R, H) against the
    head; lse as token_logprobs_fwd keeps it. Ignored rows get zeros and are not multiplied.
    ``group_name`` (op 7; "" none): the head is that group's vocabulary shard."""
    R = targets.numel()
    rows = _active_rows(targets != ignore_index)
    t = _compact(targets, rows).contiguous()
    n = t.numel()
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(2 * n, dtype=torch.float32, device=dev)
    entropy = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=dev)
    head = _Head(hidden, weight, bias, rows, chunk_rows, temperature, ignore_index, False,
                 False, False, False, vocab_parallel.from_name(group_name, weight.shape[0]))
    for a, b in reference.row_chunks(0, n, chunk_rows):
        head.forward(a, b, t, logp, lse, entropy)
    head.combine(0, n, t, logp, lse, entropy)
    if rows is None:
        return logp, lse, entropy
    full = torch.zeros(R, dtype=torch.float32, device=dev)
    full_lse = torch.zeros(R, 2, dtype=torch.float32, device=dev)
    full_lse[rows] = lse.view(n, 2)
    return (full.index_copy(0, rows, logp), full_lse.view(-1),
            full.index_copy(0, rows, entropy) if with_entropy else entropy)


@linear_logprobs.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, chunk_rows,
      fp32_accumulation, group_name):
    R = targets.numel()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (torch.empty(R, **f32), torch.empty(2 * R, **f32),
            torch.empty(R if with_entropy else 0, **f32))


@torch.library.custom_op("tic_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                        g_logp: torch.Tensor, g_entropy: torch.Tensor, temperature: float,
                        ignore_index: int, chunk_rows: int, fp32_accumulation: bool,
                        need_dh: bool, need_dw: bool, need_db: bool, group_name: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias), each empty when not needed, from the forward's lse and
    the incoming gradients (g_entropy empty: no entropy term); each chunk is recomputed.
    Under op 7 (``group_name``) d hidden is this shard's partial."""
    rows = _active_rows(targets != ignore_index)
    t = _compact(targets, rows).contiguous()
    lse = _compact(lse.view(-1, 2), rows).reshape(-1).contiguous()
    g = _compact(g_logp, rows).float().contiguous()
    with_entropy = g_entropy.numel() > 0
    if with_entropy:
        entropy = _compact(entropy, rows).contiguous()
        g_entropy = _compact(g_entropy, rows).float().contiguous()
    head = _Head(hidden, weight, bias, rows, chunk_rows, temperature, ignore_index,
                 fp32_accumulation, need_dh, need_dw, need_db,
                 vocab_parallel.from_name(group_name, weight.shape[0]))
    for a, b in reference.row_chunks(0, t.numel(), chunk_rows):
        z, x = head.logits(a, b)
        head.backward(z, x, a, b, t, lse, entropy, g[a:b],
                      g_entropy[a:b] if with_entropy else g_entropy)
    return head.grads()


def _grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0),
            torch.empty_like(bias) if need_db else weight.new_empty(0))


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, targets, lse, entropy, g_logp, g_entropy, temperature,
      ignore_index, chunk_rows, fp32_accumulation, need_dh, need_dw, need_db, group_name):
    return _grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db)


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, rows, fp32, group = \
        inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.options = temperature, ignore_index, with_entropy, rows, fp32, group


@reference.first_order_only
def _logprobs_backward(ctx, g_logp, _g_lse, g_entropy):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, with_entropy, rows, fp32, group = ctx.options
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    if g_logp is None:  # only the entropy was used
        g_logp = lse.new_zeros(targets.numel())
    if not with_entropy or g_entropy is None:
        g_entropy = lse.new_empty(0)
    dh, dw, db = linear_logprobs_bwd(hidden, weight, bias, targets, lse, entropy, g_logp,
                                     g_entropy, temperature, ignore_index, rows, fp32,
                                     need_dh, need_dw, bool(need_db and bias is not None), group)
    return grads_by_name(linear_logprobs, hidden=dh if need_dh else None,
                         weight=dw if need_dw else None, bias=db if need_db else None)


linear_logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


# ---------------------------------------------------------------------------------------------
# linear_tic_loss: the loss with its gradient formed in the forward
# ---------------------------------------------------------------------------------------------
def _sequence_groups(cu, rows):
    """[s0, s1) runs of consecutive sequences whose tokens fit ``rows`` together; a sequence
    longer than that is a run of its own (done in two passes)."""
    groups, s0, B = [], 0, len(cu) - 1
    while s0 < B:
        s1 = s0 + 1
        while s1 < B and cu[s1 + 1] - cu[s0] <= rows:
            s1 += 1
        groups.append((s0, s1))
        s0 = s1
    return groups


@torch.library.custom_op("tic_kernels::linear_loss", mutates_args=())
def linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor],
                advantages: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], temperature: float, entropy_coef: float,
                ratio: str, clip_mode: str, eps_low: float, eps_high: float,
                dual_clip: Optional[float], max_log_ratio: float, aggregation: str, beta: float,
                num_tokens: Optional[float], num_sequences: Optional[float],
                max_len: Optional[float], rollout: Optional[torch.Tensor], rollout_mode: str,
                rollout_lo: float, rollout_hi: float, chunk_rows: int, fp32_accumulation: bool,
                need_dh: bool, need_dw: bool, need_db: bool, group_name: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (len(STAT_KEYS),), d hidden, d weight, d bias) for hidden (R, H) and
    per-token (R,) tensors, packed (cu_seqlens) or padded (mask (B, T), R = B T); the
    gradients are those of the loss itself (each empty when not needed), the backward scales
    them. The sampler correction is Rollout(rollout, rollout_mode, rollout_lo, rollout_hi).
    ``group_name`` (op 7; "" none): the head is that group's vocabulary shard, d hidden this
    shard's partial."""
    dev = hidden.device
    if mask is not None:  # the loss rows, packed
        rows = _active_rows(mask.reshape(-1).bool())
        cu = torch.nn.functional.pad(mask.sum(1, dtype=torch.int64).cumsum(0), (1, 0))
    else:
        rows, cu = None, cu_seqlens.to(torch.int64)
    t, old = _compact(targets, rows).contiguous(), _compact(old, rows).float().contiguous()
    ref = None if ref is None else _compact(ref, rows).float().contiguous()
    correction = Rollout(None if rollout is None else _compact(rollout, rows).contiguous(),
                         rollout_mode, rollout_lo, rollout_hi)
    cu = cu.contiguous()
    cu_host = cu.tolist()
    n, B = t.numel(), len(cu_host) - 1
    lengths = torch.tensor(cu_host, dtype=torch.float64).diff()
    norm = float(reference.aggregation_norm(aggregation, (lengths > 0).sum().double(),
                                            lengths.sum(), num_sequences, num_tokens, max_len))
    f32 = dict(dtype=torch.float32, device=dev)
    with_entropy = entropy_coef != 0.0
    logp, lse = torch.empty(n, **f32), torch.empty(2 * n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    coef, coef_ent = torch.empty(n, **f32), torch.empty(n if with_entropy else 0, **f32)
    part, loss, stats, norm_out = new_partials(B, dev)
    options = dict(ratio=ratio, clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high,
                   dual_clip=dual_clip, max_log_ratio=max_log_ratio, aggregation=aggregation,
                   beta=beta, rollout=correction)
    advantages = advantages.float().contiguous()
    grad = need_dh or need_dw or need_db
    head = _Head(hidden, weight, bias, rows, chunk_rows, temperature, IGNORE_INDEX,
                 fp32_accumulation, need_dh, need_dw, need_db,
                 vocab_parallel.from_name(group_name, weight.shape[0]))
    for s0, s1 in _sequence_groups(cu_host, chunk_rows):
        chunks = reference.row_chunks(cu_host[s0], cu_host[s1], chunk_rows)
        for a, b in chunks:
            z, x = head.forward(a, b, t, logp, lse, entropy)
        head.combine(cu_host[s0], cu_host[s1], t, logp, lse, entropy)
        launch_ratio_fwd(logp, old, ref, entropy if with_entropy else None, advantages[s0:s1],
                         cu[s0:s1 + 1], None, coef, coef_ent, part[s0:s1], **options)
        if not grad:
            continue
        for a, b in chunks:
            if len(chunks) > 1:  # a sequence longer than a chunk: recompute (one more GEMM)
                z, x = head.logits(a, b)
            head.backward(z, x, a, b, t, lse, entropy, coef[a:b] * norm,
                          coef_ent[a:b] * (entropy_coef * norm) if with_entropy else coef_ent)
    launch_finalize(part, loss, stats, norm_out, aggregation=aggregation, ratio=ratio,
                    entropy_coef=entropy_coef, num_tokens=num_tokens,
                    num_sequences=num_sequences, max_len=max_len, rollout=correction)
    return (loss, stats) + head.grads()


@linear_loss.register_fake
def _(hidden, weight, bias, targets, old, ref, advantages, cu_seqlens, mask, temperature,
      entropy_coef, ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
      beta, num_tokens, num_sequences, max_len, rollout, rollout_mode, rollout_lo, rollout_hi,
      chunk_rows, fp32_accumulation, need_dh, need_dw, need_db, group_name):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (torch.empty((), **f32), torch.empty(len(STAT_KEYS), **f32)) + _grad_shapes(
        hidden, weight, bias, need_dh, need_dw, need_db)


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.needs = inputs[-4:-1]  # need_dh, need_dw, need_db
    # the statistics and the gradients are results, not functions of the inputs to
    # differentiate (as tic_loss's statistics)
    ctx.mark_non_differentiable(*output[1:])


@reference.first_order_only
def _loss_backward(ctx, g_loss, *_unused):
    # The forward's gradients are the loss's own: in eager mode they are scaled in place (they
    # are nobody else's), so d weight is never held twice, and a second backward through the
    # same graph is refused by autograd (a saved tensor was modified). A graph being traced
    # (plain tensors are not what it sees) scales them out of place.
    eager = type(g_loss) is torch.Tensor
    if eager and getattr(ctx, "scaled", False):
        raise RuntimeError("linear_tic_loss: backward ran twice through one forward; its "
                           "gradient is formed in the forward and scaled once, so run the "
                           "forward again for each backward")
    ctx.scaled = True

    def scaled(t, need):
        return None if not need else t.mul_(g_loss) if eager else t * g_loss
    dh, dw, db = (scaled(t, need) for t, need in zip(ctx.saved_tensors, ctx.needs))
    return grads_by_name(linear_loss, hidden=dh, weight=dw, bias=db)


linear_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---------------------------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------------------------
def _chunk_rows(chunk_size, weight):
    return chunk_size or lm_head_chunk_rows(weight.shape[0], weight.element_size())


def _autocast(hidden, weight, bias):
    """The inputs as F.linear sees them under torch.autocast: in the autocast dtype."""
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev) or hidden.dtype == torch.float64:
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


def _needs(hidden, weight, bias):
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
                          ignore_index=IGNORE_INDEX, return_entropy=False, chunk_size=None,
                          fp32_accumulation=True, process_group=None):
    """Log-probability of each target under softmax((hidden @ weight.T + bias) / temperature),
    without materialising the logits.

    Args:
        hidden: (..., H) float16, bfloat16, float32 or float64 (float64 runs the reference).
        weight: (V, H) the LM head as nn.Linear holds it (a tied embedding included), in
            hidden's dtype and on its device; bias: optional (V,).
        targets: (...) int32 or int64 in [0, V) or equal to ``ignore_index`` (those rows get
            logp 0, entropy 0, zero gradient, and are never multiplied).
        temperature, ignore_index, return_entropy: as in :func:`tic_kernels.token_logprobs`.
        chunk_size: rows of logits held at once; None: the rows whose logits fit
            options.LM_HEAD_CHUNK_BYTES (1 GiB) in the weight's dtype.
        fp32_accumulation: accumulate d weight and d bias across chunks in fp32 (a (V, H)
            fp32 buffer in the backward); False accumulates d weight in the weight's dtype.
        process_group: the vocabulary is split over this torch.distributed group (op 7):
            ``weight`` (and ``bias``) hold this rank's rows [rank V_local, (rank + 1) V_local)
            of the head, a column-parallel LM head's shard; hidden and targets (global ids)
            are replicated. Values are the whole vocabulary's; d weight and d bias are this
            shard's, and **d hidden is this rank's partial**: the caller sums it over the
            group, as a column-parallel layer does for its input in the backward (Megatron's
            copy_to_tensor_model_parallel_region). Two all-reduces per chunk of rows (12
            bytes a row, 16 with the entropy), none in the backward.

    Returns:
        logp (...) float32 (and entropy), differentiable w.r.t. hidden, weight and bias; the
        logits are computed as F.linear would (the weight's dtype, fp32 accumulation; under
        torch.autocast, the autocast dtype), the rest as token_logprobs. The backward
        recomputes each chunk's logits.
    """
    def checks(vocab):
        nonlocal hidden, weight, bias
        hidden, weight, bias = _autocast(hidden, weight, bias)
        check.lm_head("hidden", hidden, weight, bias, chunk_size, fp32_accumulation)
        check.gather_call("hidden", hidden, "H", vocab, targets, temperature, ignore_index,
                          return_entropy)

    _, shard = vocab_parallel.checked(
        process_group, "linear_token_logprobs", checks, vocab_parallel.columns_of(weight, 0),
        "weight", vocab_parallel.rows_of(targets), lambda _: {
            "targets": targets, "temperature": temperature, "ignore_index": ignore_index,
            "return_entropy": return_entropy, "chunk_size": chunk_size,
            "fp32_accumulation": fp32_accumulation, "hidden's dtype": hidden.dtype,
            "hidden's width (H)": hidden.shape[-1], **vocab_parallel.path_of(hidden)})
    if not use_triton(hidden):
        return reference.linear_token_logprobs(hidden, weight, targets, bias, temperature,
                                               ignore_index, return_entropy, chunk_size,
                                               fp32_accumulation,
                                               None if shard is None else shard.pair)
    logp, _, entropy = linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).contiguous(),
        float(temperature), int(ignore_index), bool(return_entropy),
        _chunk_rows(chunk_size, weight), fp32_accumulation, vocab_parallel.name_of(shard))
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


def linear_tic_loss(hidden, weight, targets, old_logprobs, advantages, *, bias=None,
                    cu_seqlens=None, mask=None, chunk_size=None, fp32_accumulation=True,
                    ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                    dual_clip=None, max_log_ratio=20.0, aggregation=None, temperature=1.0,
                    ref_logprobs=None, beta=0.0, entropy_coef=0.0, num_tokens=None,
                    num_sequences=None, max_len=None, process_group=None,
                    rollout_logprobs=None, rollout_is=None, rollout_is_max=None,
                    rollout_is_min=None, rollout_weights=None):
    """``tic_loss(hidden @ weight.T + bias, ...)`` without materialising the logits.

    Args:
        hidden: packed (N, H) with ``cu_seqlens``, or padded (B, T, H) with ``mask``; rows
            outside the mask are never multiplied and get zero gradient.
        weight, bias, chunk_size, fp32_accumulation, process_group: as in
            :func:`linear_token_logprobs` (under a process group, d hidden is this rank's
            partial, to be summed over the group by the caller).
        Every other argument: as in :func:`tic_kernels.tic_loss`.

    Returns:
        LossOutput(loss, stats) as tic_loss, differentiable w.r.t. hidden, weight and bias.
        When a gradient is required, the forward forms it (the backward only scales it by
        the incoming gradient), so call backward once per forward; in float16 the gradient is
        formed in the backward instead (a loss scale must reach it before it is rounded).
        Under torch.autocast the head runs in the autocast dtype, as F.linear would.
    """
    def checks(vocab):
        nonlocal hidden, weight, bias
        hidden, weight, bias = _autocast(hidden, weight, bias)
        check.lm_head("hidden", hidden, weight, bias, chunk_size, fp32_accumulation)
        return check.loss_call(
            "hidden", hidden, "H", vocab, targets, old_logprobs, advantages, cu_seqlens, mask,
            ref_logprobs, temperature,
            (ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
             ref_logprobs, beta, num_tokens, num_sequences, max_len, entropy_coef),
            (rollout_logprobs, rollout_is, rollout_is_max, rollout_is_min, rollout_weights))

    options, shard = vocab_parallel.checked(
        process_group, "linear_tic_loss", checks, vocab_parallel.columns_of(weight, 0),
        "weight", vocab_parallel.rows_of(targets), lambda options: vocab_parallel.loss_inputs(
            options, targets, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
            temperature, entropy_coef, chunk_size=chunk_size,
            fp32_accumulation=fp32_accumulation, **{"hidden's dtype": hidden.dtype,
                                                    "hidden's width (H)": hidden.shape[-1]},
            **vocab_parallel.path_of(hidden)))
    if not use_triton(hidden):
        return reference.linear_tic_loss(hidden, weight, targets, old_logprobs, advantages,
                                         bias, cu_seqlens=cu_seqlens, mask=mask,
                                         temperature=temperature, entropy_coef=entropy_coef,
                                         ref_logprobs=ref_logprobs, chunk_size=chunk_size,
                                         fp32_accumulation=fp32_accumulation,
                                         shard=None if shard is None else shard.pair,
                                         **options)
    group_name = vocab_parallel.name_of(shard)
    rows = _chunk_rows(chunk_size, weight)
    correction = Rollout.from_options(options)
    if hidden.dtype == torch.float16:
        # fp16 training scales the loss (GradScaler) so that small gradients survive fp16:
        # the scale arrives with the incoming gradient, so the logits gradient is formed in
        # the backward, after it (the log-probs' two passes, then op 4's kernels)
        t = reference.ignoring_masked(targets, mask)
        with_entropy = entropy_coef != 0.0
        logp, _, entropy = linear_logprobs(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, t.reshape(-1).contiguous(),
            float(temperature), IGNORE_INDEX, with_entropy, rows, fp32_accumulation, group_name)
        loss, stats, *_ = loss_on_segments(
            logp.view(t.shape), old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
            entropy.view(t.shape) if with_entropy else None, entropy_coef=entropy_coef,
            **options)
        return LossOutput(loss, stats_dict(stats, with_entropy, ref_logprobs is not None,
                                           correction.mode))
    if options["aggregation"] is None:
        options["aggregation"] = default_aggregation(ratio)
    if mask is not None and options["max_len"] is None:
        options["max_len"] = mask.shape[1]
    floats = {k: (None if options[k] is None else float(options[k]))
              for k in ("eps_low", "eps_high", "dual_clip", "max_log_ratio", "beta",
                        "num_tokens", "num_sequences", "max_len")}
    loss, stats, *_ = linear_loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
        old_logprobs.detach().reshape(-1),
        None if ref_logprobs is None else ref_logprobs.detach().reshape(-1),
        advantages.detach(), cu_seqlens, mask, float(temperature), float(entropy_coef),
        ratio, clip_mode, floats["eps_low"], floats["eps_high"], floats["dual_clip"],
        floats["max_log_ratio"], options["aggregation"], floats["beta"], floats["num_tokens"],
        floats["num_sequences"], floats["max_len"],
        None if correction.tensor is None else correction.tensor.detach().reshape(-1),
        correction.mode, correction.lo, correction.hi, rows, fp32_accumulation,
        *_needs(hidden, weight, bias), group_name)
    return LossOutput(loss, stats_dict(stats, entropy_coef != 0.0, ref_logprobs is not None,
                                       correction.mode))
