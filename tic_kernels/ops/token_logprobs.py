"""Op 1: per-token log-softmax gather, with temperature and entropy.

    z = logits / tau,  lse_t = logsumexp_v z[t, v],  p = exp(z - lse)
    logp_t = z[t, y_t] - lse_t
    H_t    = -sum_v p[t, v] log p[t, v] = lse_t - sum_v p[t, v] z[t, v]
    dL/dlogits[t, v] = (g_t (1[v = y_t] - p[t, v]) - gH_t p[t, v] (log p[t, v] + H_t)) / tau

Shapes: logits (R, V) or (B, T, V) with any strides, fp16/bf16/fp32; targets (R,) / (B, T).
Bytes moved: forward reads the logits once (R V s bytes, s the element size) and writes 3 fp32
per row; backward reads the logits once and writes the gradient once (2 R V s), from each
row's (max, log-sum) pair saved by the forward (``max_logsum``). Rows whose target is
``ignore_index`` are not read; their gradient row is written with zeros.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import ranks, reference
from .. import validation as check
from ..backend import (BUILT_FOR_INTERPRETER, as_f32, cast_for_store, dense, emulate_rne,
                       first_order_only, grads_by_name, inputs_by_name, launch, tracing,
                       triton_op, use_triton)
from ..options import IGNORE_INDEX
from . import vocab_parallel


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    # 64-bit: R * V passes 2^31 at ordinary sizes (16k tokens x 152k vocabulary).
    row = row.to(tl.int64)
    b = row // T
    return b * stride_b + (row - b * T) * stride_t


@triton.jit
def _col_offsets(idx, stride_v, UNIT_STRIDE_V: tl.constexpr):
    """Element offsets of columns ``idx`` in a row. 64-bit unless the columns are contiguous:
    (V - 1) * stride_v passes 2^31 for a (N, V) view of a transposed (V, N) buffer."""
    if UNIT_STRIDE_V:
        return idx
    else:
        return idx.to(tl.int64) * stride_v


@triton.jit
def _rescaled(sz, s, scale, m, shift):
    """sz = sum exp(z - m) (z - m) over a run of columns, re-expressed relative to a new max
    ``shift`` >= m, scale = exp(m - shift): sum exp(z - shift) (z - shift) = scale (sz - s
    (shift - m)). Nothing moves while m = -inf (no column yet), nor when the old terms vanish
    (scale = 0: shift - m may overflow, ~ -3e38 to 3e38)."""
    moved = tl.where(scale > 0.0, scale * (shift - tl.where(m == -float("inf"), shift, m)), 0.0)
    return sz * scale - s * moved


@triton.jit
def _lse_step(z, m, s, sz, WITH_ENTROPY: tl.constexpr):
    """One block of the online logsumexp over z = logits / tau (-inf where masked): m the
    running max, s = sum exp(z - m) and sz = sum exp(z - m) (z - m), both rescaled when the max
    grows. sz is kept relative to the max so that it cannot overflow, even for logits near
    FLT_MAX. (Base 2 with log2(e) folded into 1/tau would save a multiply per element, but it
    overflows logits above FLT_MAX ln 2 and costs accuracy: a 2300-token log-ratio moved by
    1e-3 relative in the tests.)"""
    m_new = tl.maximum(m, tl.max(z, 0))
    # while every logit so far is -inf (a masked-out vocabulary block), shift by 0:
    # exp(-inf - (-inf)) would be NaN
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    e = tl.exp(z - shift)
    if WITH_ENTROPY:
        # e = 0 at z = -inf, where e (z - shift) would be 0 * -inf: the term is exactly 0
        sz = _rescaled(sz, s, scale, m, shift) + tl.sum(e * tl.where(e > 0.0, z - shift, 0.0), 0)
    return m_new, s * scale + tl.sum(e, 0), sz


@triton.jit
def _lse_merge(m, s, sz, m2, s2, sz2, WITH_ENTROPY: tl.constexpr):
    """(m, s, sz) of two runs of columns together, from each run's (as _lse_step keeps them).
    Merging into the empty run (-inf, 0, 0) gives the other run's values exactly."""
    m_new = tl.maximum(m, m2)
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    scale, scale2 = tl.exp(m - shift), tl.exp(m2 - shift)
    if WITH_ENTROPY:
        sz = _rescaled(sz, s, scale, m, shift) + _rescaled(sz2, s2, scale2, m2, shift)
    return m_new, s * scale + s2 * scale2, sz


