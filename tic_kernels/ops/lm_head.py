"""Op 6: the fused LM head. Log-probabilities (here) and the TIC loss (lm_head_loss.py) from
the last hidden states and the LM head's weight, never holding the (N, V) logits.

The logits exist one chunk of rows at a time, in one reused buffer in the weight's dtype,
sized to the largest chunk: a GEMM (torch.mm / addmm, fp32 accumulation) fills it, the row
kernels of op 1 read it, and the chunk's gradient is written over it before two more GEMMs
turn it into d hidden and d weight. The first chunk's GEMMs write the gradients, the later
ones add to them (nothing is zero-filled first). Rows that carry no loss (mask 0,
ignore_index) are never multiplied.

``linear_token_logprobs`` does not know its incoming gradient in the forward: it keeps each
row's (max, log-sum) pair and recomputes each chunk in the backward (four GEMMs in all).
``linear_tic_loss`` (lm_head_loss.py) does know it up to a scale, and forms its gradient in the
forward (three GEMMs per chunk, like the unfused path).

Memory beyond inputs and outputs: one chunk of logits (``chunk_size`` rows; by default k
equal chunks of at most options.LM_HEAD_CHUNK_BYTES = 1.2 GiB), O(N) floats, the fp32
accumulator of d bias, and (k > 1) that of d weight: an fp32 (V, H) buffer, one rounding in
all as in the unfused path's single GEMM, freed after its conversion (the logits buffer is
freed before it). With one chunk d weight is written in the weight's dtype at once (the same
single rounding, no buffer). ``fp32_accumulation=False`` accumulates it in the weight's dtype
(a rounding per chunk, no buffer). On a GPU each chunk's d weight GEMM accumulates into the
fp32 buffer directly; on the CPU it is formed in fp32 block by block (the same single
rounding), and on a GPU whose torch has no mixed-dtype GEMM each block is rounded to the
weight's dtype before it is added.

The ops are opaque torch.library custom ops, so torch.compile calls them as they are and
traces around them. Their host reads: the rows to multiply where some are masked or ignored
(``nonzero``; every linear_token_logprobs call, a padded linear_tic_loss), and cu_seqlens
when the chunks must hold whole sequences (lm_head_loss.chunk_plan).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import ranks, reference
from .. import validation as check
from ..backend import first_order_only, grads_by_name, use_triton
from ..layout import row_chunks
from ..options import IGNORE_INDEX, lm_head_chunk_rows
from . import vocab_parallel
from .token_logprobs import launch_bwd, launch_fwd


_MIXED_GEMM = {"cuda": True}  # whether torch.addmm(..., out_dtype=float32) runs here
_FALLBACK_ROWS = 8192  # rows of d weight formed at once when the GEMM cannot accumulate in fp32


def _accumulate_mm(acc, a, b, first):
    """acc = a @ b (``first``: acc's values are not read, the GEMM writes, beta = 0) or
    acc += a @ b, with the GEMM accumulating into acc's dtype where the device can."""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if acc.is_cuda and _MIXED_GEMM["cuda"]:
        try:
            torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as e:  # a torch without the mixed-dtype GEMM
            _MIXED_GEMM["cuda"] = False
            warnings.warn(f"fused LM head: torch.addmm(out_dtype=float32) failed ({e}); d weight "
                          "is now formed in the weight's dtype, block by block, and summed in fp32")
    # The product block by block (8192 rows of d weight: a bounded temporary, not a second
    # (V, H) matrix), summed in acc's dtype. On the CPU each block is an fp32 GEMM (one
    # rounding in all, as the GPU's mixed GEMM); on a GPU without the mixed GEMM each block is
    # rounded to a's dtype once (an fp32 GEMM there would cost several times the bf16 one).
    exact = acc.device.type == "cpu"
    b = b.float() if exact else b
    for v in range(0, acc.shape[0], _FALLBACK_ROWS):
        block = (a[v:v + _FALLBACK_ROWS].float() if exact else a[v:v + _FALLBACK_ROWS]) @ b
        if first:
            acc[v:v + _FALLBACK_ROWS] = block
        else:
            acc[v:v + _FALLBACK_ROWS] += block


class ChunkedHead:
    """The LM head over ``rows`` of hidden (None: all, in order): a chunk's logits into the
    reused buffer of ``buffer_rows`` rows (the largest chunk), and a chunk's logits gradient
    (written over them) into d hidden, d weight and d bias (``chunks`` of them in all). The
    first chunk's GEMMs write the gradients, the later ones accumulate: nothing is zero-filled
    first (d hidden's rows outside ``rows`` excepted: zero is their gradient)."""

    def __init__(self, hidden, weight, bias, rows, buffer_rows, temperature, ignore_index,
                 fp32_accumulation, need_dh, need_dw, need_db, shard=None, chunks=2):
        V = weight.shape[0]
        self.hidden, self.weight, self.bias, self.rows = hidden, weight, bias, rows
        self.shard, self.vocab_start = shard, 0 if shard is None else shard.start
        self.temperature, self.ignore_index = temperature, ignore_index
        self.buf = torch.empty(buffer_rows, V, dtype=weight.dtype, device=weight.device)
        self.written = False  # whether a chunk's gradient has been written (then: accumulate)
        # one chunk: its GEMM's one rounding is the whole accumulation, no fp32 buffer
        acc = torch.float32 if fp32_accumulation and chunks > 1 else weight.dtype
        self.dh = (torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)) \
            if need_dh else hidden.new_empty(0)
        self.dw = torch.empty(weight.shape, dtype=acc, device=weight.device) if need_dw \
            else weight.new_empty(0)
        self.db = torch.empty(V, dtype=torch.float32, device=weight.device) if need_db \
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

    def forward(self, a, b, targets, logp, max_logsum, entropy):
        """Logits of rows [a, b) and their logp, max_logsum (and entropy) into the buffers' [a, b);
        under op 7 this shard's partials (see combine)."""
        z, x = self.logits(a, b)
        launch_fwd(z, targets[a:b], logp[a:b], max_logsum[2 * a:2 * b],
                   entropy[a:b] if entropy.numel() else entropy, self.temperature,
                   self.ignore_index, entropy.numel() > 0, self.vocab_start)
        return z, x

    def combine(self, a, b, targets, logp, max_logsum, entropy):
        """Op 7: rows [a, b)'s partials made the whole vocabulary's, in place (two
        all-reduces; every rank runs the same rows in the same order)."""
        if self.shard is None or b <= a:
            return
        e = entropy[a:b] if entropy.numel() else entropy
        logp[a:b], max_logsum[2 * a:2 * b], e[:] = vocab_parallel.combine(
            logp[a:b], max_logsum[2 * a:2 * b], e, targets[a:b], self.ignore_index, self.shard)

    def backward(self, z, x, a, b, targets, max_logsum, entropy, g, g_entropy):
        """The gradient of rows [a, b) written over their logits z, then into the gradients."""
        launch_bwd(z, z, targets[a:b], max_logsum[2 * a:2 * b],
                   entropy[a:b] if g_entropy.numel() else entropy, g, g_entropy,
                   self.temperature, self.ignore_index, self.vocab_start)
        first, self.written = not self.written, True
        if self.dh.numel():
            if self.rows is None:
                torch.mm(z, self.weight, out=self.dh[a:b])
            else:
                self.dh.index_copy_(0, self.rows[a:b], torch.mm(z, self.weight))
        if self.dw.numel():
            _accumulate_mm(self.dw, z.t(), x, first)
        if self.db.numel():
            if first:
                torch.sum(z, 0, dtype=torch.float32, out=self.db)
            else:
                self.db += z.sum(0, dtype=torch.float32)

    def grads(self):
        """(d hidden, d weight, d bias) in the inputs' dtypes. The logits buffer is freed
        first (the caller holds no view of it), so that it is never alive beside a converted
        copy of the fp32 accumulator."""
        self.buf = None
        if not self.written:  # no row carried a loss: zero gradients
            for t in (self.dh, self.dw, self.db):
                t.zero_()
        dw = self.dw.to(self.weight.dtype) if self.dw.numel() else self.dw
        self.dw = None
        db = self.db.to(self.bias.dtype) if self.db.numel() else self.db
        return self.dh, dw, db


