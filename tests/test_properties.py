"""Property-based tests (hypothesis): drawn layouts, views, dtypes and options, the Triton
path against the reference and the reference against the naive loops; and batch invariance
as a guarantee on both paths."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import naive
import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.testing import (GRAD_TOL, LOSS_TOL, NAIVE_TOL, VALUE_TOL, as_view,
                                 cu_seqlens_from, entropy_tolerance, loss_batch, mask_from,
                                 tolerance)

from conftest import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def loss_cases(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    ratio = draw(st.sampled_from(["trajectory", "sequence_mean", "token", "none"]))
    padded = draw(st.booleans())
    agg = draw(st.sampled_from([None, "token-mean", "seq-mean-token-sum",
                                "seq-mean-token-sum-norm"]))
    opts = dict(ratio=ratio, aggregation=agg,
                clip_mode=draw(st.sampled_from(["two_sided", "upper"])),
                dual_clip=draw(st.sampled_from([None, 3.0])),
                eps_low=draw(st.sampled_from([0.2, 0.05])),
                eps_high=draw(st.sampled_from([0.28, 0.6])),
                max_log_ratio=draw(st.sampled_from([20.0, 0.5])),
                temperature=draw(st.sampled_from([1.0, 0.7])),
                entropy_coef=draw(st.sampled_from([0.0, 0.03])))
    if draw(st.booleans()):
        opts.update(beta=0.05, use_ref=True)
    if agg == "seq-mean-token-sum-norm" and not padded:
        opts["max_len"] = max(lengths) + 1
    return dict(lengths=lengths, padded=padded, opts=opts,
                V=draw(st.sampled_from([1, 2, 7, 33, 70])),
                dtype=draw(st.sampled_from(DTYPES)),
                view=draw(st.sampled_from(["contiguous", "strided", "transposed", "offset"])),
                drift=draw(st.sampled_from([0.01, 0.3, 2.0])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _run(fn, logits, b, opts, view):
    """fn's loss and the gradient w.r.t. logits, passed to fn as the given view."""
    x = logits.detach().clone().requires_grad_(True)
    kw = {k: v for k, v in opts.items() if k != "use_ref"}
    if opts.get("use_ref"):
        kw["ref_logprobs"] = b.ref_logprobs
    out = fn(as_view(x, view), b.targets, b.old_logprobs, b.advantages, **kw, **b.layout_kw)
    out.loss.backward()
    return out, x.grad


@pytest.mark.usefixtures("requires_triton")
@settings(max_examples=30, **SETTINGS)
@given(loss_cases())
def test_fused_loss_matches_reference(case):
    b = loss_batch(case["lengths"], case["V"], dtype=case["dtype"], padded=case["padded"],
                   device=DEVICE, drift=case["drift"], seed=case["seed"])
    got, g = _run(tk.tic_loss, b.logits, b, case["opts"], case["view"])
    want, w = _run(ref.tic_loss, b.logits, b, case["opts"], case["view"])
    atol, rtol = LOSS_TOL
    torch.testing.assert_close(got.loss, want.loss, atol=atol, rtol=rtol)
    assert set(got.stats) == set(want.stats)
    for k in want.stats:
        torch.testing.assert_close(got.stats[k], want.stats[k], atol=atol, rtol=rtol, msg=k)
    if case["padded"]:
        assert (g[~b.layout_kw["mask"]] == 0).all()
    torch.testing.assert_close(g, w, **tolerance(GRAD_TOL, case["dtype"]))


