"""Op 6's chunk plan and what one call of the fused LM head costs, pinned on the CPU.

The plan: rows-equal chunks for the token-level ratios, runs of whole sequences of about equal
rows for the others (a sequence longer than a chunk in equal pieces), the logits buffer sized
to the largest chunk. Per chunk: one GEMM for the logits, one row kernel forward, one backward,
one GEMM each for d hidden and d weight (a piece of a long sequence one more GEMM for its
logits); the first chunk's GEMMs write the gradients (nothing zero-filled first), the backward
launches one scaling kernel per gradient and materialises nothing. Memory: the storages alive
at once, counted under a dispatch mode (tic_kernels.testing.Launches, the kernels stubbed),
stay within the chunk buffer, the outputs and O(N) floats.
"""
import random

import pytest
import torch

import tic_kernels as tk
from tic_kernels.config import LossConfig
from tic_kernels.layout import row_chunks
from tic_kernels.ops import lm_head, lm_head_loss
from tic_kernels.ops.lm_head_loss import by_rows, sequence_groups
from tic_kernels.options import LM_HEAD_CHUNK_BYTES, lm_head_chunk_rows
from tic_kernels.testing import Launches, head_batch

GEMMS = ("aten.mm", "aten.addmm", "aten.addmm_")
ZERO_FILLS = ("aten.zero_", "aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.fill_",
              "aten.full", "aten.full_like", "aten.new_full")
ROW_FWD, ROW_BWD = "_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"


def _random_cu(rng, B, longest):
    lengths = [rng.choice([0, rng.randint(1, longest)]) for _ in range(B)]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def test_sequence_groups_cover_in_order_and_fit():
    """Runs cover every sequence once, in order; a run of two or more sequences fits the
    chunk; never more runs than filling each greedily would make (fresh random batches)."""
    rng = random.Random()
    for _ in range(300):
        B, max_rows = rng.randint(1, 40), rng.randint(1, 60)
        cu = _random_cu(rng, B, 2 * max_rows)
        runs = sequence_groups(cu, max_rows)
        assert [s for r in runs for s in range(*r)] == list(range(B)), (cu, max_rows, runs)
        for s0, s1 in runs:
            assert s1 - s0 == 1 or cu[s1] - cu[s0] <= max_rows, (cu, max_rows, runs)
        greedy, s0 = 0, 0
        while s0 < B:
            s1 = s0 + 1
            while s1 < B and cu[s1 + 1] - cu[s0] <= max_rows:
                s1 += 1
            greedy, s0 = greedy + 1, s1
        assert len(runs) <= greedy, (cu, max_rows, runs)


def test_default_plan_at_the_benchmark_shape():
    """16384 rows of 1024-token sequences, V = 151936 in bf16: four chunks of 4096 rows (1.16
    GiB of logits each), for both kinds of plan; the greedy plan of the first GPU run made six
    (five of 3072 rows, one of 1024) under a buffer of 3533."""
    rows = lm_head_chunk_rows(151936, 2)
    assert 4096 * 151936 * 2 <= rows * 151936 * 2 <= LM_HEAD_CHUNK_BYTES <= 1.2 * 2 ** 30
    assert row_chunks(0, 16384, rows) == [(a, a + 4096) for a in range(0, 16384, 4096)]
    cu = list(range(0, 16385, 1024))
    assert sequence_groups(cu, rows) == [(0, 4), (4, 8), (8, 12), (12, 16)]


@pytest.mark.parametrize("options, rows", [
    (dict(ratio="token", aggregation="token-mean"), True),  # the default for "token"
    (dict(ratio="none", aggregation="seq-mean-token-sum"), True),
    (dict(ratio="token", aggregation="seq-mean-token-mean"), False),  # 1 / L_i: whole
    (dict(ratio="token", aggregation="token-mean", rollout="sequence_truncate"), False),
    (dict(ratio="trajectory"), False),
    (dict(ratio="sequence_mean", aggregation="token-mean"), False),
])
def test_which_ratios_chunk_by_rows(options, rows):
    assert by_rows(LossConfig(**options)) is rows


def _leaves(batch, dtype):
    return [t.to(dtype).clone().requires_grad_() for t in (batch.hidden, batch.weight,
                                                           batch.bias)]


def _call(leaves, batch, **kw):
    return tk.linear_tic_loss(leaves[0], leaves[1], batch.targets, batch.old_logprobs,
                              batch.advantages, bias=leaves[2], **batch.layout_kw, **kw)