@triton.jit
def lse_columns(base, first, last, V, stride_v, inv_temperature, WITH_ENTROPY: tl.constexpr,
                UNIT_STRIDE_V: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
                EVICT: tl.constexpr):
    """(m, s, sz) of z = logits / tau over columns [first, last) of a row (at ``base``),
    ``first`` a multiple of CHUNK (itself a multiple of BLOCK_V): each run of CHUNK columns is
    summed online from an empty start, and the runs are merged left to right. A row's numbers
    are therefore the same whether one program sweeps it or its runs are shared out over
    several programs whose results are merged in the same order (the forward's split).
    ``EVICT``: the loads' L2 eviction policy ("" the default)."""
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")  # the runs merged so far
    s = 0.0
    sz = 0.0
    m_run = -float("inf")  # the current run
    s_run = 0.0
    sz_run = 0.0
    # Blocks start at multiples of BLOCK_V whatever the row's address, so a row's summation
    # order never depends on where it sits in the batch (batch invariance).
    for start in range(first, last, BLOCK_V):
        idx = start + cols
        # upcast at once: bf16 arithmetic is wrong in the interpreter, and fp32 is the contract
        z = tl.load(base + _col_offsets(idx, stride_v, UNIT_STRIDE_V), mask=idx < V,
                    other=-float("inf"), eviction_policy=EVICT).to(tl.float32)
        m_run, s_run, sz_run = _lse_step(z * inv_temperature, m_run, s_run, sz_run,
                                         WITH_ENTROPY)
        if ((start + BLOCK_V) % CHUNK == 0) | (start + BLOCK_V >= last):  # the run ends
            m, s, sz = _lse_merge(m, s, sz, m_run, s_run, sz_run, WITH_ENTROPY)
            m_run = tl.full((), -float("inf"), tl.float32)
            s_run = tl.full((), 0.0, tl.float32)
            sz_run = tl.full((), 0.0, tl.float32)
    return m, s, sz


@triton.jit
def row_values(base, target, active, m, s, sz, V, stride_v, inv_temperature,
               WITH_ENTROPY: tl.constexpr):
    """(logp, m, log s, H) of a row from its (m, s, sz) over the whole vocabulary; all 0 for
    an inactive row."""
    s = tl.where(active, s, 1.0)  # inactive rows: keep log and division finite
    log_s = tl.log(s)
    in_vocab = (target >= 0) & (target < V)
    z_t = tl.load(base + target * stride_v, mask=active & in_vocab, other=0.0).to(tl.float32)
    # logp = (z_t - m) - log s: forming max_logsum = m + log s first would round log s away when |m|
    # is large (logits near FLT_MAX), and loses bits of logp even at ordinary sizes.
    # An out-of-range target (another shard's under op 7; else only reachable when validation
    # is skipped) gives NaN, never a plausible number.
    logp = tl.where(in_vocab, (z_t * inv_temperature - m) - log_s, float("nan"))
    H = 0.0
    if WITH_ENTROPY:
        # H = max_logsum - sum p z = log s - sz / s: no cancellation of two numbers near the max
        H = tl.where(active, log_s - sz / s, 0.0)
    return (tl.where(active, logp, 0.0), tl.where(active, m, 0.0),
            tl.where(active, log_s, 0.0), H)


@triton.jit
def _row_target(targets_ptr, mask_ptr, row, ignore_index, HAS_MASK: tl.constexpr):
    """A row's target, or ignore_index where the loss mask (any dtype, flat) is 0: such a
    row is neither read nor given a gradient, whatever its target holds."""
    target = tl.load(targets_ptr + row).to(tl.int64)
    if HAS_MASK:
        target = tl.where(tl.load(mask_ptr + row) != 0, target, ignore_index)
    return target


@triton.jit
def row_logsumexp(base, target, active, V, stride_v, inv_temperature,
                  WITH_ENTROPY: tl.constexpr, UNIT_STRIDE_V: tl.constexpr,
                  BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, EVICT: tl.constexpr):
    """A row's sweep over its logits (at ``base``): (logp, m, log s, H) of z = logits / tau,
    m the max and s = sum exp(z - m), all 0 for an inactive row, which reads nothing."""
    m, s, sz = lse_columns(base, 0, tl.where(active, V, 0), V, stride_v, inv_temperature,
                           WITH_ENTROPY, UNIT_STRIDE_V, BLOCK_V, CHUNK, EVICT)
    return row_values(base, target, active, m, s, sz, V, stride_v, inv_temperature,
                      WITH_ENTROPY)


@triton.jit
def store_row_values(logp_ptr, max_logsum_ptr, entropy_ptr, row, logp, m, log_s, H,
                     WITH_ENTROPY: tl.constexpr):
    """A row's forward values into the per-row buffers: logp, the (max, log-sum) pair at
    max_logsum[2 row], [2 row + 1], and the entropy when computed."""
    tl.store(logp_ptr + row, logp)
    tl.store(max_logsum_ptr + 2 * row, m)
    tl.store(max_logsum_ptr + 2 * row + 1, log_s)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, H)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, mask_ptr, logp_ptr, max_logsum_ptr, entropy_ptr, counter_ptr,
    part_ptr, arrived_ptr, stride_b, stride_t, stride_v,
    T, V, inv_temperature, ignore_index, vocab_start,
    WITH_ENTROPY: tl.constexpr, HAS_MASK: tl.constexpr, CLEAR_COUNTER: tl.constexpr,
    SPLIT: tl.constexpr, UNIT_STRIDE_V: tl.constexpr, BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program (row, j). One program per row: it sweeps the row. SPLIT (few rows on a large
    GPU): program j sweeps the row's j-th run of CHUNK columns and stores its (m, s, sz) in
    part[row, j]; the last of the row's programs to finish (``arrived``, an int32 per row
    holding 0, counts them) merges the runs in order and stores the row's values: the same
    numbers as one program's sweep."""
    inv_temperature = as_f32(inv_temperature)
    row = tl.program_id(0)
    if CLEAR_COUNTER:  # for the loss kernel launched next (its count of finished programs)
        if row == 0:
            tl.store(counter_ptr, 0)
    target = _row_target(targets_ptr, mask_ptr, row, ignore_index, HAS_MASK)
    active = target != ignore_index
    target -= vocab_start  # a column of this shard of the vocabulary, or outside it (op 7)
    base = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    if SPLIT:
        runs = tl.num_programs(1)
        first = tl.program_id(1) * CHUNK
        m, s, sz = lse_columns(base, first, tl.minimum(first + CHUNK, tl.where(active, V, 0)),
                               V, stride_v, inv_temperature, WITH_ENTROPY, UNIT_STRIDE_V,
                               BLOCK_V, CHUNK, "")
        slot = part_ptr + 3 * (row.to(tl.int64) * runs + tl.program_id(1))
        tl.store(slot, m)
        tl.store(slot + 1, s)
        tl.store(slot + 2, sz)
        # as the ratio-loss kernel's last program: the barrier orders the stores before the
        # count's release, the last program acquires them and reads the runs from L2 (.cg)
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + row, 1, sem="acq_rel") == runs - 1:
            m = tl.full((), -float("inf"), tl.float32)
            s = tl.full((), 0.0, tl.float32)
            sz = tl.full((), 0.0, tl.float32)
            for j in range(0, runs):
                run = part_ptr + 3 * (row.to(tl.int64) * runs + j)
                m, s, sz = _lse_merge(m, s, sz, tl.load(run, cache_modifier=".cg"),
                                      tl.load(run + 1, cache_modifier=".cg"),
                                      tl.load(run + 2, cache_modifier=".cg"), WITH_ENTROPY)
            logp, m, log_s, H = row_values(base, target, active, m, s, sz, V, stride_v,
                                           inv_temperature, WITH_ENTROPY)
            store_row_values(logp_ptr, max_logsum_ptr, entropy_ptr, row, logp, m, log_s, H,
                             WITH_ENTROPY)
    else:
        logp, m, log_s, H = row_logsumexp(base, target, active, V, stride_v, inv_temperature,
                                          WITH_ENTROPY, UNIT_STRIDE_V, BLOCK_V, CHUNK, "")
        store_row_values(logp_ptr, max_logsum_ptr, entropy_ptr, row, logp, m, log_s, H,
                         WITH_ENTROPY)


@triton.jit
def _grad_block(z, idx, target, g, gH, H, m, log_s, WITH_ENTROPY: tl.constexpr):
    """dL/dlogits of one block from z = logits / tau (the 1/tau folded into g and gH):
    g (1[v = y_t] - p) - gH p (log p + H)."""
    log_p = (z - m) - log_s
    p = tl.exp(log_p)
    d = tl.where(idx == target, g, 0.0) - g * p
    if WITH_ENTROPY:
        # p log p -> 0 as p -> 0: a -inf logit contributes 0, not 0 * -inf
        d -= gH * p * tl.where(p > 0.0, log_p + H, 0.0)
    return d


@triton.jit
def row_gradient(base, gbase, first, last, active, target, g, gH, H, m, log_s, V,
                 inv_temperature, stride_v, stride_gv, WITH_ENTROPY: tl.constexpr,
                 EMULATE_RNE: tl.constexpr, UNIT_STRIDE_V: tl.constexpr,
                 UNIT_STRIDE_GV: tl.constexpr, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """Columns [first, last) of a row's gradient into ``gbase`` (in its dtype) from the row's
    (m, log s, H) and g, gH (the 1/tau folded in); an inactive row reads nothing and gets
    exact zeros."""
    out_ty = gbase.dtype.element_ty
    cols = tl.arange(0, BLOCK_V)
    for start in range(first, last, BLOCK_V):
        idx = start + cols
        inside = idx < V
        z = tl.load(base + _col_offsets(idx, stride_v, UNIT_STRIDE_V), mask=inside & active,
                    other=0.0, eviction_policy=EVICT).to(tl.float32)
        d = tl.where(active, _grad_block(z * inv_temperature, idx, target, g, gH, H, m, log_s,
                                         WITH_ENTROPY), 0.0)
        tl.store(gbase + _col_offsets(idx, stride_gv, UNIT_STRIDE_GV),
                 cast_for_store(d, out_ty, EMULATE_RNE), mask=inside)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, grad_ptr, targets_ptr, mask_ptr, max_logsum_ptr, entropy_ptr, g_ptr,
    g_entropy_ptr, g_loss_ptr, norm_ptr,
    stride_b, stride_t, stride_v, stride_gb, stride_gt, stride_gv, stride_g, stride_ge,
    T, V, cols_per_program, inv_temperature, entropy_coef, ignore_index, vocab_start,
    HAS_G: tl.constexpr, WITH_ENTROPY: tl.constexpr, SCALED: tl.constexpr,
    HAS_MASK: tl.constexpr, EMULATE_RNE: tl.constexpr, UNIT_STRIDE_V: tl.constexpr,
    UNIT_STRIDE_GV: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (row, j) writes columns [j cols_per_program, (j + 1) cols_per_program) of the
    row's gradient (several programs per row when there are few rows). dL/dlogp and dL/dH of
    the row are g_ptr[row * stride_g] and g_entropy_ptr[row * stride_ge] (stride 0: one value
    broadcast), times g_loss * norm (and entropy_coef for dL/dH) when SCALED: the loss's
    per-token coefficients and the incoming gradient of the loss, read here on the device."""
    inv_temperature, entropy_coef = as_f32(inv_temperature), as_f32(entropy_coef)
    row = tl.program_id(0)
    first = tl.program_id(1) * cols_per_program
    target = _row_target(targets_ptr, mask_ptr, row, ignore_index, HAS_MASK)
    active = target != ignore_index
    target -= vocab_start  # outside [0, V) under op 7 when another shard holds it: no 1[v = y]
    base = logits_ptr + _row_offset(row, T, stride_b, stride_t)
    gbase = grad_ptr + _row_offset(row, T, stride_gb, stride_gt)
    m = tl.load(max_logsum_ptr + 2 * row)
    log_s = tl.load(max_logsum_ptr + 2 * row + 1)
    scale = inv_temperature
    if SCALED:
        scale *= tl.load(g_loss_ptr).to(tl.float32) * tl.load(norm_ptr)
    g = 0.0
    if HAS_G:
        g = tl.where(active, tl.load(g_ptr + row * stride_g).to(tl.float32), 0.0) * scale
    gH = 0.0
    H = 0.0
    if WITH_ENTROPY:
        gH = tl.where(active, tl.load(g_entropy_ptr + row * stride_ge).to(tl.float32), 0.0) * scale
        if SCALED:
            gH *= entropy_coef
        H = tl.load(entropy_ptr + row)
    row_gradient(base, gbase, first, tl.minimum(first + cols_per_program, V), active, target, g,
                 gH, H, m, log_s, V, inv_temperature, stride_v, stride_gv, WITH_ENTROPY,
                 EMULATE_RNE, UNIT_STRIDE_V, UNIT_STRIDE_GV, BLOCK_V, "")


# (BLOCK_V, num_warps) of the forward ("fwd") and backward ("bwd") kernels, the forward's run
# of columns in blocks ("fwd_chunk_blocks"), whether the forward shares a row's runs out over
# several programs ("fwd_split", True or False) and the number of programs per row of the
# backward ("bwd_split"); None takes the defaults below. benchmarks/sweep.py sets
# them to time other configurations on a GPU.
LAUNCH_CONFIG = {"fwd": None, "bwd": None, "fwd_chunk_blocks": None, "fwd_split": None,
                 "bwd_split": None}
# The forward's runs (see lse_columns): 4 blocks, 16384 columns at BLOCK_V 4096, so a 152k
# vocabulary is 10 runs and a 32k one 2.
FWD_CHUNK_BLOCKS = 4


def _launch_config(kernel: str, V: int):
    """(BLOCK_V, num_warps) of ``kernel`` for V columns: LAUNCH_CONFIG's, or the next power
    of 2, at most 4096 (16384 on the interpreter, which runs programs one after another:
    fewer, larger blocks are faster there), 8 warps from 2048 up."""
    config = LAUNCH_CONFIG[kernel]
    if config is not None:
        return config
    block = min(1 << max(V - 1, 0).bit_length(), 16384 if BUILT_FOR_INTERPRETER else 4096)
    return block, 8 if block >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _programs_in_flight(device_index: int) -> int:
    """Programs of 8 warps a GPU runs at once, about: 2 per streaming multiprocessor."""
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def fwd_chunk(block: int) -> int:
    """The forward's run of columns (a constexpr of every kernel that sweeps a row's
    log-sum-exp: the same runs give the same numbers)."""
    return block * (LAUNCH_CONFIG["fwd_chunk_blocks"] or FWD_CHUNK_BLOCKS)


def _rows_to_fill(device) -> int:
    """Rows that fill the GPU twice over: twice the programs it runs at once."""
    return 2 * _programs_in_flight(device.index if device.index is not None
                                   else torch.cuda.current_device())


def _few_rows(R, logits) -> bool:
    """Whether R rows of ``logits`` are too few to fill the GPU twice over (a small
    micro-batch): then several programs share each row. (The interpreter runs programs one
    after another: never there; nor for a traced symbolic size, which a guard would need.)"""
    if not logits.is_cuda or not isinstance(R, int):
        return False
    return R < _rows_to_fill(logits.device)


def _fwd_runs(R: int, V: int, chunk: int, logits) -> int:
    """Programs per row of the forward: 1, or each run of ``chunk`` columns its own program
    when the rows are few (_few_rows) and the row has several runs."""
    split = LAUNCH_CONFIG["fwd_split"]
    if split is None:
        split = _few_rows(R, logits)
    return max(1, -(-V // chunk)) if split else 1


def _bwd_split(R: int, V: int, block: int, logits) -> int:
    """Programs per row of the backward: 1, unless the rows are too few to fill the GPU twice
    over (a small micro-batch), then the columns are shared out so that they do. (The
    interpreter runs programs one after another: 1 there.)"""
    if LAUNCH_CONFIG["bwd_split"] is not None:
        return LAUNCH_CONFIG["bwd_split"]
    if not _few_rows(R, logits):
        return 1
    return max(1, min(-(-V // block), -(-_rows_to_fill(logits.device) // max(R, 1))))


def per_row(t):
    """(t, stride): t, R values of any shape, as a kernel reads one value per row, at
    ``stride``: a contiguous tensor or a broadcast value (every stride 0, as autograd hands
    the gradient of a sum) as it is, anything else as a flat view (a copy when no single
    stride describes it). A view or a copy costs host time; the common cases make none."""
    if t.is_contiguous():
        return t, 1
    if not any(t.stride()):
        return t, 0
    t = t.reshape(-1)
    return t, t.stride(0)


def _rows_layout(logits):
    """(T, stride_b, stride_t, stride_v) describing rows of a 2-D or 3-D logits tensor."""
    if logits.dim() not in (2, 3):
        raise ValueError(f"the kernels take 2-D or 3-D logits, got shape {tuple(logits.shape)}")
    if logits.dim() == 2:
        return max(logits.shape[0], 1), 0, logits.stride(0), logits.stride(1)
    return max(logits.shape[1], 1), logits.stride(0), logits.stride(1), logits.stride(2)


def launch_fwd(logits, targets, logp, max_logsum, entropy, temperature, ignore_index, with_entropy,
               vocab_start=0, mask=None, counter=None):
    """Runs the forward kernel over the rows of ``logits`` into the given fp32 buffers (logp
    (R,), max_logsum (2R,), entropy (R,), or empty or None without with_entropy); targets
    contiguous, R of them in any shape. With ``vocab_start`` (op 7) the logits are columns
    [vocab_start, vocab_start + V) of the vocabulary: the buffers get this shard's partial
    values (logp NaN where another shard holds the target), which
    vocab_parallel.combine_partials turns into the whole vocabulary's. ``mask``: a contiguous
    loss mask of R entries, any dtype, rows where it is 0 treated as ignored; ``counter``: an
    int32 the kernel sets to 0 for the loss kernel that follows."""
    R = targets.numel()
    if not R:
        return
    T, sb, st, sv = _rows_layout(logits)
    V = logits.shape[-1]
    block, warps = _launch_config("fwd", V)
    chunk = fwd_chunk(block)
    runs = _fwd_runs(R, V, chunk, logits)
    part = arrived = logp  # unread without a split
    if runs > 1:
        part = torch.empty(3 * R * runs, dtype=torch.float32, device=logits.device)
        arrived = torch.zeros(R, dtype=torch.int32, device=logits.device)
    launch(_token_logprobs_fwd_kernel, (R, runs),
        logits, targets, targets if mask is None else mask, logp, max_logsum,
        logp if entropy is None else entropy,
        targets if counter is None else counter, part, arrived, sb, st, sv, T, V,
        1.0 / temperature, ignore_index, vocab_start, WITH_ENTROPY=with_entropy,
        HAS_MASK=mask is not None, CLEAR_COUNTER=counter is not None, SPLIT=runs > 1,
        UNIT_STRIDE_V=sv == 1, BLOCK_V=block, CHUNK=chunk, num_warps=warps)


def new_row_buffers(R, with_entropy, device, shape=None):
    """(logp (R,), max_logsum (2R,), entropy (R,) or None): fp32, uninitialised; logp and
    entropy in ``shape`` (of R elements) when given (the targets': no view made later). No
    tensor where none is needed: each allocation costs a call host time."""
    f32 = dict(dtype=torch.float32, device=device)
    shape = R if shape is None else shape
    return (torch.empty(shape, **f32), torch.empty(2 * R, **f32),
            torch.empty(shape, **f32) if with_entropy else None)


@triton_op("tic_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                       ignore_index: int, with_entropy: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (R,), max_logsum (2R,), entropy (R,)) fp32 over the flattened rows; entropy is empty
    unless with_entropy. max_logsum holds each row's logsumexp for the backward in two parts:
    with z = logits / temperature, max_logsum[2r] = max z and max_logsum[2r + 1] =
    log sum exp(z - max z). The op torch.compile traces; eager calls run the launchers."""
    logp, max_logsum, entropy = new_row_buffers(targets.numel(), with_entropy, logits.device)
    # the kernel reads targets[row]
    launch_fwd(logits, targets.reshape(-1).contiguous(), logp, max_logsum, entropy, temperature,
               ignore_index, with_entropy)
    return logp, max_logsum, logp.new_empty(0) if entropy is None else entropy


def launch_bwd(logits, grad, targets, max_logsum, entropy, g_logp, g_entropy, temperature,
               ignore_index, vocab_start=0, mask=None, scale=None):
    """Runs the backward kernel: dL/dlogits into ``grad`` (which may be ``logits`` itself:
    each block is read before the same program overwrites it). ``g_logp`` and ``g_entropy``:
    per-row gradients (any float dtype, R values of any shape and strides: see per_row), None
    (or empty) where they are zero. Under op 7, max_logsum and entropy are the whole
    vocabulary's and the logits columns [vocab_start, vocab_start + V) of it. ``mask`` as in
    launch_fwd; ``scale`` (g_loss (), norm (), entropy_coef) multiplies g_logp by
    g_loss * norm and g_entropy by g_loss * norm * entropy_coef in the kernel (the loss's
    backward: no kernel of its own)."""
    R = targets.numel()
    if not R:
        return
    T, sb, st, sv = _rows_layout(logits)
    # the gradient's strides: as the logits' when it overwrites them or is their empty_like
    gb, gt, gv = (sb, st, sv) if grad is logits or grad.stride() == logits.stride() \
        else _rows_layout(grad)[1:]
    V = logits.shape[-1]
    block, warps = _launch_config("bwd", V)
    split = _bwd_split(R, V, block, logits)
    cols = -(-(-(-V // split)) // block) * block  # ceil(ceil(V / split) / block) blocks
    has_g = g_logp is not None
    with_entropy = g_entropy is not None and g_entropy.numel() > 0
    g_logp, stride_g = per_row(g_logp) if has_g else (max_logsum, 0)
    g_entropy, stride_ge = per_row(g_entropy) if with_entropy else (max_logsum, 0)
    g_loss, norm, entropy_coef = scale if scale is not None else (max_logsum, max_logsum, 0.0)
    launch(_token_logprobs_bwd_kernel, (R, -(-V // cols)),
        logits, grad, targets, targets if mask is None else mask, max_logsum,
        max_logsum if entropy is None else entropy, g_logp,
        g_entropy, g_loss, norm, sb, st, sv, gb, gt, gv, stride_g, stride_ge, T, V, cols,
        1.0 / temperature,
        entropy_coef, ignore_index, vocab_start, HAS_G=has_g, WITH_ENTROPY=with_entropy,
        SCALED=scale is not None, HAS_MASK=mask is not None,
        EMULATE_RNE=emulate_rne(grad.dtype), UNIT_STRIDE_V=sv == 1, UNIT_STRIDE_GV=gv == 1,
        BLOCK_V=block, num_warps=warps)


@triton_op("tic_kernels::token_logprobs_bwd", mutates_args={"grad"})
def token_logprobs_bwd(logits: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor,
                       max_logsum: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
                       g_entropy: torch.Tensor, temperature: float, ignore_index: int,
                       vocab_start: int) -> None:
    """Writes dL/dlogits into ``grad`` (which may be ``logits`` itself). g_entropy empty: no
    entropy term. The op torch.compile traces; eager calls run the launcher."""
    launch_bwd(logits, grad, targets.reshape(-1).contiguous(), max_logsum.contiguous(),
               entropy.contiguous(), g_logp.contiguous(), g_entropy.contiguous(), temperature,
               ignore_index, vocab_start)


def logits_grad(logits, targets, max_logsum, entropy, g_logp, g_entropy, temperature, ignore_index,
                inplace=False, vocab_start=0, mask=None, scale=None, traced=False):
    """dL/dlogits (in the logits' dtype) from the forward's max_logsum; shared with the fused loss
    and op 7 (``vocab_start``: the logits are that shard of the vocabulary). Eager: one kernel
    (mask and scale as launch_bwd takes them); ``traced`` (a backward that a graph may
    capture), the op (mask and scale must then be None: the caller applied them)."""
    grad = logits if inplace else torch.empty_like(logits)
    if traced:
        assert mask is None and scale is None
        empty = max_logsum.new_empty(0)
        g_logp = torch.zeros_like(max_logsum[::2]) if g_logp is None else g_logp
        token_logprobs_bwd(logits, grad, targets, max_logsum,
                           entropy if g_entropy is not None else empty,
                           g_logp.reshape(-1).float().contiguous(),
                           empty if g_entropy is None else g_entropy.reshape(-1).float().contiguous(),
                           temperature, ignore_index, vocab_start)
        return grad
    launch_bwd(logits, grad, targets, max_logsum, entropy, g_logp, g_entropy, temperature,
               ignore_index, vocab_start, dense(mask), scale)
    if inplace:  # as the op declares it mutates grad: a node that saved the logits sees it
        torch.autograd.graph.increment_version(grad)
    return grad


def _setup_context(ctx, inputs, output):
    args = inputs_by_name(token_logprobs_fwd, inputs)
    _, max_logsum, entropy = output
    ctx.save_for_backward(args["logits"], args["targets"], max_logsum, entropy)
    ctx.temperature, ctx.ignore_index = args["temperature"], args["ignore_index"]
    ctx.with_entropy = args["with_entropy"]


@first_order_only
def _backward(ctx, g_logp, g_lse, g_entropy):
    logits, targets, max_logsum, entropy = ctx.saved_tensors
    g_entropy = g_entropy if ctx.with_entropy else None
    if g_logp is None:  # only the entropy was used
        g_logp = max_logsum.new_zeros(max_logsum.shape[0] // 2)
    grad = logits_grad(logits, targets, max_logsum, entropy, g_logp, g_entropy, ctx.temperature,
                       ctx.ignore_index, traced=True)
    return grads_by_name(token_logprobs_fwd, logits=grad)


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The eager path: the launchers called directly (one kernel forward, one backward), over the
# whole vocabulary or over this rank's shard of it (op 7, combined across the group)
# ---------------------------------------------------------------------------------------------
def kernel_logprobs(logits, targets, temperature, ignore_index, with_entropy, shard,
                    mask=None, counter=None):
    """Op 1's forward kernel: (logp, max_logsum (2R,), entropy or None) fp32, logp and
    entropy in the shape of ``targets`` (contiguous, R global ids), as token_logprobs_fwd
    returns them flat; over a shard (op 7) this rank's slice, combined across the group into
    the whole vocabulary's. ``mask`` and ``counter`` as launch_fwd takes them."""
    logp, max_logsum, entropy = new_row_buffers(targets.numel(), with_entropy, logits.device,
                                                targets.shape)
    launch_fwd(logits, targets, logp, max_logsum, entropy, temperature, ignore_index, with_entropy,
               0 if shard is None else shard.start, mask, counter)
    if shard is None:
        return logp, max_logsum, entropy
    return vocab_parallel.combine(logp, max_logsum, entropy, targets, ignore_index, shard)


class _TokenLogprobs(torch.autograd.Function):
    """Op 1 on the kernels in eager mode (``shard``: over a vocabulary shard, op 7): the
    backward is op 1's kernel with the whole vocabulary's max_logsum and the shard's column
    offset. Gradients of unused outputs are not materialised: the kernel skips them."""

    @staticmethod
    def forward(ctx, logits, targets, options):
        # the options in one tuple: each input of a node costs the forward and the backward
        # host time
        temperature, ignore_index, with_entropy, shard = options
        dense_t = dense(targets)
        logp, max_logsum, entropy = kernel_logprobs(logits, dense_t, temperature, ignore_index,
                                                    with_entropy, shard)
        # the caller's tensors and the entropy, an output, saved (autograd checks that nothing
        # modified them before the backward; an output held on ctx would be a reference
        # cycle); max_logsum, which nothing else sees, held as it is (saving costs host time)
        ctx.save_for_backward(logits, dense_t, entropy)
        ctx.max_logsum = max_logsum
        ctx.options = temperature, ignore_index, with_entropy, 0 if shard is None else shard.start
        ctx.set_materialize_grads(False)
        return logp, entropy  # in the targets' shape: a view outside would add a graph node

    @staticmethod
    @first_order_only
    def backward(ctx, g_logp, g_entropy):
        logits, targets, entropy = ctx.saved_tensors
        max_logsum = ctx.max_logsum
        temperature, ignore_index, with_entropy, start = ctx.options
        grad = logits_grad(logits, targets, max_logsum, entropy, g_logp,
                           g_entropy if with_entropy else None, temperature, ignore_index,
                           vocab_start=start, traced=tracing(logits))
        return grad, None, None


def kernel_token_logprobs(logits, targets, temperature, ignore_index, return_entropy, shard):
    """tic_kernels.token_logprobs on the kernels (inputs checked; logits 2-D or 3-D): the op
    while torch.compile traces, else the launchers."""
    if shard is None and tracing(logits):
        logp, _, entropy = token_logprobs_fwd(logits, targets, float(temperature),
                                              int(ignore_index), bool(return_entropy))
        logp = logp.view(targets.shape)
        entropy = entropy.view(targets.shape) if return_entropy else None
    else:  # in the targets' shape
        logp, entropy = _TokenLogprobs.apply(logits, targets, (float(temperature),
                                             int(ignore_index), bool(return_entropy), shard))
    return (logp, entropy) if return_entropy else logp


def _shaped(t, shape):
    """t viewed as ``shape``; t itself when it has that shape already (a view of a tensor
    that requires grad adds a node to the autograd graph, which the backward pays for in
    host time)."""
    return t if t.shape == shape else t.view(shape)


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=IGNORE_INDEX,
                   return_entropy=False, process_group=None):
    """Log-probability of each target under softmax(logits / temperature).

    Args:
        logits: (..., V) float16, bfloat16, float32 or float64; any strides.
        targets: (...) int32 or int64, in [0, V) or equal to ``ignore_index``.
        temperature: > 0; the logits are divided by it before the softmax.
        ignore_index: targets equal to it get logp 0, entropy 0 and a zero gradient, and their
            logits row is not read.
        return_entropy: also return the entropy of softmax(logits / temperature) per row.
        process_group: a torch.distributed group over which the vocabulary is split (op 7):
            this rank's logits are columns [rank V_local, (rank + 1) V_local) of the whole
            vocabulary, targets are global ids in [0, world V_local), replicated. The values
            are the whole vocabulary's; the gradient is this rank's slice of it. Two
            all-reduces per call (12 bytes a row, 16 with the entropy) and one to agree on
            the inputs; the backward communicates nothing (see tic_kernels.ops.vocab_parallel).

    Returns:
        logp (...) float32 (float64 for float64 logits), and entropy of the same shape and dtype
        when ``return_entropy``. Differentiable w.r.t. logits (gradient in the logits' dtype).
    """
    def checks(vocab):
        check.float_tensor("logits", logits)
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"logits must have a vocabulary dimension of size >= 1, got shape "
                             f"{tuple(logits.shape)}")
        check.gather_call("logits", logits, "V", vocab, targets, temperature, ignore_index,
                          return_entropy)

    _, shard = ranks.agree(
        process_group, "token_logprobs", checks, ranks.columns_of(logits), "logits",
        ranks.rows_of(targets), lambda _: {
            "targets": targets, "temperature": temperature, "ignore_index": ignore_index,
            "return_entropy": return_entropy, "logits' dtype": logits.dtype,
            **ranks.path_of(logits)})
    kernels = use_triton(logits)
    if shard is None and not kernels:
        return reference.token_logprobs(logits, targets, temperature, ignore_index, return_entropy)
    shape = targets.shape
    # the kernels describe rows by (b, t) strides: (V,) is one row; (..., T, V) merges the
    # leading dimensions (a view where the strides allow, else a copy autograd differentiates)
    if logits.dim() == 1:
        logits, targets = logits.unsqueeze(0), targets.reshape(1)
    elif logits.dim() > 3:
        logits, targets = logits.flatten(0, -3), targets.flatten(0, -2)
    if kernels:
        out = kernel_token_logprobs(logits, targets, temperature, ignore_index, return_entropy,
                                    shard)
    else:
        out = reference.vocab_token_logprobs(logits, targets, temperature, ignore_index,
                                             return_entropy, *shard.pair)
    return (_shaped(out[0], shape), _shaped(out[1], shape)) if return_entropy \
        else _shaped(out, shape)