def largest(chunks):
    """Rows of the largest of the [a, b) chunks (0 for none): the logits buffer's."""
    return max((b - a for a, b in chunks), default=0)


def active_rows(keep):
    """Indices of the rows to multiply, or None when every row is (one host sync)."""
    rows = keep.nonzero().squeeze(-1)
    return None if rows.numel() == keep.numel() else rows


def compact(t, rows):
    return t if rows is None else t[rows]


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs: forward keeps per-row values, backward recomputes each chunk
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tic_kernels::linear_logprobs", mutates_args=())
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, temperature: float, ignore_index: int,
                    with_entropy: bool, chunk_rows: int, fp32_accumulation: bool, group_name: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (R,), max_logsum (2R,), entropy (R,) or (0,)) fp32 of rows hidden (R, H) against the
    head; max_logsum as token_logprobs_fwd keeps it. Ignored rows get zeros and are not multiplied.
    ``group_name`` (op 7; "" none): the head is that group's vocabulary shard."""
    R = targets.numel()
    rows = active_rows(targets != ignore_index)
    t = compact(targets, rows).contiguous()
    n = t.numel()
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    max_logsum = torch.zeros(2 * n, dtype=torch.float32, device=dev)
    entropy = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=dev)
    chunks = row_chunks(0, n, chunk_rows)
    head = ChunkedHead(hidden, weight, bias, rows, largest(chunks), temperature, ignore_index,
                       False, False, False, False,
                       vocab_parallel.from_name(group_name, weight.shape[0]))
    for a, b in chunks:
        head.forward(a, b, t, logp, max_logsum, entropy)
    head.buf = None
    head.combine(0, n, t, logp, max_logsum, entropy)
    if rows is None:
        return logp, max_logsum, entropy
    full = torch.zeros(R, dtype=torch.float32, device=dev)
    full_max_logsum = torch.zeros(R, 2, dtype=torch.float32, device=dev)
    full_max_logsum[rows] = max_logsum.view(n, 2)
    return (full.index_copy(0, rows, logp), full_max_logsum.view(-1),
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
                        targets: torch.Tensor, max_logsum: torch.Tensor, entropy: torch.Tensor,
                        g_logp: torch.Tensor, g_entropy: torch.Tensor, temperature: float,
                        ignore_index: int, chunk_rows: int, fp32_accumulation: bool,
                        need_dh: bool, need_dw: bool, need_db: bool, group_name: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias), each empty when not needed, from the forward's max_logsum and
    the incoming gradients (g_entropy empty: no entropy term); each chunk is recomputed.
    Under op 7 (``group_name``) d hidden is this shard's partial."""
    rows = active_rows(targets != ignore_index)
    t = compact(targets, rows).contiguous()
    max_logsum = compact(max_logsum.view(-1, 2), rows).reshape(-1).contiguous()
    g = compact(g_logp, rows).float().contiguous()
    with_entropy = g_entropy.numel() > 0
    if with_entropy:
        entropy = compact(entropy, rows).contiguous()
        g_entropy = compact(g_entropy, rows).float().contiguous()
    chunks = row_chunks(0, t.numel(), chunk_rows)
    head = ChunkedHead(hidden, weight, bias, rows, largest(chunks), temperature, ignore_index,
                       fp32_accumulation, need_dh, need_dw, need_db,
                       vocab_parallel.from_name(group_name, weight.shape[0]), len(chunks))
    for a, b in chunks:
        z, x = head.logits(a, b)
        head.backward(z, x, a, b, t, max_logsum, entropy, g[a:b],
                      g_entropy[a:b] if with_entropy else g_entropy)
        del z, x
    return head.grads()


def grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0),
            torch.empty_like(bias) if need_db else weight.new_empty(0))


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, targets, max_logsum, entropy, g_logp, g_entropy, temperature,
      ignore_index, chunk_rows, fp32_accumulation, need_dh, need_dw, need_db, group_name):
    return grad_shapes(hidden, weight, bias, need_dh, need_dw, need_db)


def _logprobs_setup(ctx, inputs, output):
    (hidden, weight, bias, targets, temperature, ignore_index, with_entropy, chunk_rows, fp32,
     group) = inputs
    _, max_logsum, entropy = output
    ctx.save_for_backward(hidden, weight, bias, targets, max_logsum, entropy)
    ctx.options = temperature, ignore_index, with_entropy, chunk_rows, fp32, group


@first_order_only
def _logprobs_backward(ctx, g_logp, _g_lse, g_entropy):
    hidden, weight, bias, targets, max_logsum, entropy = ctx.saved_tensors
    temperature, ignore_index, with_entropy, chunk_rows, fp32, group = ctx.options
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    if g_logp is None:  # only the entropy was used
        g_logp = max_logsum.new_zeros(targets.numel())
    if not with_entropy or g_entropy is None:
        g_entropy = max_logsum.new_empty(0)
    dh, dw, db = linear_logprobs_bwd(hidden, weight, bias, targets, max_logsum, entropy, g_logp,
                                     g_entropy, temperature, ignore_index, chunk_rows, fp32,
                                     need_dh, need_dw, bool(need_db and bias is not None), group)
    return grads_by_name(linear_logprobs, hidden=dh if need_dh else None,
                         weight=dw if need_dw else None, bias=db if need_db else None)


