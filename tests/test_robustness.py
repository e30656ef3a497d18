"""Adversarial inputs on both paths: strided and permuted tensors, -inf vocabularies, 64-bit
column offsets, aliasing logits, skipped value checks, NaN, options at their bounds.

``path`` runs a test on the Triton kernels (the interpreter on the CPU) and on the reference
(the CPU path without the interpreter), both through the public API."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels.ops import token_logprobs as logprobs_mod
from tic_kernels import reference as ref
from tic_kernels.backend import use_triton
from tic_kernels.testing import (ADVANTAGE_TOL, GRAD_TOL, LOSS_TOL, VALUE_TOL, as_view,
                                 cu_seqlens_from, loss_batch, tolerance)

from conftest import DEVICE


@pytest.fixture(params=["triton", "reference"])
def path(request, monkeypatch):
    """The device whose tensors take the requested path."""
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not use_triton(torch.empty(1))
        return "cpu"
    request.getfixturevalue("requires_triton")
    return DEVICE


def on_both_paths(fn, monkeypatch):
    """(fn(the Triton path's device), fn("cpu") on the reference: the interpreter off)."""
    got = fn(DEVICE)
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET", raising=False)
        assert not use_triton(torch.empty(1))
        want = fn("cpu")
    return got, want


def strided(t):
    return as_view(t, "strided")


def _loss_and_grad(logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = tk.tic_loss(x, *args, **kw)
    out.loss.backward()
    return out, x.grad


# ------------------------------------------------------------------ strided inputs
def test_strided_inputs_read_through_their_strides(path):
    """Every tensor an op reads may be a strided view: targets, masks, cu_seqlens (int64),
    old/ref log-probs, advantages, rewards, group ids, lengths, values."""
    lengths = [3, 0, 5, 2]
    for padded in (False, True):
        b = loss_batch(lengths, 37, padded=padded, device=path, drift=0.3, seed=11)
        kw = dict(ref_logprobs=b.ref_logprobs, beta=0.05, entropy_coef=0.01)
        want, want_grad = _loss_and_grad(b.logits, b.targets, b.old_logprobs, b.advantages,
                                         **kw, **b.layout_kw)
        layout = {k: strided(v.long() if k == "cu_seqlens" else v) for k, v in b.layout_kw.items()}
        assert all(not v.is_contiguous() for v in layout.values())
        got, got_grad = _loss_and_grad(b.logits, strided(b.targets), strided(b.old_logprobs),
                                       strided(b.advantages), ref_logprobs=strided(b.ref_logprobs),
                                       beta=0.05, entropy_coef=0.01, **layout)
        assert torch.equal(got.loss, want.loss) and torch.equal(got_grad, want_grad)
        for k in want.stats:
            assert torch.equal(got.stats[k], want.stats[k]), k
        lp = torch.randn(b.targets.shape, device=path)
        a = tk.tic_loss_from_logprobs(strided(lp), strided(b.old_logprobs), strided(b.advantages),
                                      **layout).loss
        assert torch.equal(a, tk.tic_loss_from_logprobs(lp, b.old_logprobs, b.advantages,
                                                        **b.layout_kw).loss)
        assert torch.equal(tk.sequence_logprobs(strided(lp), **layout),
                           tk.sequence_logprobs(lp, **b.layout_kw))
    # 1-D targets that are a column of a (N, 2) tensor, as in pairs[:, 0]
    logits = torch.randn(6, 29, device=path)
    pairs = torch.randint(0, 29, (6, 2), device=path)
    assert torch.equal(tk.token_logprobs(logits, pairs[:, 0]),
                       tk.token_logprobs(logits, pairs[:, 0].contiguous()))
    rewards = torch.randn(8, device=path)
    gid = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3], device=path)
    n = torch.randint(1, 9, (8,), device=path)
    assert torch.equal(
        tk.group_advantages(strided(rewards), group_ids=strided(gid), lengths=strided(n),
                            length_normalize=True),
        tk.group_advantages(rewards, group_ids=gid, lengths=n, length_normalize=True))


def test_permuted_and_any_rank_logits(path):
    """Megatron's [s, b, v] -> [b, s, v] transpose, a (B, V, T) buffer seen as (B, T, V), and
    token_logprobs on (V,), (A, B, T, V) logits: forward and backward on both paths."""
    b = loss_batch([4, 2, 3], 31, padded=True, device=path, seed=12)
    mask = b.layout_kw["mask"]
    logits = b.logits.nan_to_num()
    for permuted in (logits.transpose(0, 1).contiguous().transpose(0, 1),
                     logits.transpose(1, 2).contiguous().transpose(1, 2)):
        assert not permuted.is_contiguous() and torch.equal(permuted, logits)
        got, g = _loss_and_grad(permuted, b.targets, b.old_logprobs, b.advantages, mask=mask)
        want, w = _loss_and_grad(logits, b.targets, b.old_logprobs, b.advantages, mask=mask)
        torch.testing.assert_close(got.loss, want.loss, atol=0, rtol=0)
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    x4 = torch.randn(2, 3, 4, 19, device=path)
    t4 = torch.randint(0, 19, (2, 3, 4), device=path)
    for x, t in ((x4, t4), (x4.transpose(0, 2), t4.transpose(0, 2)), (x4[1, 2, 3], t4[1, 2, 3])):
        leaf = x.detach().clone().requires_grad_(True)
        flat = x.detach().reshape(-1, 19).clone().requires_grad_(True)
        lp, H = tk.token_logprobs(leaf, t, return_entropy=True)
        lp2, H2 = tk.token_logprobs(flat, t.reshape(-1), return_entropy=True)
        assert lp.shape == t.shape and H.shape == t.shape
        torch.testing.assert_close(lp.reshape(-1), lp2, atol=0, rtol=0)
        torch.testing.assert_close(H.reshape(-1), H2, atol=0, rtol=0)
        (lp.sum() + H.sum()).backward()
        (lp2.sum() + H2.sum()).backward()
        torch.testing.assert_close(leaf.grad.reshape(-1, 19), flat.grad, atol=0, rtol=0)


def test_column_offsets_are_64_bit(requires_triton):
    """(V - 1) * stride_v >= 2^31 with stride_v < 2^31: an (N, V) view of a transposed buffer.
    A 4 GiB buffer: on the CPU only the 3 x N elements of the view are touched (no memory);
    on a GPU it is allocated."""
    N, V, stride_v = 2, 3, 2 ** 30 + 1
    buf = torch.empty((V - 1) * stride_v + N, dtype=torch.bfloat16, device=DEVICE)
    logits = buf.as_strided((N, V), (1, stride_v))
    values = torch.randn(N, V).to(torch.bfloat16).to(DEVICE)
    logits.copy_(values)
    targets = torch.tensor([2, 1], device=DEVICE)
    g = torch.randn(N, device=DEVICE)
    x = logits.detach().requires_grad_(True)
    y = values.clone().requires_grad_(True)
    lp = tk.token_logprobs(x, targets)
    (lp * g).sum().backward()
    lp_r = ref.token_logprobs(y, targets)
    (lp_r * g).sum().backward()
    torch.testing.assert_close(lp, lp_r, **tolerance(VALUE_TOL, torch.bfloat16))
    torch.testing.assert_close(x.grad, y.grad, **tolerance(GRAD_TOL, torch.bfloat16))


# ------------------------------------------------------------------ -inf and extreme logits
def test_masked_vocabulary_blocks(path, monkeypatch):
    """Whole vocabulary blocks of -inf (a restricted vocabulary): finite logp, exact entropy
    and gradient, on both paths, equal to the same rows with the masked ids removed."""
    monkeypatch.setitem(logprobs_mod.LAUNCH_CONFIG, "fwd", (64, 4))  # several blocks per row
    monkeypatch.setitem(logprobs_mod.LAUNCH_CONFIG, "bwd", (64, 4))
    N, V, cut = 5, 300, 150  # ids [0, 150) masked: the first two blocks are entirely -inf
    allowed = torch.randn(N, V - cut, device=path) * 2
    logits = torch.cat([torch.full((N, cut), -float("inf"), device=path), allowed], 1)
    logits[1, cut + 3] = -float("inf")  # and single masked entries inside the allowed block
    targets = torch.randint(cut, V, (N,), device=path)
    targets[1] = cut + 4
    g, gH = torch.randn(N, device=path), torch.randn(N, device=path)
    x = logits.clone().requires_grad_(True)
    y = logits[:, cut:].clone().requires_grad_(True)
    lp, H = tk.token_logprobs(x, targets, return_entropy=True, temperature=0.9)
    lp2, H2 = tk.token_logprobs(y, targets - cut, return_entropy=True, temperature=0.9)
    (lp * g + H * gH).sum().backward()
    (lp2 * g + H2 * gH).sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(H).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(lp, lp2, **tolerance(VALUE_TOL, torch.float32))
    torch.testing.assert_close(H, H2, **tolerance(VALUE_TOL, torch.float32))
    assert (x.grad[:, :cut] == 0).all() and x.grad[1, cut + 3] == 0
    torch.testing.assert_close(x.grad[:, cut:], y.grad, **tolerance(GRAD_TOL, torch.float32))
    # the fused loss on the same rows: finite, with the entropy bonus
    cu = cu_seqlens_from(torch.tensor([2, 3])).to(path)
    old, adv = lp.detach() + 0.1, torch.randn(2, device=path)
    out, grad = _loss_and_grad(logits, targets, old, adv, cu_seqlens=cu, entropy_coef=0.1)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # -3e38 - 3e38 = -inf
def test_entropy_of_extreme_logits(path, monkeypatch):
    """Logits near FLT_MAX: the entropy is exact (no overflow of a sum of p * z)."""
    big = 3e38
    logits = torch.tensor([[big] * 7, [big] * 4 + [-big] * 3, [big, -float("inf"), big, 0.0, 1.0, 2.0, 3.0]],
                          device=path)
    lp, H = tk.token_logprobs(logits, torch.tensor([0, 1, 2], device=path), return_entropy=True)
    log = torch.log(torch.tensor([7.0, 4.0, 2.0]))
    torch.testing.assert_close(H.cpu(), log, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(lp).all()  # -log 7 next to 3e38 rounds away: lse == 3e38 in fp32
    # the max jumps from -3e38 (one vocabulary block) to +3e38 (the next): m_new - m overflows
    monkeypatch.setitem(logprobs_mod.LAUNCH_CONFIG, "fwd", (64, 4))
    monkeypatch.setitem(logprobs_mod.LAUNCH_CONFIG, "bwd", (64, 4))
    row = torch.cat([torch.full((1, 64), -big), torch.full((1, 64), big)], 1).to(path)
    _, H = tk.token_logprobs(row, torch.tensor([70], device=path), return_entropy=True)
    torch.testing.assert_close(H.cpu(), torch.log(torch.tensor([64.0])), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ aliasing and in-place
def test_inplace_backward_never_writes_through_aliases(device, requires_triton):
    """An expanded tensor, a view of a parameter and a leaf fall back to an allocated
    gradient with a warning: the caller's storage is untouched and the gradient is right."""
    b = loss_batch([3, 4], 23, device=device, seed=13)
    N, V = b.logits.shape
    args = (b.targets, b.old_logprobs, b.advantages)
    _, want = _loss_and_grad(b.logits, *args, cu_seqlens=b.layout_kw["cu_seqlens"])
    w = torch.randn(V, device=device, requires_grad=True)
    param = b.logits.reshape(-1).clone().requires_grad_(True)
    leaf = b.logits.clone().requires_grad_(True)
    cases = [(w, w.expand(N, V), lambda gr: gr.sum(0)),
             (param, param.view(N, V), lambda gr: gr.reshape(-1)),
             (leaf, leaf, lambda gr: gr)]
    for owner, logits, reduce in cases:
        before = owner.detach().clone()
        with pytest.warns(UserWarning, match="inplace_backward=True ignored"):
            out = tk.tic_loss(logits, *args, cu_seqlens=b.layout_kw["cu_seqlens"],
                              inplace_backward=True)
        out.loss.backward()
        assert torch.equal(owner.detach(), before)  # never overwritten
        expected = _loss_and_grad(logits.detach(), *args, cu_seqlens=b.layout_kw["cu_seqlens"])[1]
        torch.testing.assert_close(owner.grad, reduce(expected), atol=1e-6, rtol=1e-5)
    # A graph node that saved the logits themselves sees them modified: autograd says so.
    h = torch.randn(N, V, device=device, requires_grad=True)
    out = tk.tic_loss(torch.tanh(h), *args, cu_seqlens=b.layout_kw["cu_seqlens"],
                      inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
    assert want.shape == (N, V)


# ------------------------------------------------------------------ skipped value checks
def test_unchecked_cu_seqlens_stay_in_bounds(monkeypatch, requires_triton):
    """With TIC_KERNELS_CHECK_VALUES=0 a cu_seqlens past N, negative or decreasing gives
    numbers from the clamped segments, never an out-of-bounds access."""
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b = loss_batch([3, 4, 2], 17, device=DEVICE, seed=14)
    N = b.targets.shape[0]
    args = (b.targets, b.old_logprobs, b.advantages)
    over = torch.tensor([0, 3, 7, N + 50], dtype=torch.int32, device=DEVICE)
    clamped = torch.tensor([0, 3, 7, N], dtype=torch.int32, device=DEVICE)
    got, g = _loss_and_grad(b.logits, *args, cu_seqlens=over, entropy_coef=0.1)
    want, w = _loss_and_grad(b.logits, *args, cu_seqlens=clamped, entropy_coef=0.1)
    assert torch.equal(got.loss, want.loss) and torch.equal(g, w)
    lp = torch.randn(N, device=DEVICE)
    assert torch.equal(tk.sequence_logprobs(lp, cu_seqlens=over),
                       tk.sequence_logprobs(lp, cu_seqlens=clamped))
    for bad in ([0, 5, 2, N], [-4, 3, 7, N], [0, 3, 7, 2 ** 31 - 1]):
        cu = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
        out, g = _loss_and_grad(b.logits, *args, cu_seqlens=cu)
        assert torch.isfinite(g).all()
        tk.sequence_logprobs(lp, cu_seqlens=cu)


# ------------------------------------------------------------------ old/ref are data
def test_old_and_ref_logprobs_are_constants(path):
    """Passing the current log-probs (undetached) as old and ref changes nothing: they are
    data on both paths, like the advantages."""
    b = loss_batch([3, 5], 19, device=path, seed=15)
    lp = torch.randn(8, device=path) - 2
    for ratio in ("trajectory", "token"):
        x = lp.clone().requires_grad_(True)
        y = lp.clone().requires_grad_(True)
        adv = b.advantages.clone().requires_grad_(True)
        a = tk.tic_loss_from_logprobs(x, x, adv, ref_logprobs=x * 1.0, beta=0.1, ratio=ratio,
                                      **b.layout_kw)
        c = tk.tic_loss_from_logprobs(y, lp, b.advantages, ref_logprobs=lp, beta=0.1, ratio=ratio,
                                      **b.layout_kw)
        a.loss.backward()
        c.loss.backward()
        assert x.grad.abs().sum() > 0 and adv.grad is None
        torch.testing.assert_close(x.grad, y.grad, atol=0, rtol=0)


# ------------------------------------------------------------------ bounds and stability
def test_max_log_ratio_is_bounded(path):
    b = loss_batch([4, 3], 13, device=path, seed=16)
    with pytest.raises(ValueError, match="max_log_ratio must be <= 60"):
        tk.tic_loss(b.logits, b.targets, b.old_logprobs, b.advantages, max_log_ratio=61.0,
                    **b.layout_kw)
    old = b.old_logprobs - 1000.0  # Delta = +4000 on sequence 0, the cap at its bound
    for ratio in ("trajectory", "token", "sequence_mean"):
        out, grad = _loss_and_grad(b.logits, b.targets, old, b.advantages * 50, ratio=ratio,
                                   max_log_ratio=60.0, clip_mode="upper", eps_high=10.0,
                                   ref_logprobs=old, beta=0.5, **b.layout_kw)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    # one 20000-token sequence just inside the cap, advantage -1000, summed over its tokens
    L = 20000
    lp = torch.full((L,), -1.0, device=path)
    old = lp - 59.9 / L
    cu = torch.tensor([0, L], dtype=torch.int32, device=path)
    x = lp.clone().requires_grad_(True)
    out = tk.tic_loss_from_logprobs(x, old, torch.tensor([-1000.0], device=path), cu_seqlens=cu,
                                    aggregation="seq-mean-token-sum", max_log_ratio=60.0)
    out.loss.backward()  # |loss| = L |A| e^59.9 = 2e33: finite (at the cap 80 it was inf)
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_group_advantages_of_large_rewards(path):
    r = torch.tensor([1e7, 1e7 + 1, 1e7, 1e7 + 1], device=path)
    want = torch.tensor([-1, 1, -1, 1.0]) * 0.8660254
    torch.testing.assert_close(tk.group_advantages(r, 4).cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tk.group_advantages(r, 4, scale="batch").cpu(), want,
                               atol=1e-5, rtol=1e-5)
    shifted = torch.tensor([3e6, 3e6 + 0.5, 3e6 + 2, 5.0], device=path)
    gid = torch.tensor([4, 4, 4, 9], device=path)
    got = tk.group_advantages(shifted, group_ids=gid, std="population").cpu()
    d = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    d = (d - d.mean()) / (d.std(correction=0) + 1e-6)
    torch.testing.assert_close(got, torch.cat([d.float(), torch.zeros(1)]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ double backward
def test_double_backward(path):
    """The log-softmax ops and the loss raise under create_graph=True (rather than return a
    gradient with no graph); sequence sums are linear and differentiate to any order."""
    b = loss_batch([3, 4], 11, device=path, seed=17)
    x = b.logits.clone().requires_grad_(True)
    lp = (b.old_logprobs + 0.01 * torch.randn(7, device=path)).requires_grad_(True)
    losses = {
        "token_logprobs": (x, lambda: tk.token_logprobs(x, b.targets, return_entropy=True)[1].sum()),
        "tic_loss": (x, lambda: tk.tic_loss(x, b.targets, b.old_logprobs, b.advantages,
                                            entropy_coef=0.1, **b.layout_kw).loss),
        "tic_loss_from_logprobs": (lp, lambda: tk.tic_loss_from_logprobs(
            lp, b.old_logprobs, b.advantages, **b.layout_kw).loss),
    }
    for name, (inp, fn) in losses.items():
        with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not"):
            torch.autograd.grad(fn(), inp, create_graph=True)
        (g,) = torch.autograd.grad(fn(), inp)  # once is fine
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    for reduce, scale in (("sum", [3.0, 3, 3, 4, 4, 4, 4]), ("mean", [1 / 3] * 3 + [1 / 4] * 4)):
        v = torch.randn(7, device=path, requires_grad=True)
        s = tk.sequence_logprobs(v, reduce=reduce, **b.layout_kw)
        (g,) = torch.autograd.grad((s ** 2).sum(), v, create_graph=True)
        g.sum().backward()  # sum: d/dv_t sum_u 2 S_i(u) = 2 L_i; mean: 2 sum_i M_i -> 2 / L_i
        torch.testing.assert_close(v.grad.cpu(), 2 * torch.tensor(scale))


# ------------------------------------------------------------------ the NaN rule
@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token", "none"])
def test_nan_rule_is_the_same_on_both_paths(ratio, monkeypatch, requires_triton):
    """A NaN makes the loss NaN and the gradient NaN on exactly the loss tokens whose
    objective is NaN (every token of the sequence for a sequence ratio), on both paths; an
    empty sequence's NaN advantage touches nothing. (Under the interpreter tl.minimum and
    tl.maximum drop NaN as PTX min / max do: conftest.py.)"""
    b = loss_batch([3, 4, 0, 2, 3], 13, device="cpu", drift=0.3, seed=18)
    b.logits[1, 5] = float("nan")  # a NaN logit in token 1 (sequence 0)
    b.advantages[1] = float("nan")  # sequence 1: tokens 3-6
    b.advantages[2] = float("nan")  # the empty sequence 2
    b.old_logprobs[7] = float("nan")  # the first token of sequence 3 (tokens 7-8)

    def run(dev):
        kw = dict(ratio=ratio, ref_logprobs=b.ref_logprobs.to(dev), beta=0.1,
                  cu_seqlens=b.layout_kw["cu_seqlens"].to(dev))
        out, grad = _loss_and_grad(b.logits.to(dev), b.targets.to(dev), b.old_logprobs.to(dev),
                                   b.advantages.to(dev), **kw)
        return out.loss.cpu(), grad.cpu()

    (loss_t, g_t), (loss_r, g_r) = on_both_paths(run, monkeypatch)
    assert torch.isnan(loss_t) and torch.isnan(loss_r)
    assert torch.equal(torch.isnan(g_t), torch.isnan(g_r))
    nan_rows = torch.isnan(g_r).any(1)
    expected = {"token": [1, 3, 4, 5, 6, 7],  # only the tokens whose own objective is NaN
                "none": [1, 3, 4, 5, 6]}.get(ratio, list(range(9)))  # none: old is unused
    assert nan_rows.nonzero().flatten().tolist() == expected
    assert (~torch.isnan(g_r[nan_rows])).sum() == 0  # a NaN row is NaN throughout
    torch.testing.assert_close(g_t[~nan_rows], g_r[~nan_rows], **tolerance(GRAD_TOL, torch.float32))
    # without those NaNs the paths agree (the empty sequence's NaN advantage stays)
    b.logits[1, 5], b.advantages[1], b.old_logprobs[7] = 0.5, 0.3, -2.0
    (loss_t, g_t), (loss_r, g_r) = on_both_paths(run, monkeypatch)
    assert torch.isfinite(loss_t) and torch.isfinite(g_t).all()
    torch.testing.assert_close(loss_t, loss_r, **tolerance(LOSS_TOL))
    torch.testing.assert_close(g_t, g_r, **tolerance(GRAD_TOL, torch.float32))


def test_nan_reward_reaches_its_group(monkeypatch, requires_triton):
    """A NaN reward makes its group's advantages NaN (not the "equal rewards" 0), on both
    paths; the other groups are untouched."""
    r = torch.tensor([float("nan"), 1.0, 1.0, 1.0, 0.0, 1.0])
    got, want = on_both_paths(lambda dev: tk.group_advantages(r.to(dev), 3).cpu(), monkeypatch)
    assert torch.isnan(got[:3]).all() and torch.isnan(want[:3]).all()
    torch.testing.assert_close(got[3:], want[3:], **tolerance(ADVANTAGE_TOL))
