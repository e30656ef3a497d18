"""The reference (tic_kernels/reference/) against naive per-element loops and float64
gradcheck, for every option of docs/spec.md. The fused kernels are then tested against this reference."""
import math

import pytest
import torch

import naive
from tic_kernels import reference as ref
from tic_kernels.options import ROLLOUT_IS
from tic_kernels.testing import cu_seqlens_from, mask_from


# ---------------------------------------------------------------- op 1: token log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_matches_naive(dtype, temperature, monkeypatch):
    monkeypatch.setattr(ref.logprobs, "CHUNK_ELEMENTS", 40)  # several chunks of a few rows
    N, V = 9, 13
    logits = (torch.randn(N, V) * 3).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[4] = -100
    g, gH = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    logp, H = ref.token_logprobs(x, targets, temperature, -100, return_entropy=True)
    (logp.double() * g + H.double() * gH).sum().backward()
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for t in range(N):
        if t == 4:
            assert logp[t] == 0 and H[t] == 0 and (x.grad[t] == 0).all()
            continue
        lp, h, dlp, dh = naive.token_logprob(logits[t].double().tolist(), int(targets[t]), temperature)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert math.isclose(logp[t].item(), lp, abs_tol=tol, rel_tol=tol)
        assert math.isclose(H[t].item(), h, abs_tol=tol, rel_tol=tol)
        want = torch.tensor([g[t].item() * a + gH[t].item() * b for a, b in zip(dlp, dh)],
                            dtype=torch.float64)
        gtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(x.grad[t].double(), want, atol=gtol, rtol=gtol)
    assert x.grad.dtype == dtype


def test_token_logprobs_strided_3d_not_copied(monkeypatch):
    monkeypatch.setattr(ref.logprobs, "CHUNK_ELEMENTS", 30)
    full = torch.randn(3, 6, 11, dtype=torch.float64)
    logits = full[:, :-1]  # (3, 5, 11), not viewable as (15, 11)
    targets = torch.randint(0, 11, (3, 5))
    logp = ref.token_logprobs(logits, targets)
    want = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, want, atol=1e-12, rtol=0)


def test_token_logprobs_ignored_rows_never_read():
    logits = torch.randn(4, 7, dtype=torch.float64)
    logits[2] = float("nan")
    targets = torch.tensor([1, 2, -100, 3])
    x = logits.clone().requires_grad_(True)
    logp, H = ref.token_logprobs(x, targets, return_entropy=True)
    (logp.sum() + H.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(H).all()
    assert (x.grad[2] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("with_entropy", [False, True])
def test_token_logprobs_gradcheck(with_entropy):
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 5, -100, 2, 2])

    def f(z):
        out = ref.token_logprobs(z, targets, 0.8, -100, return_entropy=with_entropy)
        return out
    assert torch.autograd.gradcheck(f, (logits,))


# ---------------------------------------------------------------- op 2: sequence reduction
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_sequence_logprobs_matches_naive(reduce):
    lengths = torch.tensor([3, 0, 1, 5])
    x = torch.randn(int(lengths.sum()), dtype=torch.float64, requires_grad=True)
    s = ref.sequence_logprobs(x, cu_seqlens=cu_seqlens_from(lengths), reduce=reduce)
    start = 0
    for i, L in enumerate(lengths.tolist()):
        vals = x[start:start + L].tolist()
        want = sum(vals) / (max(L, 1) if reduce == "mean" else 1)
        assert math.isclose(s[i].item(), want, rel_tol=1e-12, abs_tol=1e-12)
        start += L
    assert torch.autograd.gradcheck(
        lambda v: ref.sequence_logprobs(v, cu_seqlens=cu_seqlens_from(lengths), reduce=reduce), (x,))


def test_sequence_logprobs_padded_equals_packed_and_skips_masked():
    lengths = torch.tensor([2, 0, 4])
    mask = mask_from(lengths, 5, holes=True, generator=torch.Generator().manual_seed(3))
    vals = torch.randn(3, 5, dtype=torch.float64)
    vals[~mask] = float("nan")
    x = vals.clone().requires_grad_(True)
    s = ref.sequence_logprobs(x, mask=mask, reduce="mean")
    packed = ref.sequence_logprobs(vals[mask], cu_seqlens=cu_seqlens_from(lengths), reduce="mean")
    torch.testing.assert_close(s, packed)
    s.sum().backward()
    assert (x.grad[~mask] == 0).all()