@settings(max_examples=25, **SETTINGS)
@given(loss_cases())
def test_reference_loss_matches_naive(case):
    """The reference's loss, dL/dlogp and statistics against the per-element loops, from the
    log-probabilities and entropies of the same (rounded) logits."""
    opts = {k: v for k, v in case["opts"].items() if k not in ("temperature", "use_ref")}
    ent_coef = opts.pop("entropy_coef")
    if opts["aggregation"] == "seq-mean-token-sum-norm":  # packed here: max_len is needed
        opts["max_len"] = max(case["lengths"]) + 1
    b = loss_batch(case["lengths"], case["V"], dtype=case["dtype"], device="cpu",
                   drift=case["drift"], seed=case["seed"])
    logp, H = ref.token_logprobs(b.logits, b.targets, return_entropy=True)
    refl = b.ref_logprobs if case["opts"].get("use_ref") else None
    x = logp.clone().requires_grad_(True)
    out = ref.tic_loss_from_logprobs(x, b.old_logprobs, b.advantages, ref_logprobs=refl,
                                     entropy=H, entropy_coef=ent_coef, **opts,
                                     **b.layout_kw)
    out.loss.backward()
    cu = b.layout_kw["cu_seqlens"].tolist()
    seqs = [[(logp[t].item(), b.old_logprobs[t].item(),
              None if refl is None else refl[t].item(), H[t].item())
             for t in range(cu[i], cu[i + 1])] for i in range(len(cu) - 1)]
    loss, grads, stats = naive.loss(seqs, b.advantages.tolist(), entropy_coef=ent_coef, **opts)
    assert math.isclose(out.loss.item(), loss, rel_tol=NAIVE_TOL[1], abs_tol=NAIVE_TOL[0])
    flat = [gt for g in grads for gt in g]
    torch.testing.assert_close(x.grad.double(), torch.tensor(flat, dtype=torch.float64),
                               **tolerance(NAIVE_TOL))
    atol, rtol = NAIVE_TOL
    for k, v in stats.items():
        assert math.isclose(out.stats[k].item(), v, rel_tol=rtol, abs_tol=atol), k


@st.composite
def logprob_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    return dict(shape=shape, V=draw(st.sampled_from([1, 5, 33, 70])),
                dtype=draw(st.sampled_from(DTYPES)),
                view=draw(st.sampled_from(["contiguous", "strided", "transposed", "offset",
                                           "expanded"])),
                temperature=draw(st.sampled_from([1.0, 0.6])),
                masked=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))


