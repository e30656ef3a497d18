"""Fused tic_loss and tic_loss_from_logprobs against the reference, every option."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.backend import segments
from tic_kernels.config import LossConfig
from tic_kernels.ops.ratio_loss import ratio_loss
from tic_kernels.options import ROLLOUT_IS
from tic_kernels.testing import (COMPILE_TOL, GRAD_TOL, LONG_SUM_TOL, LOSS_TOL, loss_batch,
                                 rollout_keywords, tolerance)

pytestmark = pytest.mark.usefixtures("requires_triton")

LENGTHS = [3, 0, 6, 1, 5]
RATIOS = ["trajectory", "sequence_mean", "token", "none"]
AGGS = [None, "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _run(fn, batch, **kw):
    x = batch.logits.clone().requires_grad_(True)
    out = fn(x, batch.targets, batch.old_logprobs, batch.advantages, **batch.layout_kw, **kw)
    out.loss.backward()
    return out, x.grad


def _compare(batch, dtype=torch.float32, sum_tol=LOSS_TOL, **kw):
    """``sum_tol``: of the loss and the statistics, sums over the batch's tokens."""
    out, grad = _run(tk.tic_loss, batch, **kw)
    want, want_grad = _run(ref.tic_loss, batch, **kw)
    atol, rtol = sum_tol
    assert out.loss.dtype == torch.float32 and grad.dtype == batch.logits.dtype
    torch.testing.assert_close(out.loss, want.loss, atol=atol, rtol=rtol)
    assert set(out.stats) == set(want.stats)
    for k in want.stats:
        torch.testing.assert_close(out.stats[k], want.stats[k], atol=atol, rtol=rtol, msg=k)
    if "mask" in batch.layout_kw:  # padded rows: never read (they hold NaN), zero gradient
        assert (grad[~batch.layout_kw["mask"]] == 0).all()
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, dtype))
    return out


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("clip_mode", ["two_sided", "upper"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("padded", [False, True])
def test_every_option(ratio, clip_mode, dual_clip, aggregation, padded, device):
    batch = loss_batch(LENGTHS + [2, 7, 4], 97, padded=padded, device=device, drift=0.5, seed=3)
    kw = dict(ratio=ratio, clip_mode=clip_mode, dual_clip=dual_clip, aggregation=aggregation)
    if aggregation == "seq-mean-token-sum-norm" and not padded:
        kw["max_len"] = 8
    out = _compare(batch, **kw)
    if ratio != "none":
        assert 0 < out.stats["clip_fraction"] < 1  # the batch exercises both branches


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [5, 3001])
def test_dtypes_kl_entropy_temperature(ratio, dtype, V, device):
    batch = loss_batch(LENGTHS, V, dtype=dtype, device=device, seed=4, target_dtype=torch.int32)
    _compare(batch, dtype, ratio=ratio, ref_logprobs=batch.ref_logprobs, beta=0.04,
             entropy_coef=0.02, temperature=0.8)


@pytest.mark.parametrize("kw", [dict(ratio="token", num_tokens=50),
                                dict(ratio="trajectory", num_sequences=11),
                                dict(ratio="sequence_mean", aggregation="seq-mean-token-sum",
                                     num_sequences=7),
                                dict(ratio="trajectory", eps_low=0.05, eps_high=0.6,
                                     max_log_ratio=0.3)])
def test_normalisers_eps_cap(kw, device):
    _compare(loss_batch(LENGTHS, 33, device=device, drift=0.3, seed=5), **kw)


def test_edge_shapes(device):
    _compare(loss_batch([1], 17, device=device))                  # one token
    _compare(loss_batch([0, 0, 4, 0], 17, device=device))         # empty sequences
    # long: Delta sums 2300 differences of log-probs that differ from the reference's by an
    # fp32 rounding or two (more on a GPU, whose exp and log round differently)
    long = loss_batch([2300, 2], 9, device=device, drift=0.002)
    _compare(long, sum_tol=LONG_SUM_TOL, ratio="trajectory")
    _compare(long, sum_tol=LONG_SUM_TOL, ratio="token")
    out = _compare(loss_batch([0, 0], 17, device=device))         # no tokens at all
    assert out.loss == 0


def test_all_masked(device):
    batch = loss_batch([3, 2], 11, padded=True, device=device)
    batch.layout_kw["mask"][:] = False
    out, grad = _run(tk.tic_loss, batch, entropy_coef=0.1)
    assert out.loss == 0 and (grad == 0).all()
    assert all(torch.isfinite(v) for v in out.stats.values())


@pytest.mark.parametrize("ratio", RATIOS)
def test_huge_log_ratio_finite(ratio, device):
    batch = loss_batch([4, 3], 13, device=device)
    for sign in (1.0, -1.0):
        batch.old_logprobs = batch.old_logprobs - sign * 2500.0  # |Delta| = 1e4 on sequence 0
        for A in ((1.0, -1.0), (-1.0, 1.0)):
            batch.advantages = torch.tensor(A, device=device)
            out, grad = _run(tk.tic_loss, batch, ratio=ratio, ref_logprobs=batch.old_logprobs,
                             beta=0.1)
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
            assert all(torch.isfinite(v) for v in out.stats.values())
            _compare(batch, ratio=ratio, ref_logprobs=batch.old_logprobs, beta=0.1)


def test_inplace_backward(device):
    batch = loss_batch(LENGTHS, 50, device=device, dtype=torch.bfloat16)
    _, want = _run(tk.tic_loss, batch, entropy_coef=0.05)
    leaf = batch.logits.clone().requires_grad_(True)
    logits = leaf * 1  # the logits an LM head produced: not a leaf, their storage the loss's
    h = logits.detach()
    out = tk.tic_loss(logits, batch.targets, batch.old_logprobs, batch.advantages,
                      entropy_coef=0.05, inplace_backward=True, **batch.layout_kw)
    out.loss.backward()
    torch.testing.assert_close(leaf.grad, want, atol=0, rtol=0)
    # the gradient was written over the logits' storage
    assert torch.equal(h, want)


def test_bitwise_deterministic(device):
    batch = loss_batch([40, 7, 0, 90], 300, device=device, dtype=torch.bfloat16, padded=True)
    runs = [_run(tk.tic_loss, batch, ref_logprobs=batch.ref_logprobs, beta=0.1, entropy_coef=0.01)
            for _ in range(2)]
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1.loss, o2.loss) and torch.equal(g1, g2)
    assert all(torch.equal(o1.stats[k], o2.stats[k]) for k in o1.stats)