# ---------------------------------------------------------------- op 3: advantages
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("std", ["sample", "population"])
def test_group_advantages_matches_naive(scale, std):
    r = torch.randn(12, dtype=torch.float64)
    r[4:8] = 0.5  # a group of equal rewards
    got = ref.group_advantages(r, group_size=4, scale=scale, std=std)
    want = naive.group_advantages(r.tolist(), [i // 4 for i in range(12)], scale, std)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    assert (got[4:8] == 0).all()


def test_group_advantages_group_ids_any_order_and_singletons():
    ids = torch.tensor([7, -2, 7, 30, -2, 7])
    r = torch.tensor([1.0, 0.0, 3.0, 5.0, 2.0, 2.0])
    got = ref.group_advantages(r, group_ids=ids)
    want = naive.group_advantages(r.tolist(), ids.tolist())
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=1e-6)
    assert got[3] == 0 and got.dtype == torch.float32


def test_group_advantages_equal_rewards_exactly_zero_not_rounding():
    r = torch.full((8,), 0.1)  # mean of 0.1s in fp32 is not exactly 0.1
    r[4:] = 1 / 3
    got = ref.group_advantages(r, group_size=4, scale="none")
    assert (got == 0).all()


def test_group_advantages_length_normalize():
    r = torch.tensor([1.0, 2.0, 0.0, 3.0])
    L = torch.tensor([2, 4, 0, 1])
    got = ref.group_advantages(r, group_size=2, lengths=L, length_normalize=True)
    want = naive.group_advantages([0.5, 0.5, 0.0, 3.0], [0, 0, 1, 1])
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- op 4: the loss
LENGTHS = [3, 0, 5, 1, 4]


def _inputs(lengths=LENGTHS, drift=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    logp = -torch.rand(N, generator=g, dtype=dtype) * 4 - 0.05
    old = logp + drift * torch.randn(N, generator=g, dtype=dtype)
    refp = logp + drift * torch.randn(N, generator=g, dtype=dtype)
    ent = torch.rand(N, generator=g, dtype=dtype) * 3
    A = torch.randn(len(lengths), generator=g, dtype=dtype)
    return logp, old, refp, ent, A


def _naive_seqs(lengths, logp, old, refp, ent):
    seqs, start = [], 0
    for L in lengths:
        seqs.append([(logp[t].item(), old[t].item(), None if refp is None else refp[t].item(),
                      None if ent is None else ent[t].item()) for t in range(start, start + L)])
        start += L
    return seqs


def _check_against_naive(opts, lengths=LENGTHS, drift=0.3, seed=0, with_ref=True, with_ent=True):
    logp, old, refp, ent, A = _inputs(lengths, drift, seed)
    x = logp.clone().requires_grad_(True)
    out = ref.tic_loss_from_logprobs(
        x, old, A, cu_seqlens=cu_seqlens_from(torch.tensor(lengths)),
        ref_logprobs=refp if with_ref else None, entropy=ent if with_ent else None, **opts)
    out.loss.backward()
    _assert_naive(out, x.grad, naive.loss(
        _naive_seqs(lengths, logp, old, refp if with_ref else None, ent if with_ent else None),
        A.tolist(), **opts))
    return out


def _assert_naive(out, grad, naive_result):
    """The reference's loss, gradient and statistics equal the naive loops' (float64)."""
    want_loss, want_grads, want_stats = naive_result
    assert math.isclose(out.loss.item(), want_loss, rel_tol=1e-10, abs_tol=1e-12)
    flat = torch.tensor([g for s in want_grads for g in s], dtype=torch.float64)
    torch.testing.assert_close(grad, flat, atol=1e-12, rtol=1e-10)
    assert set(out.stats) == set(want_stats)
    for k, v in want_stats.items():
        assert math.isclose(out.stats[k].item(), v, rel_tol=1e-10, abs_tol=1e-12), k


@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token", "none"])
@pytest.mark.parametrize("clip_mode", ["two_sided", "upper"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize("aggregation", [None, "token-mean", "seq-mean-token-sum",
                                         "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_matches_naive(ratio, clip_mode, dual_clip, aggregation, beta):
    opts = dict(ratio=ratio, clip_mode=clip_mode, dual_clip=dual_clip, aggregation=aggregation,
                beta=beta, entropy_coef=0.01)
    if aggregation == "seq-mean-token-sum-norm":
        opts["max_len"] = 6
    out = _check_against_naive(opts)
    if ratio != "none":  # the inputs must exercise clipping, else the test proves little
        assert 0 < out.stats["clip_fraction"] < 1


def _rollout_values(lengths, old, mode, seed):
    """The sampler's log-probs near ``old`` (one NaN: a token it did not score) or, for mode
    "weights", positive weights with some zeros, as per-sequence lists and a flat tensor."""
    g = torch.Generator().manual_seed(seed)
    if mode == "weights":
        flat = torch.rand(old.shape, generator=g, dtype=old.dtype) * 2
        flat[::4] = 0.0
    else:
        flat = old + 0.4 * torch.randn(old.shape, generator=g, dtype=old.dtype)
        flat[2] = float("nan")
    seqs, start = [], 0
    for L in lengths:
        seqs.append(flat[start:start + L].tolist())
        start += L
    return seqs, flat


@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token", "none"])
@pytest.mark.parametrize("mode", ROLLOUT_IS + ("weights",))
@pytest.mark.parametrize("bounds", [(None, 1.3), (0.8, None), (0.7, 1.5)])
def test_rollout_correction_matches_naive(ratio, mode, bounds):
    """Op 4b: the weights, their statistics, and the loss and its gradient with the weight on
    each token's policy objective (KL and entropy unweighted)."""
    lengths = [3, 0, 5, 1, 4]
    logp, old, refp, ent, A = _inputs(lengths, seed=7)
    values, flat = _rollout_values(lengths, old, mode, seed=8)
    lo, hi = bounds
    opts = dict(ratio=ratio, beta=0.05, entropy_coef=0.01)
    correction = (dict(rollout_weights=flat) if mode == "weights" else
                  dict(rollout_logprobs=flat, rollout_is=mode, rollout_is_min=lo,
                       rollout_is_max=hi))
    x = logp.clone().requires_grad_(True)
    out = ref.tic_loss_from_logprobs(x, old, A, cu_seqlens=cu_seqlens_from(torch.tensor(lengths)),
                                     ref_logprobs=refp, entropy=ent, **opts, **correction)
    out.loss.backward()
    _assert_naive(out, x.grad, naive.loss(
        _naive_seqs(lengths, logp, old, refp, ent), A.tolist(), **opts, rollout_values=values,
        rollout_mode=mode, rollout_is_min=lo, rollout_is_max=hi))
    # the inputs exercise the correction: the weights differ, and some hit a bound
    assert 0 < out.stats["rollout_ess"] < 1
    if mode == "weights" or (mode.endswith("_mask") and bounds == (0.7, 1.5)):
        assert 0 < out.stats["rollout_masked_fraction"] < 1
    elif mode.endswith("_truncate") and bounds == (0.7, 1.5):
        assert out.stats["rollout_is_max"] == hi or out.stats["rollout_is_min"] == lo


def test_rollout_weights_of_one_change_nothing():
    """Weights of 1 (and sampler log-probs equal to old ones) leave loss and gradient as
    without a correction."""
    logp, old, refp, _, A = _inputs(seed=9)
    cu = cu_seqlens_from(torch.tensor(LENGTHS))
    results = []
    for correction in ({}, dict(rollout_weights=torch.ones_like(old)),
                       dict(rollout_logprobs=old.clone(), rollout_is="sequence_mask")):
        x = logp.clone().requires_grad_(True)
        out = ref.tic_loss_from_logprobs(x, old, A, cu_seqlens=cu, ref_logprobs=refp, beta=0.1,
                                         **correction)
        out.loss.backward()
        results.append((out.loss, x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-14, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("ratio", ["trajectory", "token"])
def test_loss_eps_and_cap_options(ratio):
    _check_against_naive(dict(ratio=ratio, eps_low=0.05, eps_high=0.6, max_log_ratio=0.4))
    out = _check_against_naive(dict(ratio=ratio, max_log_ratio=0.3), drift=1.0)
    assert out.stats["cap_fraction"] > 0


@pytest.mark.parametrize("agg,kw", [("token-mean", dict(num_tokens=40)),
                                    ("seq-mean-token-mean", dict(num_sequences=9)),
                                    ("seq-mean-token-sum", dict(num_sequences=9))])
def test_loss_global_normalisers(agg, kw):
    _check_against_naive(dict(ratio="token", aggregation=agg, **kw))


def test_loss_micro_batches_sum_to_full_batch():
    lengths = [3, 2, 5, 1, 4, 2]
    logp, old, _, _, A = _inputs(lengths)
    cu = cu_seqlens_from(torch.tensor(lengths))
    for agg, kw in [("token-mean", "num_tokens"), ("seq-mean-token-mean", "num_sequences")]:
        full = ref.tic_loss_from_logprobs(logp, old, A, cu_seqlens=cu, ratio="token",
                                          aggregation=agg).loss
        norm = sum(lengths) if kw == "num_tokens" else len(lengths)
        parts = 0.0
        for lo, hi in [(0, 2), (2, 6)]:
            sl = slice(int(cu[lo]), int(cu[hi]))
            parts = parts + ref.tic_loss_from_logprobs(
                logp[sl], old[sl], A[lo:hi], cu_seqlens=cu[lo:hi + 1] - cu[lo], ratio="token",
                aggregation=agg, **{kw: norm}).loss
        torch.testing.assert_close(parts, full)


@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token", "none"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_loss_gradcheck(ratio, dual_clip):
    logp, old, refp, _, A = _inputs()
    cu = cu_seqlens_from(torch.tensor(LENGTHS))

    def f(x):
        return ref.tic_loss_from_logprobs(x, old, A, cu_seqlens=cu, ratio=ratio,
                                          dual_clip=dual_clip, ref_logprobs=refp, beta=0.1).loss
    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),))


def test_tic_loss_from_logits_gradcheck_padded():
    lengths = torch.tensor([2, 0, 3])
    mask = mask_from(lengths, 4)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (3, 4))
    old = torch.randn(3, 4, dtype=torch.float64) * 0.2 - 1.6
    A = torch.randn(3, dtype=torch.float64)

    def f(z):
        return ref.tic_loss(z, targets, old, A, mask=mask, temperature=0.9, entropy_coef=0.1).loss
    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token", "none"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_log_ratio_is_finite(ratio, sign):
    lengths = [4, 3]
    logp, old, refp, _, _ = _inputs(lengths)
    old = logp - sign * 1e4 / 4  # |Delta| = 1e4 for the first sequence, more per token in the second
    for A_sign in (1.0, -1.0):
        A = torch.tensor([A_sign, -A_sign], dtype=torch.float64)
        x = logp.clone().requires_grad_(True)
        out = ref.tic_loss_from_logprobs(x, old, A, cu_seqlens=cu_seqlens_from(torch.tensor(lengths)),
                                         ratio=ratio, ref_logprobs=old, beta=0.1)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(v) for v in out.stats.values())
        if ratio != "none":
            assert out.stats["cap_fraction"] == 1


def test_empty_and_all_masked():
    logp, old, _, _, A = _inputs([0, 0])
    out = ref.tic_loss_from_logprobs(logp, old, A, cu_seqlens=torch.zeros(3, dtype=torch.int32))
    assert out.loss == 0 and all(v == 0 for k, v in out.stats.items() if k != "ratio_mean")
    logits = torch.randn(2, 3, 5, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = ref.tic_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3),
                       torch.randn(2), mask=mask, entropy_coef=0.1)
    out.loss.backward()
    assert out.loss == 0 and (logits.grad == 0).all()
    assert all(torch.isfinite(v) for v in out.stats.values())


def test_one_token():
    _check_against_naive(dict(ratio="trajectory"), lengths=[1])


# ---------------------------------------------------------------- peers' conventions
def _verl_style_token_loss(logp, old, A_tok, el, eh):
    """verl/TRL's vanilla PPO form: max(-A r, -A clip(r)), token-mean (DAPO)."""
    r = torch.exp(logp - old)
    return torch.max(-A_tok * r, -A_tok * r.clamp(1 - el, 1 + eh)).mean()


def test_token_mode_is_dapo():
    lengths = [3, 5, 4]
    logp, old, _, _, A = _inputs(lengths)
    A_tok = A.repeat_interleave(torch.tensor(lengths))
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours = ref.tic_loss_from_logprobs(x1, old, A, cu_seqlens=cu_seqlens_from(torch.tensor(lengths)),
                                      ratio="token").loss
    theirs = _verl_style_token_loss(x2, old, A_tok, 0.2, 0.28)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_sequence_mean_is_gspo():
    """GSPO as verl writes it: a per-token ratio exp(logp - sg(logp) + sg(s_i)) whose value is the
    sequence ratio, clipped and aggregated seq-mean-token-mean; same value and gradient."""
    lengths = [3, 5, 4]
    logp, old, _, _, A = _inputs(lengths, drift=0.0003)
    L = torch.tensor(lengths)
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ours = ref.tic_loss_from_logprobs(x1, old, A, cu_seqlens=cu_seqlens_from(L), ratio="sequence_mean",
                                      eps_low=3e-4, eps_high=4e-4).loss
    seq = ref.segment_sum(x2 - old, L) / L
    log_r = x2 - x2.detach() + seq.detach().repeat_interleave(L)
    r = torch.exp(log_r)
    A_tok = A.repeat_interleave(L)
    per_tok = torch.max(-A_tok * r, -A_tok * r.clamp(1 - 3e-4, 1 + 4e-4))
    theirs = (ref.segment_sum(per_tok, L) / L).mean()
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_sample_std_as_trl():
    r = torch.randn(16)
    got = ref.group_advantages(r, group_size=4)
    g = r.view(4, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
    torch.testing.assert_close(got, want)