@pytest.mark.usefixtures("requires_triton")
@settings(max_examples=30, **SETTINGS)
@given(logprob_cases())
def test_token_logprobs_any_rank_and_view(case):
    """token_logprobs on 1-D to 4-D logits of any layout: Triton against the reference, and
    the reference against the naive loops."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, V = case["shape"], case["V"]
    raw = torch.randn(*shape, V, generator=g) * 3
    if case["masked"] and V > 1:  # a restricted vocabulary: masked ids are -inf
        raw[..., : V // 2] = -float("inf")
    logits = raw.to(case["dtype"]).to(DEVICE)
    lo = V // 2 if case["masked"] and V > 1 else 0
    targets = torch.randint(lo, V, shape, generator=g).to(DEVICE)
    gl, gh = torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE)
    results = []
    for fn in (tk.token_logprobs, None):
        if case["view"] == "expanded":  # every leading index reads the same rows
            x = logits.reshape(-1, V)[:1].clone().requires_grad_(True)
            view = x.expand(*shape, V) if shape else x[0]
            t = torch.zeros_like(targets) + targets.reshape(-1)[:1].reshape(())
        else:
            x = logits.clone().requires_grad_(True)
            view, t = as_view(x, case["view"]), targets
        kw = dict(temperature=case["temperature"], return_entropy=True)
        lp, H = (fn(view, t, **kw) if fn else
                 ref.token_logprobs(view, t, case["temperature"], -100, True))
        (lp * gl + H * gh).sum().backward()
        results.append((lp, H, x.grad, t))
    (lp, H, gx, t), (lp_r, H_r, gx_r, _) = results
    assert lp.shape == shape and H.shape == shape
    torch.testing.assert_close(lp, lp_r, **tolerance(VALUE_TOL, case["dtype"]))
    torch.testing.assert_close(H, H_r, **entropy_tolerance(V))
    torch.testing.assert_close(gx, gx_r, **tolerance(GRAD_TOL, case["dtype"]))
    rows = logits.reshape(-1, V).double().cpu()
    for r, (row, tgt) in enumerate(zip(rows, t.reshape(-1).tolist())):
        if case["view"] == "expanded":
            row = rows[0]
        want_lp, want_H, _, _ = naive.token_logprob(
            [v if math.isfinite(v) else -1e300 for v in row.tolist()], tgt, case["temperature"])
        assert math.isclose(lp_r.reshape(-1)[r].item(), want_lp, abs_tol=2e-5, rel_tol=2e-5)
        assert math.isclose(H_r.reshape(-1)[r].item(), want_H, abs_tol=2e-5, rel_tol=2e-5)


# ------------------------------------------------------------------ batch invariance
@pytest.fixture(params=["triton", "reference"])
def path_device(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cpu"
    request.getfixturevalue("requires_triton")
    return DEVICE


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance(dtype, path_device):
    """A sequence's log-probs, entropies and logits gradient rows are bitwise identical
    computed alone, inside a larger packed batch, or padded (given the same upstream gradient,
    or the same global normaliser for the loss)."""
    dev = path_device
    g = torch.Generator().manual_seed(7)
    V, lengths, k = 301, [5, 9, 3, 7], 1  # sequence k, inside the batch
    logits = (torch.randn(sum(lengths), V, generator=g) * 2).to(dtype).to(dev)
    targets = torch.randint(0, V, (sum(lengths),), generator=g).to(dev)
    upstream = torch.randn(sum(lengths), generator=g).to(dev)
    old = torch.randn(sum(lengths), generator=g).to(dev) * 0.1 - 5
    adv = torch.randn(len(lengths), generator=g).to(dev)
    cu = cu_seqlens_from(torch.tensor(lengths)).to(dev)
    lo, hi = int(cu[k]), int(cu[k + 1])

    def token_run(x, t):
        x = x.clone().requires_grad_(True)
        lp, H = tk.token_logprobs(x, t, return_entropy=True, temperature=0.9)
        up = upstream[lo:hi] if x.shape[-2] == hi - lo else upstream
        (lp * up.view(lp.shape) + H * up.view(lp.shape)).sum().backward()
        return lp, H, x.grad

    alone = token_run(logits[lo:hi], targets[lo:hi])
    batch = token_run(logits, targets)
    for a, b in zip(alone, batch):
        assert torch.equal(a, b[lo:hi])
    # padded: the batch as (B, T, V) with the sequence in row k, right padding
    T = max(lengths)
    mask = mask_from(torch.tensor(lengths), T).to(dev)
    padded_logits = torch.zeros(len(lengths), T, V, dtype=dtype, device=dev)
    padded_logits[mask] = logits
    padded_t = torch.full((len(lengths), T), -100, device=dev)
    padded_t[mask] = targets
    x = padded_logits.clone().requires_grad_(True)
    lp, H = tk.token_logprobs(x, padded_t, return_entropy=True, temperature=0.9)
    up = torch.zeros(len(lengths), T, device=dev)
    up[mask] = upstream
    (lp * up + H * up).sum().backward()
    assert torch.equal(lp[k, : hi - lo], alone[0]) and torch.equal(H[k, : hi - lo], alone[1])
    assert torch.equal(x.grad[k, : hi - lo], alone[2])
    # sequence sums, and the loss with the global normaliser fixed
    one = torch.tensor([0, hi - lo], device=dev, dtype=cu.dtype)
    assert torch.equal(tk.sequence_logprobs(alone[0], cu_seqlens=one),
                       tk.sequence_logprobs(batch[0], cu_seqlens=cu)[k:k + 1])
    for ratio in ("trajectory", "token"):
        kw = dict(ratio=ratio, entropy_coef=0.01)
        kw["num_tokens" if ratio == "token" else "num_sequences"] = 10
        xa = logits[lo:hi].clone().requires_grad_(True)
        tk.tic_loss(xa, targets[lo:hi], old[lo:hi], adv[k:k + 1], cu_seqlens=one, **kw).loss.backward()
        xb = logits.clone().requires_grad_(True)
        tk.tic_loss(xb, targets, old, adv, cu_seqlens=cu, **kw).loss.backward()
        assert torch.equal(xa.grad, xb.grad[lo:hi]), ratio
        xp = padded_logits.clone().requires_grad_(True)
        pt = torch.where(mask, padded_t, 0)
        pold = torch.zeros(len(lengths), T, device=dev)
        pold[mask] = old
        tk.tic_loss(xp, pt, pold, adv, mask=mask, **kw).loss.backward()
        assert torch.equal(xa.grad, xp.grad[k, : hi - lo]), ratio