def _from_logprobs_against_reference(batch, **kw):
    logp = ref.token_logprobs(batch.logits.nan_to_num(), batch.targets.clamp(min=0))
    x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    a = tk.tic_loss_from_logprobs(x, batch.old_logprobs, batch.advantages, **kw)
    b = ref.tic_loss_from_logprobs(y, batch.old_logprobs, batch.advantages, **kw)
    a.loss.backward()
    b.loss.backward()
    atol, rtol = LOSS_TOL
    torch.testing.assert_close(a.loss, b.loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, y.grad, atol=atol, rtol=rtol)
    assert set(a.stats) == set(b.stats)
    for k in b.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], atol=atol, rtol=rtol, msg=k)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("padded", [False, True])
def test_from_logprobs_matches_reference(ratio, padded, device):
    batch = loss_batch(LENGTHS, 40, padded=padded, device=device, drift=0.2, seed=6)
    _from_logprobs_against_reference(batch, ratio=ratio, dual_clip=3.0,
                                     ref_logprobs=batch.ref_logprobs, beta=0.02,
                                     **batch.layout_kw)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("mode", ROLLOUT_IS + ("weights",))
@pytest.mark.parametrize("padded", [False, True])
def test_rollout_correction(ratio, mode, padded, device):
    """Op 4b in the loss kernel: loss, statistics and logits gradient as the reference, with
    the KL and the entropy bonus on (the weight must leave them alone)."""
    batch = loss_batch(LENGTHS + [2, 7], 37, padded=padded, device=device, drift=0.3, seed=11)
    kw = rollout_keywords(batch.old_logprobs, batch.layout_kw, mode, seed=12)
    out = _compare(batch, ratio=ratio, ref_logprobs=batch.ref_logprobs, beta=0.05,
                   entropy_coef=0.01, **kw)
    assert 0 < out.stats["rollout_ess"] < 1
    assert ("rollout_kl" in out.stats) == (mode != "weights")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate"])
def test_rollout_correction_dtypes(dtype, mode, device):
    batch = loss_batch(LENGTHS, 300, dtype=dtype, device=device, drift=0.3, seed=13)
    kw = rollout_keywords(batch.old_logprobs.to(dtype), batch.layout_kw, mode, seed=14)
    _compare(batch, dtype, ratio="trajectory", **kw)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask", "weights"])
@pytest.mark.parametrize("padded", [False, True])
def test_rollout_from_logprobs_matches_reference(mode, padded, device):
    batch = loss_batch(LENGTHS, 40, padded=padded, device=device, drift=0.3, seed=15)
    _from_logprobs_against_reference(
        batch, ratio="token", **batch.layout_kw,
        **rollout_keywords(batch.old_logprobs, batch.layout_kw, mode, seed=16))


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("mode", ["weights", "token_truncate"])
def test_rollout_ess_is_scale_free(path, mode, device):
    """rollout_ess of weights c w equals that of w for c = 1e20 or 1e-20 (their squares
    overflow or vanish in fp32) and the float64 formula; the statistics come detached."""
    fn = tk.tic_loss_from_logprobs if path == "kernels" else ref.tic_loss_from_logprobs
    g = torch.Generator().manual_seed(21)
    lengths = [3, 0, 600, 2]  # one sequence over a block of the kernel: its max grows
    N = sum(lengths)
    logp = (-torch.rand(N, generator=g) * 3).to(device).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(N, generator=g).to(device)
    adv = torch.randn(len(lengths), generator=g).to(device)
    cu = torch.tensor([0, 3, 3, 603, 605], dtype=torch.int32, device=device)
    # weights in [0.025, 4.2]: their logs stay inside max_log_ratio = 60 once scaled by c
    w = (0.05 + torch.rand(N, generator=g)).to(device) * torch.linspace(0.5, 4.0, N).to(device)
    want = (w.double().sum() ** 2 / (N * (w.double() ** 2).sum())).float()
    for c in (1.0, 1e20, 1e-20):
        if mode == "weights":
            kw = dict(rollout_weights=w * c)
        else:  # weights exp(u) of log-ratio u = log(c w), no bounds
            kw = dict(rollout_logprobs=old - torch.log(w * c), rollout_is=mode,
                      rollout_is_max=float("inf"), max_log_ratio=60.0)
        out = fn(logp, old, adv, cu_seqlens=cu, **kw)
        assert all(not v.requires_grad for v in out.stats.values())
        torch.testing.assert_close(out.stats["rollout_ess"], want, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.stats["rollout_is_max"], (w * c).max(), rtol=1e-5,
                                   atol=0)


def test_ticloss_module(device):
    batch = loss_batch(LENGTHS, 21, device=device)
    fn = tk.TICLoss(ratio="token", eps_high=0.3)
    assert "ratio='token'" in repr(fn)
    a = fn(batch.logits, batch.targets, batch.old_logprobs, batch.advantages, **batch.layout_kw)
    b = tk.tic_loss(batch.logits, batch.targets, batch.old_logprobs, batch.advantages,
                    ratio="token", eps_high=0.3, **batch.layout_kw)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(backend, inplace, device, path):
    """torch.compile(fullgraph=True) traces the loss with no graph break and computes the
    same loss and gradients as eager, in-place backward included, on both paths (code
    developed on a laptop's reference path is compiled unchanged on a GPU)."""
    if path == "reference" and inplace:
        pytest.skip("the reference path allocates the gradient whatever inplace_backward says: "
                    "the same computation as inplace=False")
    batch = loss_batch(LENGTHS, 29, device=device, padded=True)
    B, T, V = batch.logits.shape
    w = torch.randn(8, V, device=device, requires_grad=True)
    h = torch.randn(B, T, 8, device=device, requires_grad=True)

    def step(hidden, head):
        return tk.tic_loss(hidden @ head, batch.targets, batch.old_logprobs, batch.advantages,
                           ref_logprobs=batch.ref_logprobs, beta=0.1, entropy_coef=0.01,
                           inplace_backward=inplace, **batch.layout_kw).loss
    torch._dynamo.reset()
    grads = []
    for fn in (torch.compile(step, fullgraph=True, backend=backend), step):
        h.grad = w.grad = None
        loss = fn(h, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tolerance(COMPILE_TOL))


