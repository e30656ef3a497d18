"""The fused LM head (op 6) against float64 logits: linear_token_logprobs and linear_tic_loss,
values and every gradient, every layout and option, chunkings that split sequences and that do
not, the memory bound, torch.compile and opcheck."""
import pytest
import torch
import torch.nn.functional as F
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation
from torch.utils._python_dispatch import TorchDispatchMode

import tic_kernels as tk
from tic_kernels.ops import lm_head as linear
from tic_kernels.ops import lm_head_loss
from tic_kernels import reference as ref
from tic_kernels.config import LossConfig
from tic_kernels.testing import (HEAD_GRAD_TOL, LOSS_TOL, VALUE_TOL, assert_close_to_scale,
                                 head_batch, rollout_keywords, tolerance)

LENGTHS = [3, 0, 6, 1, 5, 4]


def _leaves(batch, bias=True):
    leaves = [batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()]
    return leaves + ([batch.bias.clone().requires_grad_()] if bias else [])


def _logits64(batch, bias=True):
    """float64 logits with the value of the op's logits (the weight's dtype) and the float64
    gradient: rows outside the mask are zeroed (their values must not matter)."""
    mask = batch.layout_kw.get("mask")
    h = batch.hidden if mask is None else torch.where(mask[..., None], batch.hidden, 0)
    b = batch.bias if bias else None
    leaves = [t.detach().double().requires_grad_() for t in (h, batch.weight, b) if t is not None]
    exact = F.linear(*leaves)
    rounded = F.linear(h, batch.weight, b).double()
    return exact + (rounded - exact).detach(), leaves


def _loss_pair(batch, bias=True, **kw):
    """(fused output, fused grads, expected output, expected grads)."""
    leaves = _leaves(batch, bias)
    out = tk.linear_tic_loss(leaves[0], leaves[1], batch.targets, batch.old_logprobs,
                             batch.advantages, bias=leaves[2] if bias else None,
                             **batch.layout_kw, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    kw.pop("chunk_size", None)
    kw.pop("fp32_accumulation", None)
    logits, ref_leaves = _logits64(batch, bias)
    want = ref.tic_loss(logits, batch.targets, batch.old_logprobs.double(),
                        batch.advantages.double(), **batch.layout_kw,
                        **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    want_grads = torch.autograd.grad(want.loss, ref_leaves)
    return out, grads, want, want_grads


def _check(batch, dtype=torch.float32, bias=True, **kw):
    out, grads, want, want_grads = _loss_pair(batch, bias, **kw)
    atol, rtol = LOSS_TOL
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), want.loss, atol=atol, rtol=rtol)
    assert set(out.stats) == set(want.stats)
    for k in want.stats:
        torch.testing.assert_close(out.stats[k].double(), want.stats[k], atol=atol, rtol=rtol,
                                   msg=k)
    for name, g, w, leaf in zip(("hidden", "weight", "bias"), grads, want_grads,
                                (batch.hidden, batch.weight, batch.bias)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert_close_to_scale(g, w, HEAD_GRAD_TOL[dtype], name)
    if "mask" in batch.layout_kw:  # poisoned padding rows: zero gradient, no NaN anywhere
        assert (grads[0][~batch.layout_kw["mask"]] == 0).all()
        assert all(torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token", "none"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 64])  # splits sequences (two passes) / whole batch
def test_loss_every_ratio(ratio, padded, chunk_size, device):
    batch = head_batch(LENGTHS, 97, padded=padded, device=device, seed=1)
    out = _check(batch, ratio=ratio, chunk_size=chunk_size, temperature=0.8,
                 ref_logprobs=batch.ref_logprobs, beta=0.05, entropy_coef=0.01)
    if ratio != "none":
        assert 0 < out.stats["clip_fraction"] < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", ["trajectory", "token"])
def test_loss_half_precision(dtype, ratio, device):
    batch = head_batch(LENGTHS, 131, dtype=dtype, device=device, seed=2)
    _check(batch, dtype, ratio=ratio, chunk_size=5, entropy_coef=0.02)


@pytest.mark.parametrize("ratio, mode", [("trajectory", "sequence_mask"),
                                         ("trajectory", "token_truncate"),
                                         ("token", "weights"), ("sequence_mean", "token_mask"),
                                         ("token", "token_mask"), ("none", "token_truncate"),
                                         ("token", "sequence_truncate")])
@pytest.mark.parametrize("padded", [False, True])
def test_loss_rollout_correction(ratio, mode, padded, device):
    """Op 4b through the fused LM head (chunks of 4 rows split sequences; the token-level
    ratios with per-token weights chunk by rows, across sequences)."""
    batch = head_batch(LENGTHS, 41, padded=padded, device=device, seed=14)
    kw = rollout_keywords(batch.old_logprobs, batch.layout_kw, mode, seed=15)
    out = _check(batch, ratio=ratio, chunk_size=4, ref_logprobs=batch.ref_logprobs, beta=0.05,
                 **kw)
    assert 0 < out.stats["rollout_ess"] < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_rollout_half_precision(dtype, device):
    """float16 forms the gradient in the backward (another path through op 4)."""
    batch = head_batch(LENGTHS, 53, dtype=dtype, device=device, seed=16)
    kw = rollout_keywords(batch.old_logprobs, batch.layout_kw, "sequence_truncate", seed=17)
    _check(batch, dtype, ratio="trajectory", chunk_size=5, **kw)


@pytest.mark.parametrize("kw", [
    dict(aggregation="token-mean", num_tokens=40),
    dict(aggregation="seq-mean-token-sum", num_sequences=9, dual_clip=2.0),
    dict(aggregation="seq-mean-token-sum-norm", max_len=8, clip_mode="upper"),
])
@pytest.mark.parametrize("ratio", ["trajectory", "token"])
def test_loss_aggregations(kw, ratio, device):
    batch = head_batch(LENGTHS, 33, device=device, seed=3)
    _check(batch, bias=False, chunk_size=7, ratio=ratio, **kw)


def test_loss_float64_runs_the_reference_with_every_term(device):
    """float64 takes the reference path (no kernel): the KL and the sampler correction must
    reach it as they reach the kernels (the KL was once dropped there)."""
    batch = head_batch(LENGTHS, 29, dtype=torch.float64, device=device, seed=18)
    kw = dict(ref_logprobs=batch.ref_logprobs, beta=0.2, entropy_coef=0.01,
              **rollout_keywords(batch.old_logprobs, batch.layout_kw, "token_mask", seed=19))
    h = batch.hidden.clone().requires_grad_()
    out = tk.linear_tic_loss(h, batch.weight, batch.targets, batch.old_logprobs,
                             batch.advantages, bias=batch.bias, **batch.layout_kw, **kw)
    x = h.detach().clone().requires_grad_()
    want = ref.tic_loss(F.linear(x, batch.weight, batch.bias), batch.targets,
                        batch.old_logprobs, batch.advantages, **batch.layout_kw, **kw)
    assert "kl_mean" in out.stats and "rollout_kl" in out.stats
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.loss, h)[0],
                               torch.autograd.grad(want.loss, x)[0], rtol=1e-10, atol=1e-12)


def test_loss_edge_shapes(device):
    # one token; a vocabulary of one block minus one; every sequence empty but one
    _check(head_batch([1], 127, device=device, seed=4), chunk_size=1)
    _check(head_batch([0, 0, 2, 0], 5, device=device, seed=5), chunk_size=1)
    # no tokens at all: zero gradients of the right shapes
    _check(head_batch([0, 0], 7, device=device, seed=15), chunk_size=2)
    # a long sequence split into many chunks next to short ones
    _check(head_batch([2, 23, 1], 40, device=device, seed=6), chunk_size=3, ratio="trajectory")


def test_loss_without_grad_and_frozen_head(device):
    batch = head_batch(LENGTHS, 50, device=device, seed=7)
    with torch.no_grad():
        cold = tk.linear_tic_loss(batch.hidden, batch.weight, batch.targets, batch.old_logprobs,
                                  batch.advantages, **batch.layout_kw, chunk_size=4)
    h = batch.hidden.clone().requires_grad_()
    warm = tk.linear_tic_loss(h, batch.weight, batch.targets, batch.old_logprobs,
                              batch.advantages, **batch.layout_kw, chunk_size=4)
    torch.testing.assert_close(cold.loss, warm.loss, atol=0, rtol=0)
    assert not any(v.requires_grad for v in warm.stats.values())  # as tic_loss's
    warm.loss.backward()  # a frozen head (no weight gradient): d hidden only
    logits, (hd, wd) = _logits64(batch, bias=False)
    want = ref.tic_loss(logits, batch.targets, batch.old_logprobs.double(),
                        batch.advantages.double(), **batch.layout_kw)
    want.loss.backward()
    assert_close_to_scale(h.grad, hd.grad, HEAD_GRAD_TOL[torch.float32], "hidden")


def test_tied_embedding(device):
    """A tied LM head: the embedding's weight is also the head; the two gradients add up."""
    torch.manual_seed(0)
    V, H = 29, 8
    lengths = torch.tensor([4, 2, 5])
    ids = torch.randint(0, V, (int(lengths.sum()),), device=device)
    targets = torch.randint(0, V, ids.shape, device=device)
    old = torch.randn(ids.shape, device=device) * 0.1 - 3.4
    adv = torch.randn(3, device=device)
    cu = ref.cu_seqlens_from(lengths).to(device)
    emb = torch.randn(V, H, device=device, requires_grad=True)
    tk.linear_tic_loss(torch.tanh(emb[ids]), emb, targets, old, adv, cu_seqlens=cu,
                       chunk_size=3).loss.backward()
    e64 = emb.detach().double().requires_grad_()
    ref.tic_loss(F.linear(torch.tanh(e64[ids]), e64), targets, old.double(), adv.double(),
                 cu_seqlens=cu).loss.backward()
    assert_close_to_scale(emb.grad, e64.grad, HEAD_GRAD_TOL[torch.float32], "tied weight")


@pytest.mark.parametrize("fp32_accumulation", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_accumulation(dtype, fp32_accumulation, device):
    """d weight accumulated over many chunks in the weight's dtype (the default: a rounding
    per chunk) or in fp32, within the dtype's tolerance either way."""
    batch = head_batch(LENGTHS, 64, dtype=dtype, device=device, seed=8)
    _check(batch, dtype, chunk_size=2, fp32_accumulation=fp32_accumulation)


def test_fp32_accumulation_is_the_more_accurate(device, requires_triton):
    """In bf16 over ten chunks, d weight accumulated in fp32 (one rounding) is closer to the
    float64 gradient than the one accumulated in bf16 (a rounding per chunk); d hidden, formed
    a chunk's rows at a time, is the same computation either way."""
    batch = head_batch([7, 6, 7], 64, dtype=torch.bfloat16, device=device, seed=15)
    errors, dh = {}, {}
    for fp32 in (False, True):
        _, grads, _, want = _loss_pair(batch, chunk_size=2, ratio="token",
                                       fp32_accumulation=fp32)
        errors[fp32] = ((grads[1].double() - want[1]).norm() / want[1].norm()).item()
        dh[fp32] = grads[0]
    assert errors[True] < errors[False], errors
    torch.testing.assert_close(dh[True], dh[False], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_token_logprobs(dtype, entropy, chunk_size, device):
    batch = head_batch([9, 8], 101, dtype=dtype, device=device, seed=9)
    targets = batch.targets.clone()
    targets[[2, 11]] = -100
    h, w, b = _leaves(batch)
    out = tk.linear_token_logprobs(h, w, targets, bias=b, temperature=0.7,
                                   return_entropy=entropy, chunk_size=chunk_size)
    logits, leaves = _logits64(batch)
    want = ref.token_logprobs(logits, targets, 0.7, return_entropy=entropy)
    out, want = (out, want) if entropy else ((out,), (want,))
    g = [torch.randn(targets.shape, dtype=torch.float64, device=device) for _ in out]
    for o, w_ in zip(out, want):
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(o.double(), w_, **tolerance(VALUE_TOL[torch.float32]))
    grads = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(out, g)), [h, w, b])
    want_grads = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(want, g)), leaves)
    tol = 1e-10 if dtype == torch.float64 else HEAD_GRAD_TOL[dtype]
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close_to_scale(got, exp, tol, name)
    assert (grads[0][[2, 11]] == 0).all()  # ignored rows


class _LargestTensor(TorchDispatchMode):
    """The most bytes of any tensor an op returned while active (bytes: the Triton interpreter
    copies kernel arguments as raw uint8 storage). A custom op of the fused LM head
    (tic_kernels.ops.lm_head, .lm_head_loss) reaches a dispatch mode as one call: its Python
    body is run under the mode instead, so that every tensor it allocates is seen."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = None
        if func.namespace == "tic_kernels":
            body = getattr(linear, func._opname, getattr(lm_head_loss, func._opname, None))
        if body is not None and hasattr(body, "_init_fn"):
            with self:
                out = body._init_fn(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@triton_kernel_wrapper_mutation.py_impl(_LargestTensor)
def _launch_under_probe(mode, *args, **kwargs):
    """On a GPU a kernel launch under a dispatch mode is the higher-order op
    triton_kernel_wrapper_mutation, which needs a rule per mode. A launch allocates nothing:
    it runs as it would without the probe (the dispatcher has popped the mode here)."""
    return triton_kernel_wrapper_mutation(*args, **kwargs)


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("fn", ["loss", "logprobs"])
def test_logits_never_materialised(path, fn, device, monkeypatch):
    """No tensor of N * V / 4 fp32 elements is created in forward or backward, while one chunk
    of logits (8 rows) is (hidden (N, H) and the head (V, H) are smaller: H < 8 < N / 4)."""
    if path == "reference":
        monkeypatch.setattr(linear, "use_triton", lambda t: False)
        monkeypatch.setattr(lm_head_loss, "use_triton", lambda t: False)
    N, V, H = 64, 101, 6
    batch = head_batch([20, 0, 30, 14], V, H, device=device, seed=10)
    leaves = _leaves(batch)
    with _LargestTensor() as probe:
        if fn == "loss":
            out = tk.linear_tic_loss(leaves[0], leaves[1], batch.targets, batch.old_logprobs,
                                     batch.advantages, bias=leaves[2], chunk_size=8,
                                     entropy_coef=0.01, **batch.layout_kw).loss
        else:
            out = tk.linear_token_logprobs(leaves[0], leaves[1], batch.targets, bias=leaves[2],
                                           chunk_size=8, return_entropy=True)[1].sum()
        out.backward()
    assert all(t.grad is not None for t in leaves)
    assert 8 * V * 4 <= probe.largest < N * V // 4 * 4, probe.largest


@pytest.mark.parametrize("padded", [False, True])
def test_compile_fullgraph(padded, device, path):
    """torch.compile(fullgraph=True) of both losses of the fused head equals eager, on both
    paths."""
    batch = head_batch(LENGTHS, 40, device=device, seed=11, padded=padded)
    mask = batch.layout_kw.get("mask")
    targets = batch.targets if mask is None else batch.targets.masked_fill(~mask, -100)
    rollout = rollout_keywords(batch.old_logprobs, batch.layout_kw, "token_mask", seed=12)

    def step(h, w, b):
        out = tk.linear_tic_loss(h, w, batch.targets, batch.old_logprobs, batch.advantages,
                                 bias=b, chunk_size=5, **batch.layout_kw, **rollout)
        logp = tk.linear_token_logprobs(h.detach(), w.detach(), targets,
                                        bias=b.detach(), chunk_size=5)
        return out.loss, logp

    eager, compiled = _leaves(batch), _leaves(batch)
    loss, logp = step(*eager)
    loss.backward()
    torch._dynamo.reset()
    closs, clogp = torch.compile(step, fullgraph=True)(*compiled)
    closs.backward()
    torch.testing.assert_close(closs, loss)
    torch.testing.assert_close(clogp, logp)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.grad, a.grad)


def test_opcheck(device, requires_triton):
    batch = head_batch([3, 0, 5], 23, device=device, seed=12)
    h, w, b = _leaves(batch)
    t = batch.targets.clone()
    t[1] = -100
    torch.library.opcheck(linear.linear_logprobs, (h, w, b, t, 0.9, -100, True, 3, True, ""))
    N = t.numel()
    max_logsum = torch.randn(2 * N, device=device)
    torch.library.opcheck(linear.linear_logprobs_bwd,
                          (h.detach(), w.detach(), b.detach(), t, max_logsum,
                           torch.rand(N, device=device),
                           torch.randn(N, device=device), torch.randn(N, device=device), 1.0,
                           -100, 3, True, True, True, True, ""))
    cu = batch.layout_kw["cu_seqlens"]
    config = LossConfig(ratio="trajectory", entropy_coef=0.01, rollout="token_truncate",
                        rollout_is_max=2.0)
    torch.library.opcheck(lm_head_loss.linear_loss,
                          (h, w, b, batch.targets, batch.old_logprobs, None, batch.advantages,
                           cu, None, batch.old_logprobs + 0.2, config.encode(), 3, True, True,
                           True, True, ""))


def test_backward_twice_is_refused(device, requires_triton):
    batch = head_batch(LENGTHS, 20, device=device, seed=13)
    h = batch.hidden.clone().requires_grad_()
    out = tk.linear_tic_loss(h, batch.weight, batch.targets, batch.old_logprobs,
                             batch.advantages, **batch.layout_kw)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice|modified by an inplace"):
        out.loss.backward()


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.randn(7, 5)), "H = weight.shape"),
    (dict(weight=torch.randn(7)), r"weight must be \(V, H\)"),
    (dict(weight=torch.randn(7, 4, dtype=torch.float64)), "weight is torch.float64"),
    (dict(bias=torch.randn(6)), "bias has shape"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(chunk_size=2.0), "chunk_size must be an int"),
    (dict(fp32_accumulation=1), "fp32_accumulation must be True or False"),
    (dict(targets=torch.tensor([0, 7, 1])), r"targets must lie in \[0, 7\)"),
    (dict(ratio="bogus"), "ratio='bogus' is not supported"),
])
def test_errors(bad, match):
    kw = dict(hidden=torch.randn(3, 4), weight=torch.randn(7, 4), bias=None,
              targets=torch.tensor([0, 6, 1]), old_logprobs=torch.zeros(3) - 1,
              advantages=torch.ones(1), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        tk.linear_tic_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"),
                           kw.pop("old_logprobs"), kw.pop("advantages"), **kw)


def test_fp16_loss_scale(device):
    """fp16 with a loss scale (GradScaler): the scale reaches the logits gradient before it is
    rounded to fp16 (the gradient is formed in the backward), so tiny gradients survive."""
    batch = head_batch(LENGTHS, 131, dtype=torch.float16, device=device, seed=14)
    scale, kw = 65536.0, dict(ratio="token", num_tokens=65536, chunk_size=4)
    leaves = _leaves(batch)
    out = tk.linear_tic_loss(leaves[0], leaves[1], batch.targets, batch.old_logprobs,
                             batch.advantages, bias=leaves[2], **batch.layout_kw, **kw)
    grads = torch.autograd.grad(out.loss * scale, leaves)
    logits, ref_leaves = _logits64(batch)
    kw.pop("chunk_size")
    want = ref.tic_loss(logits, batch.targets, batch.old_logprobs.double(),
                        batch.advantages.double(), **batch.layout_kw, **kw)
    want_grads = torch.autograd.grad(want.loss * scale, ref_leaves)
    for name, g, w in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close_to_scale(g, w, HEAD_GRAD_TOL[torch.float16], name)


def test_accumulate_mm_blocks(monkeypatch):
    """Without a mixed-dtype GEMM (the CPU), d weight chunks are formed block by block in
    fp32 and summed in fp32: every block counted once, nothing rounded to bf16; the first
    chunk writes (the buffer's NaN never read)."""
    monkeypatch.setattr(linear, "_FALLBACK_ROWS", 100)
    a = torch.randn(512, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 8, dtype=torch.bfloat16)
    acc = torch.full((512, 8), float("nan"))
    for i in range(3):
        linear._accumulate_mm(acc, a, b, i == 0)
    assert_close_to_scale(acc, 3 * (a.double() @ b.double()), 1e-6, "blocks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed-dtype GEMM is CUDA's")
def test_cuda_fp32_accumulation():
    """On CUDA each chunk's d weight GEMM accumulates into the fp32 buffer itself (no fallback,
    no warning): eight chunks are as accurate as fp32, not as one bf16 rounding each."""
    import warnings
    a = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    acc = torch.full((512, 32), float("nan"), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(8):
            linear._accumulate_mm(acc, a, b, i == 0)
    assert linear._MIXED_GEMM["cuda"]
    assert_close_to_scale(acc, 8 * (a.double() @ b.double()), 1e-6, "fp32 accumulation")