def _counted(leaves, batch, **kw):
    """(forward's Launches, backward's Launches), the kernels stubbed, the head's op bodies
    counted."""
    with Launches(stub=True, into=(lm_head, lm_head_loss)) as fwd:
        out = _call(leaves, batch, **kw)
    with Launches(stub=True, into=(lm_head, lm_head_loss)) as bwd:
        out.loss.backward()
    return fwd, bwd


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("ratio, lengths, chunk, pieces", [
    ("token", [10, 14, 6, 12], 14, [14, 14, 14]),  # rows-equal, cutting sequences
    ("trajectory", [5, 4, 6, 0, 3, 9], 10, [9, 9, 9]),  # runs of whole sequences
    ("trajectory", [10, 30, 2], 14, [10, 10, 10, 10, 2]),  # the 30 in three pieces
])
@pytest.mark.parametrize("padded", [False, True])
def test_gemms_and_row_kernels_per_chunk(ratio, lengths, chunk, pieces, padded):
    """Three GEMMs and two row kernels per chunk (one GEMM more for each piece of a long
    sequence but the last, whose logits are still in the buffer), one ratio kernel per chunk
    and one to finish, no zero-fill of the gradients (packed; padded: d hidden's masked rows,
    once; the token ratio's (N,) coefficients, once), a backward of three scaling launches
    and no allocation."""
    batch = head_batch(lengths, 41, 8, padded=padded, seed=random.randrange(1 << 30))
    fwd, bwd = _counted(_leaves(batch, torch.float32), batch, ratio=ratio, chunk_size=chunk)
    k = len(pieces)
    long_pieces = k - len(sequence_groups(
        [0] + torch.tensor(lengths).cumsum(0).tolist(), chunk)) if ratio != "token" else 0
    gemms = [n for n in fwd.kernels if n in GEMMS]
    assert len(gemms) == 3 * k + long_pieces, fwd.kernels
    # the first chunk writes d weight (mm), the later ones accumulate (addmm_)
    assert [n for n in gemms if n == "aten.addmm_"] == ["aten.addmm_"] * (k - 1), gemms
    assert fwd.kernels.count(ROW_FWD) == k and fwd.kernels.count(ROW_BWD) == k
    ratio_kernels = fwd.kernels.count("_ratio_loss_fwd_kernel")
    runs = k - long_pieces
    assert ratio_kernels == (k + 1 if ratio == "token" else runs), fwd.kernels
    assert fwd.kernels.count("_ratio_loss_finalize_kernel") == 1
    fills = [n for n in fwd.kernels if n in ZERO_FILLS]
    # rows-equal chunks: the (N,) coefficients (rows of no sequence get none); padded: d
    # hidden, whose masked rows are never multiplied; and the value checks' flags
    assert len(fills) == (ratio == "token") + padded + 1, fills
    assert fwd.kernels.count("_value_checks_kernel") == 1, fwd.kernels
    assert fwd.host_reads == (1 if ratio == "token" else 2) + (1 if padded else 0), \
        "value checks, cu_seqlens planned on the host for whole sequences, the mask's rows"
    assert bwd.kernels == ["aten.ones_like"] + ["_scale_kernel"] * 3, bwd.kernels
    assert bwd.peak_bytes <= 4, "the backward allocates nothing but its seed"


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("fp32_accumulation", [False, True])
@pytest.mark.parametrize("ratio", ["token", "trajectory"])
@pytest.mark.parametrize("padded", [False, True])
def test_memory_within_the_chunk_and_the_outputs(fp32_accumulation, ratio, padded,
                                                  monkeypatch):
    """The storages alive at once in the forward (where the gradient is formed) add up to at
    most the chunk buffer, the outputs and O(N) floats; with an fp32 accumulator the buffer
    is freed before the accumulator is converted (the two are never alive with the converted
    copy); the backward allocates nothing. (On the CPU the fp32 accumulation forms each
    chunk's product in fp32 block by block, 16 rows of d weight at a time here: small
    temporaries, and the chunk's hidden rows in fp32. Padded: the chunk's hidden rows are
    gathered, and its d hidden rows scattered.) H = 64, so that a leaked (N, H) fp32 copy
    would not fit in the O(N) allowance."""
    monkeypatch.setattr(lm_head, "_FALLBACK_ROWS", 16)
    V, H, chunk = 401, 64, 24
    lengths = [12, 10, 12, 14] if padded else [12, 12, 12, 12]  # padded: 8 masked rows
    batch = head_batch(lengths, V, H, padded=padded, seed=random.randrange(1 << 30))
    N = batch.hidden.numel() // H
    leaves = _leaves(batch, torch.bfloat16)
    fwd, bwd = _counted(leaves, batch, ratio=ratio, chunk_size=chunk,
                        fp32_accumulation=fp32_accumulation)
    buffer, dh, dw, db = chunk * V * 2, N * H * 2, V * H * 2, V * 2
    small = 24 * 4 * N + 1024  # O(N) floats: log-probs, their (max, log-sum), coefficients...
    if padded:  # a chunk's gathered hidden rows and its d hidden rows before the scatter
        small += 2 * chunk * H * 2
    acc = 2 * dw + 2 * db  # fp32 accumulators of d weight and d bias
    if fp32_accumulation:
        block = chunk * H * 4 + 16 * chunk * 4 + 16 * H * 4
        bound = max(buffer + acc + block, acc + dw + db) + dh + small
        assert buffer + acc + dw + db + dh > bound, "the test could not see the buffer alive"
    else:
        bound = buffer + dh + dw + 2 * db + small  # d bias accumulates in fp32
    assert fwd.peak_bytes <= bound, (fwd.peak_bytes, bound)
    assert fwd.peak_bytes >= buffer + dh + dw + db, "the probe missed the buffer or an output"
    assert bwd.peak_bytes <= 4