def test_rollout_compile_fullgraph(device, path):
    """The sampler correction's tensors and statistics trace with no graph break."""
    batch = loss_batch(LENGTHS, 29, device=device, padded=True, drift=0.3)
    kw = rollout_keywords(batch.old_logprobs, batch.layout_kw, "sequence_mask", seed=17)
    B, T, V = batch.logits.shape
    w = torch.randn(8, V, device=device, requires_grad=True)
    h = torch.randn(B, T, 8, device=device, requires_grad=True)

    def step(hidden, head):
        out = tk.tic_loss(hidden @ head, batch.targets, batch.old_logprobs, batch.advantages,
                          **batch.layout_kw, **kw)
        return out.loss, out.stats["rollout_ess"]
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        h.grad = w.grad = None
        loss, ess = fn(h, w)
        loss.backward()
        results.append((loss.detach(), ess, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tolerance(COMPILE_TOL))


def test_ratio_loss_opcheck(device):
    batch = loss_batch(LENGTHS, 13, device=device)
    cu, _ = segments(batch.layout_kw["cu_seqlens"], None, device)
    logp = torch.randn(sum(LENGTHS), device=device, requires_grad=True)
    ent = torch.rand(sum(LENGTHS), device=device, requires_grad=True)
    args = (logp, batch.old_logprobs, batch.advantages, cu, None, batch.ref_logprobs, ent)
    config = LossConfig(ratio="trajectory", dual_clip=2.0, beta=0.1, entropy_coef=0.01,
                        ref=True)
    torch.library.opcheck(ratio_loss, args + (None, config.encode()))
    sampler = batch.old_logprobs + 0.1 * torch.randn_like(batch.old_logprobs)
    config = config.replace(rollout="sequence_mask", rollout_is_min=0.5, rollout_is_max=2.0)
    torch.library.opcheck(ratio_loss, args + (sampler, config.encode()))


class _AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every new storage that an op's outputs live in (views
    and ``base`` itself are not allocations)."""

    def __init__(self, base):
        super().__init__()
        self.seen = {base.untyped_storage().data_ptr()}
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("inplace", [False, True])
def test_no_logits_sized_intermediate(inplace, device):
    """Forward + backward allocate no (N, V) tensor besides the gradient, and none at all with
    inplace_backward (the gradient is written over the logits). As in training, the logits
    come out of an LM head: a leaf's .grad would be a copy autograd makes, not the loss's."""
    batch = loss_batch([30, 0, 21, 13], 257, device=device, padded=True)
    B, T, V = batch.logits.shape
    hidden = torch.randn(B, T, 16, device=device, requires_grad=True)
    head = torch.randn(16, V, device=device, requires_grad=True)
    logits = hidden @ head
    NV = logits.numel()
    with _AllocationRecorder(logits) as rec:
        out = tk.tic_loss(logits, batch.targets, batch.old_logprobs, batch.advantages,
                          ref_logprobs=batch.ref_logprobs, beta=0.1, entropy_coef=0.01,
                          inplace_backward=inplace, **batch.layout_kw)
        out.loss.backward()
    big = [n for n in rec.sizes if n >= NV // 2]
    assert big == ([] if inplace else [NV]), big
    assert max(n for n in rec.sizes if n < NV // 2) <= 16 * V  # O(N) and the head's gradient
    assert head.grad is not None and torch.isfinite(head.grad).all()


# aten ops that read device values on the host or copy host values to the device: either
# breaks a CUDA graph capture and stalls the GPU
SYNCING_OPS = ("_local_scalar_dense", "lift_fresh", "nonzero", "masked_select", "_unique",
               "repeat_interleave", "copy between devices")


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.add(str(func))
        dest = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and dest is not None and \
                torch.device(dest) != args[0].device:
            self.names.add("copy between devices")
        return func(*args, **kwargs)


@pytest.mark.parametrize("padded", [False, True])
def test_no_host_sync_with_value_checks_off(padded, monkeypatch, device):
    """With TIC_KERNELS_CHECK_VALUES=0 the loss, forward and backward, reads nothing back to
    the host and copies nothing to the device: outside the ops and inside their bodies (the
    GPU check captures it in a CUDA graph)."""
    from tic_kernels.ops.token_logprobs import token_logprobs_fwd
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b = loss_batch([3, 0, 5, 2], 23, padded=padded, device=device)
    src = b.logits.clone().requires_grad_(True)
    sampler = rollout_keywords(b.old_logprobs, b.layout_kw, "sequence_mask", seed=5)
    kw = dict(ref_logprobs=b.ref_logprobs, beta=0.1, entropy_coef=0.1, num_sequences=4,
              **b.layout_kw, **sampler)
    with _OpRecorder() as outside:
        out = tk.tic_loss(src * 1, b.targets, b.old_logprobs, b.advantages, **kw)
        out.loss.backward()
    targets = torch.where(b.layout_kw["mask"], b.targets, -100) if padded else b.targets
    cu, flat_mask = segments(b.layout_kw.get("cu_seqlens"), b.layout_kw.get("mask"), device)
    with _OpRecorder() as inside:  # the ops' own bodies (the dispatcher hides them above)
        lp, _, H = token_logprobs_fwd._init_fn(b.logits, targets, 1.0, -100, True)
        config = LossConfig(ratio="token", aggregation="token-mean", beta=0.1,
                            entropy_coef=0.1, num_tokens=50.0, ref=True,
                            rollout="sequence_mask", rollout_is_min=0.8, rollout_is_max=1.25)
        ratio_loss._init_fn(lp, b.old_logprobs.reshape(-1), b.advantages, cu, flat_mask,
                            b.ref_logprobs.reshape(-1), H,
                            sampler["rollout_logprobs"].reshape(-1), config.encode())
    # eager calls run the launchers: no torch.library op (the ops are for torch.compile)
    assert not [n for n in outside.names if n.startswith("tic_kernels.")], outside.names
    for names in (outside.names, inside.names):
        assert not [n for n in names if any(s in n for s in SYNCING_OPS)], names


@pytest.mark.parametrize("padded", [False, True])
def test_compile_fullgraph_logprob_entry_points(padded, device, path):
    """token_logprobs (entropy, ignored rows) and tic_loss_from_logprobs (every sampler
    correction level) trace with fullgraph=True on both paths and equal eager."""
    batch = loss_batch(LENGTHS, 29, device=device, padded=padded, drift=0.3)
    lay = batch.layout_kw
    targets = batch.targets.masked_fill(~lay["mask"], -100) if padded else batch.targets
    logp0 = torch.randn(batch.targets.shape, device=device) - 2.0
    corrections = [rollout_keywords(batch.old_logprobs, lay, mode, seed=5)
                   for mode in ("sequence_mask", "token_truncate", "weights")]

    def step(logits):
        logp, entropy = tk.token_logprobs(logits, targets, temperature=0.9, return_entropy=True)
        x = logp0 + logits.nan_to_num().mean()
        losses = [tk.tic_loss_from_logprobs(x, batch.old_logprobs, batch.advantages, **lay,
                                            **kw) for kw in corrections]
        return (logp.sum() + entropy.sum() + sum(o.loss for o in losses),
                torch.stack([o.stats["rollout_is_min"] for o in losses]))
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        logits = batch.logits.clone().requires_grad_(True)
        out, stats = fn(logits)
        out.backward()
        results.append((out.detach(), stats, logits.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tolerance(COMPILE_TOL), equal_nan=True)


def test_statistics_are_made_when_read(device):
    """The statistics come as a mapping whose views are made when first read (one unbind of
    the kernel's statistics tensor), not by the call: a step that reads none pays no host
    time for them. Read, written, copied, merged and rebuilt from its items (as accelerate's
    gather rebuilds the mappings it walks), it behaves as the dict of the reference."""
    from tic_kernels.output import Stats
    b = loss_batch(LENGTHS, 13, device=device)
    kw = dict(ref_logprobs=b.ref_logprobs, beta=0.1, entropy_coef=0.01, **b.layout_kw)
    with _OpRecorder() as made:
        out = tk.tic_loss(b.logits, b.targets, b.old_logprobs, b.advantages, **kw)
    assert isinstance(out.stats, Stats) and "aten.unbind.int" not in made.names
    want = ref.tic_loss(b.logits, b.targets, b.old_logprobs, b.advantages, **kw).stats
    assert list(out.stats) == sorted(want) == list(want) and len(out.stats) == len(want)
    with _OpRecorder() as read:
        first = out.stats["clip_fraction"]
    assert "aten.unbind.int" in read.names
    with _OpRecorder() as again:
        assert out.stats["clip_fraction"] is first and "kl_mean" in out.stats
    assert not again.names  # made once
    for k, v in out.stats.items():
        torch.testing.assert_close(v, want[k], **tolerance(LOSS_TOL))
    assert "nothing" not in out.stats and out.stats.get("nothing") is None
    with pytest.raises(KeyError):
        out.stats["nothing"]
    rebuilt = type(out.stats)({k: 2 * v for k, v in out.stats.items()})
    assert list(rebuilt) == list(want)
    assert torch.equal(rebuilt["kl_mean"], 2 * out.stats["kl_mean"])
    copied, merged = out.stats.copy(), out.stats | {"loss": out.loss}
    assert type(copied) is dict and list(merged)[-1] == "loss" and len(merged) == len(want) + 1
    out.stats["loss"] = out.loss.detach()
    del out.stats["clip_fraction"]
    assert "loss" in out.stats and "clip_fraction" not in out.stats and "loss" not in copied
    assert set(dict(out.stats)) == set(want) - {"clip_fraction"} | {"loss"}


def test_statistics_pickle_and_flatten_as_a_dict(device):
    """Copied, pickled, saved (torch.load with weights_only) and flattened by torch's pytree,
    the statistics give the dict they read as; popitem and reversed take the last key, as a
    dict's; from the log-probabilities (whose op's statistics have a graph) they hold no
    graph: kept for logging, they keep nothing of the step alive."""
    import copy
    import io
    import pickle
    import weakref
    b = loss_batch(LENGTHS, 13, device=device)
    stats = tk.tic_loss(b.logits, b.targets, b.old_logprobs, b.advantages, **b.layout_kw).stats
    want = dict(stats)
    saved = io.BytesIO()
    torch.save(stats, saved)
    saved.seek(0)
    for other in (copy.deepcopy(stats), pickle.loads(pickle.dumps(stats)),
                  torch.load(saved, weights_only=True)):
        assert list(other) == list(want) and all(torch.equal(other[k], want[k]) for k in want)
    leaves, spec = torch.utils._pytree.tree_flatten(stats)
    assert len(leaves) == len(want) and all(torch.equal(a, want[k]) for a, k in zip(leaves, want))
    assert list(torch.utils._pytree.tree_unflatten(leaves, spec)) == list(want)
    assert list(reversed(stats)) == list(reversed(want))
    assert stats.popitem()[0] == list(want)[-1] and len(stats) == len(want) - 1
    logp = b.logits.log_softmax(-1).gather(-1, b.targets[:, None])[:, 0].requires_grad_(True)
    saved = (-logp).exp()  # the log's node saves it: alive while the graph is
    alive = weakref.ref(saved)
    kept = tk.tic_loss_from_logprobs(-saved.log(), b.old_logprobs, b.advantages,
                                     **b.layout_kw).stats
    del saved
    assert alive() is None and copy.deepcopy(kept).keys() == kept.keys()


def test_entropy_output_is_saved_as_an_output(device):
    """token_logprobs' entropy, an output its backward reads: deleting the outputs frees the
    logits at once (no reference cycle through the node), and modifying it in place before
    the backward is autograd's error, not a silently wrong gradient."""
    import weakref
    b = loss_batch(LENGTHS, 13, device=device)
    logits = b.logits.clone().requires_grad_(True) * 1
    alive = weakref.ref(logits)
    logp, H = tk.token_logprobs(logits, b.targets, return_entropy=True)
    del logits, logp, H
    assert alive() is None
    logp, H = tk.token_logprobs(b.logits.clone().requires_grad_(True), b.targets,
                                return_entropy=True)
    loss = logp.sum() + H.sum()
    H.mul_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