linear_logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


# ---------------------------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------------------------
def rows_per_chunk(chunk_size, weight):
    return chunk_size or lm_head_chunk_rows(weight.shape[0], weight.element_size())


def autocast_inputs(hidden, weight, bias):
    """The inputs as F.linear sees them under torch.autocast: in the autocast dtype."""
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev) or hidden.dtype == torch.float64:
        return hidden, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)


def grads_needed(hidden, weight, bias):
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
        chunk_size: rows of logits held at most at once; None: the rows whose logits fit
            options.LM_HEAD_CHUNK_BYTES (1.2 GiB) in the weight's dtype. The rows are split
            into the fewest equal chunks of at most that many.
        fp32_accumulation: True (default): d weight accumulates across chunks in an fp32
            (V, H) buffer, one rounding in all, at 4 V H bytes more (none with one chunk);
            False: in the weight's dtype, one rounding per chunk (docs/spec.md, op 6, has the
            measured cost of each).
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
        hidden, weight, bias = autocast_inputs(hidden, weight, bias)
        check.lm_head("hidden", hidden, weight, bias, chunk_size, fp32_accumulation)
        check.gather_call("hidden", hidden, "H", vocab, targets, temperature, ignore_index,
                          return_entropy)

    _, shard = ranks.agree(
        process_group, "linear_token_logprobs", checks, ranks.columns_of(weight, 0),
        "weight", ranks.rows_of(targets), lambda _: {
            "targets": targets, "temperature": temperature, "ignore_index": ignore_index,
            "return_entropy": return_entropy, "chunk_size": chunk_size,
            "fp32_accumulation": fp32_accumulation, "hidden's dtype": hidden.dtype,
            "hidden's width (H)": hidden.shape[-1], **ranks.path_of(hidden)})
    if not use_triton(hidden):
        return reference.linear_token_logprobs(hidden, weight, targets, bias, temperature,
                                               ignore_index, return_entropy, chunk_size,
                                               fp32_accumulation,
                                               None if shard is None else shard.pair)
    logp, _, entropy = linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).contiguous(),
        float(temperature), int(ignore_index), bool(return_entropy),
        rows_per_chunk(chunk_size, weight), fp32_accumulation, vocab_parallel.name_of(shard))
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp
