"""What one call costs the device, pinned: kernels launched and host reads per public call.

tic_loss: two kernels forward (the rows; the loss with its reduction), one backward (the
coefficients scaled inside it); token_logprobs: one and one (on a GPU, a small batch with
more than one run of columns per row adds a zero-fill to the forward: the split over the
runs). The inputs are read as they come
(a float 0/1 mask, int32 cu_seqlens, bf16 advantages, a broadcast gradient): no conversion
kernel. Value checks: at most one host read per call, none with TIC_KERNELS_CHECK_VALUES=0 and
none in a backward. Counted under the interpreter (tic_kernels.testing.Launches); the values of
these input forms are checked against the reference here too.
"""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.ops import lm_head, lm_head_loss, ratio_loss
from tic_kernels.ops import token_logprobs as op1
from tic_kernels.ops.packing import unpack
from tic_kernels.testing import (GRAD_TOL, LOSS_TOL, Launches, head_batch, loss_batch,
                                 rollout_keywords, tolerance)

pytestmark = pytest.mark.usefixtures("requires_triton")

ROW_FWD, LOSS_FWD, ROW_BWD = ("_token_logprobs_fwd_kernel", "_ratio_loss_fwd_kernel",
                              "_token_logprobs_bwd_kernel")


def _inputs(padded, as_they_come, device, seed=0):
    """A batch as users pass it: bool masks and int64 cu_seqlens, or (as_they_come) a float
    0/1 mask, int32 cu_seqlens and bf16 advantages."""
    b = loss_batch([5, 0, 7, 3], 37, padded=padded, seed=seed, device=device)
    lay, adv = dict(b.layout_kw), b.advantages
    if as_they_come:
        adv = adv.bfloat16()
        if padded:
            lay["mask"] = lay["mask"].float()
        else:
            lay["cu_seqlens"] = lay["cu_seqlens"].int()
    return b, lay, adv


def _grad(loss, x, scale=1.0):
    """dloss/dx times ``scale`` (the incoming gradient, made outside the count: the caller's)."""
    g = torch.full((), scale, dtype=loss.dtype, device=loss.device)
    with Launches() as bwd:
        grad, = torch.autograd.grad(loss, x, g)
    return grad, bwd


OPTIONS = {
    "token": dict(ratio="token"),
    "trajectory+entropy+kl": dict(ratio="trajectory", entropy_coef=0.05, beta=0.1),
    "sequence_mean+sampler": dict(ratio="sequence_mean", rollout="sequence_mask"),
    "none+weights": dict(ratio="none", rollout="weights", aggregation="token-mean"),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("as_they_come", [False, True])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_tic_loss_two_kernels_forward_one_backward(name, padded, as_they_come, monkeypatch,
                                                    device):
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b, lay, adv = _inputs(padded, as_they_come, device)
    kw = dict(OPTIONS[name])
    if "rollout" in kw:
        kw.update(rollout_keywords(b.old_logprobs, lay, kw.pop("rollout"), seed=3))
    if kw.get("beta"):
        kw["ref_logprobs"] = b.ref_logprobs
    logits = (b.logits * 1).requires_grad_(True)  # a non-leaf, as an LM head's output
    with Launches() as fwd:
        out = tk.tic_loss(logits, b.targets, b.old_logprobs, adv, **lay, **kw)
    scale = 2.5  # an incoming gradient the kernel must apply (a loss scaled by the caller)
    grad, bwd = _grad(out.loss, logits, scale)
    assert (fwd.kernels, fwd.ops, fwd.host_reads) == ([ROW_FWD, LOSS_FWD], [], 0)
    assert (bwd.kernels, bwd.ops, bwd.host_reads) == ([ROW_BWD], [], 0)

    want = ref.tic_loss(logits, b.targets, b.old_logprobs, adv, **lay, **kw)
    want_grad, = torch.autograd.grad(want.loss * scale, logits)
    torch.testing.assert_close(out.loss, want.loss, **tolerance(LOSS_TOL))
    assert sorted(out.stats) == sorted(want.stats)
    for k in want.stats:
        torch.testing.assert_close(out.stats[k], want.stats[k], **tolerance(LOSS_TOL), msg=k)
    if padded:  # the padded rows (NaN logits) get a gradient of exact zeros
        keep = lay["mask"].bool()
        assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
        grad, want_grad = grad[keep], want_grad[keep]
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, torch.float32))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("selection", ["kl_cov", "top_entropy"])
def test_selections_on_the_device(selection, padded, monkeypatch, device):
    """The batch-wide token selections (KL-Cov's sort of the covariances, the top-entropy
    quantile) read nothing back to the host: tic_loss keeps its two kernels and one backward
    kernel, with the selection's kernels and its sort between them; the fused LM head runs
    its forward GEMM once more per chunk (every log-prob before a gradient) and reads nothing
    more than with neither."""
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b, lay, adv = _inputs(padded, True, device)
    kw = (dict(ratio="token", objective="kl_cov", kl_cov_ratio=0.3) if selection == "kl_cov"
          else dict(ratio="token", top_entropy_quantile=0.5))
    logits = (b.logits * 1).requires_grad_(True)
    with Launches(into=(ratio_loss,)) as fwd:
        out = tk.tic_loss(logits, b.targets, b.old_logprobs, adv, **lay, **kw)
    grad, bwd = _grad(out.loss, logits)
    selecting = (["_covariance_keys_kernel", "aten.sort", "_covariance_take_kernel"]
                 if selection == "kl_cov" else ["aten.sort", "_entropy_kept_kernel"])
    assert fwd.kernels == [ROW_FWD, "_selection_pass_kernel", *selecting, LOSS_FWD]
    assert fwd.host_reads == 0
    assert (bwd.kernels, bwd.host_reads) == ([ROW_BWD], 0)
    want = ref.tic_loss(logits, b.targets, b.old_logprobs, adv, **lay, **kw)
    torch.testing.assert_close(out.loss, want.loss, **tolerance(LOSS_TOL))
    if selection == "kl_cov":
        assert out.stats["clip_fraction"] == pytest.approx(4 / 15)  # floor(0.3 * 15) tokens

    h = head_batch([5, 0, 7, 3], 37, padded=padded, seed=5, device=device)
    leaves = [t.clone().requires_grad_() for t in (h.hidden, h.weight)]
    counts = []
    for options in (dict(ratio="token"), kw):
        with Launches(stub=True, into=(lm_head, lm_head_loss)) as fwd:
            tk.linear_tic_loss(*leaves, h.targets, h.old_logprobs, h.advantages, chunk_size=4,
                               **h.layout_kw, **options)
        counts.append((sum(k in ("aten.mm", "aten.addmm", "aten.addmm_") for k in fwd.kernels),
                       fwd.host_reads))
    # 4 chunks: 3 GEMMs each, and the pre-pass's 3 (the last chunk's logits are reused); no
    # read beyond the padded rows' one
    assert counts == [(12, int(padded)), (15, int(padded))]


@pytest.mark.parametrize("padded", [False, True])
def test_tic_loss_reads_the_host_once_with_checks_on(padded, monkeypatch, device):
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "1")
    b, lay, adv = _inputs(padded, True, device)
    sampler = rollout_keywords(b.old_logprobs, lay, "token_truncate", seed=1)
    logits = (b.logits * 1).requires_grad_(True)
    with Launches() as fwd:
        out = tk.tic_loss(logits, b.targets, b.old_logprobs, adv, max_len=9, **lay, **sampler)
    _, bwd = _grad(out.loss, logits)
    assert fwd.host_reads == 1 and bwd.host_reads == 0
    assert fwd.kernels[-2:] == [ROW_FWD, LOSS_FWD] and bwd.kernels == [ROW_BWD]


@pytest.mark.parametrize("bad", ["targets", "cu_seqlens", "max_len"])
def test_one_read_raises_the_failed_check(bad, device):
    """The checks gathered into one read raise what each raises alone (its own message)."""
    b, lay, adv = _inputs(False, True, device)
    targets, kw = b.targets.clone(), dict(lay)
    if bad == "targets":
        targets[4] = 37
        match = "targets must lie in \\[0, 37\\); found 37"
    elif bad == "cu_seqlens":
        kw["cu_seqlens"] = kw["cu_seqlens"].flip(0)
        match = "cu_seqlens must start at 0, got 15"
    else:
        kw["max_len"] = 6
        match = "max_len=6 is smaller than the longest sequence \\(7 tokens\\)"
    with Launches() as calls, pytest.raises(ValueError, match=match):
        tk.tic_loss(b.logits, targets, b.old_logprobs, adv, **kw)
    assert LOSS_FWD not in calls.kernels and ROW_FWD not in calls.kernels


@pytest.mark.parametrize("use", ["logp", "entropy", "both"])
def test_token_logprobs_one_kernel_each_way(use, monkeypatch, device):
    """One kernel forward, one backward, whichever outputs the loss uses: the gradient of an
    unused output is not materialised, a broadcast gradient (of a sum) not copied."""
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b = loss_batch([6, 9], 45, padded=True, seed=2, device=device)
    targets = b.targets.masked_fill(~b.layout_kw["mask"], -100)
    logits = torch.randn(b.logits.shape, device=device).mul(2).requires_grad_(True) * 1
    with Launches() as fwd:
        logp, H = tk.token_logprobs(logits, targets, temperature=0.8, return_entropy=True)
    want_logp, want_H = ref.token_logprobs(logits, targets, 0.8, -100, True)
    with Launches() as glue:  # the caller's loss: a sum is a broadcast gradient
        loss = {"logp": logp.sum(), "entropy": H.sum(), "both": logp.sum() + 0.3 * H.sum()}[use]
    want = {"logp": want_logp.sum(), "entropy": want_H.sum(),
            "both": want_logp.sum() + 0.3 * want_H.sum()}[use]
    grad, bwd = _grad(loss, logits)
    want_grad, = torch.autograd.grad(want, logits)
    assert (fwd.kernels, fwd.ops, fwd.host_reads) == ([ROW_FWD], [], 0)
    expected_bwd = {"logp": [ROW_BWD], "entropy": [ROW_BWD],
                    "both": ["aten.mul", ROW_BWD]}[use]  # 0.3 * (the caller's scaling)
    assert (bwd.kernels, bwd.ops, bwd.host_reads) == (expected_bwd, [], 0), glue.kernels
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, torch.float32))


def test_token_logprobs_checks_read_once(monkeypatch, device):
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "1")
    b = loss_batch([6, 9], 45, seed=2, device=device)
    with Launches() as fwd:
        tk.token_logprobs(b.logits, b.targets)
    assert fwd.host_reads == 1 and fwd.kernels[-1] == ROW_FWD


@pytest.mark.parametrize("split", [2, 3])
def test_backward_split_over_the_columns(split, monkeypatch, device):
    """Several programs per row (few rows on a large GPU) write the same gradient as one."""
    b = loss_batch([4, 3], 77, seed=4, device=device)
    logits = b.logits.clone().requires_grad_(True)
    g = torch.randn(b.targets.shape, device=device)
    grads = []
    for programs in (1, split):
        monkeypatch.setitem(op1.LAUNCH_CONFIG, "bwd", (16, 4))  # 5 blocks of 16 columns
        monkeypatch.setitem(op1.LAUNCH_CONFIG, "bwd_split", programs)
        logp, H = tk.token_logprobs(logits, b.targets, return_entropy=True)
        grads.append(torch.autograd.grad((logp * g).sum() + H.sum(), logits)[0])
    assert torch.equal(grads[0], grads[1])
    want = ref.token_logprobs(logits, b.targets, 1.0, -100, True)
    want_grad, = torch.autograd.grad((want[0] * g).sum() + want[1].sum(), logits)
    torch.testing.assert_close(grads[1], want_grad, **tolerance(GRAD_TOL, torch.float32))


@pytest.mark.parametrize("split", [False, True])
def test_forward_split_over_the_runs(split, monkeypatch, device):
    """The forward with each run of a row's columns in its own program (few rows on a large
    GPU), merged by the row's last program, gives bitwise the values of one program sweeping
    the row, which merges the same runs in the same order; both match the reference. Runs
    of 32 columns over V = 77 (3 runs, the last short), a run of -inf logits (a masked part
    of the vocabulary), an ignored row, a large logit."""
    b = loss_batch([4, 3], 77, seed=5, device=device)
    logits = b.logits.clone()
    logits[1, 32:64] = -float("inf")
    logits[3, 70] = 3e4
    targets = b.targets.clone()
    targets[1], targets[2] = 5, -100
    logits.requires_grad_(True)
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")  # the count: the row kernel alone
    monkeypatch.setitem(op1.LAUNCH_CONFIG, "fwd", (16, 4))
    monkeypatch.setitem(op1.LAUNCH_CONFIG, "fwd_chunk_blocks", 2)
    values = []
    for programs in (False, split):
        monkeypatch.setitem(op1.LAUNCH_CONFIG, "fwd_split", programs)
        with Launches() as fwd:
            values.append(tk.token_logprobs(logits, targets, temperature=0.7,
                                            return_entropy=True))
        # the split runs 3 programs per row, counted in by a zeroed int32 per row
        assert fwd.kernels[-1] == ROW_FWD and len(fwd.kernels) == 1 + programs, fwd.kernels
    for got, want in zip(*values):
        assert torch.equal(got, want)
    leaf = logits.detach().requires_grad_()
    want = ref.token_logprobs(leaf, targets, 0.7, -100, True)
    for got, w in zip(values[1], want):
        torch.testing.assert_close(got, w, **tolerance(LOSS_TOL, torch.float32))
    g = torch.randn(targets.shape, device=device)
    grad, = torch.autograd.grad((values[1][0] * g).sum() + values[1][1].sum(), logits)
    want_grad, = torch.autograd.grad((want[0] * g).sum() + want[1].sum(), leaf)
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, torch.float32))


@pytest.mark.parametrize("call", ["sequence_logprobs", "tic_loss_from_logprobs",
                                  "group_advantages", "unpack"])
def test_other_ops_read_the_host_at_most_once(call, monkeypatch, device):
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "1")
    b, lay, adv = _inputs(False, True, device)
    logp = torch.randn(b.targets.shape, device=device)
    on = dict(device=device)
    # the inputs made before the count (a tensor copied from the host counts as a read)
    weights = rollout_keywords(b.old_logprobs, lay, "weights")
    rewards, lengths = torch.randn(4, **on), torch.tensor([3, 0, 2, 5], **on)
    rows, row_lengths = torch.randn(3, 2, **on), torch.tensor([5, 0, 2], **on)
    calls = {
        "sequence_logprobs": lambda: tk.sequence_logprobs(logp, reduce="mean", **lay),
        "tic_loss_from_logprobs": lambda: tk.tic_loss_from_logprobs(
            logp, b.old_logprobs, adv, max_len=9, **lay, **weights),
        "group_advantages": lambda: tk.group_advantages(rewards, 2, lengths=lengths),
        "unpack": lambda: unpack(rows, row_lengths, 2, 4),
    }
    with Launches() as counted:
        calls[call]()
    assert counted.host_reads == 1  # the checks ran, and were read at once


def test_last_program_reduces_as_the_finalize_kernel(device):
    """The loss reduced by the last program to finish equals, bitwise, the separate finalize
    kernel's: many more sequences than a GPU runs at once, so that programs finish in
    another order each time (on the interpreter they run in order)."""
    from tic_kernels.config import LossConfig
    from tic_kernels.ops.ratio_loss import kernel_ratio_loss
    B = 2048 if device == "cuda" else 96
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 6, (B,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    N = int(lengths.sum())
    logp, old = (torch.randn(N, generator=g).to(device) - 2 for _ in range(2))
    adv = torch.randn(B, generator=g).to(device)
    config = LossConfig(ratio="trajectory", entropy_coef=0.0)
    want = kernel_ratio_loss(logp, old, adv, cu, None, None, None, None, config)
    for _ in range(3):
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        got = kernel_ratio_loss(logp, old, adv, cu, None, None, None, None, config, counter)
        for a, b in zip(got, want):  # coef_ent None: no entropy
            assert (a is None and b is None) or torch.equal(a, b)
        assert counter.item() == B  # every program counted (nothing resets it)


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_autograd_after_an_eager_forward(padded, device):
    """A backward traced by compiled autograd after an eager forward takes the ops' path
    (it decides when it runs) and gives the eager gradient."""
    from torch._dynamo import compiled_autograd
    b = loss_batch([3, 4], 13, seed=1, padded=padded, device=device)
    grads = []
    for compiled in (False, True):
        x = b.logits.clone().requires_grad_(True)
        out = tk.tic_loss(x * 1, b.targets, b.old_logprobs, b.advantages, entropy_coef=0.1,
                          **b.layout_kw)
        torch._dynamo.reset()
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                out.loss.backward()
        else:
            out.loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5, equal_nan=True)
