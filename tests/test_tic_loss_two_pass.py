"""tic_loss with the gradient written in the forward (ops/tic_loss_two_pass.py, behind its
switch): for every option it serves, the loss and statistics equal the three-pass path's
bitwise and the gradient too at an incoming gradient of 1; other incoming gradients are
applied in the backward (against the reference); three kernels forward, one backward; the
options it does not serve take the three-pass path."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.ops import tic_loss_two_pass as two_pass
from tic_kernels.testing import GRAD_TOL, LOSS_TOL, Launches, loss_batch, rollout_keywords, tolerance

pytestmark = pytest.mark.usefixtures("requires_triton")

TWO_PASS_FWD = ["_sequence_weights_kernel", "_rows_with_gradient_kernel",
                "_ratio_loss_fwd_kernel"]

CASES = {  # name -> (loss keywords, sampler correction or None)
    "token": (dict(ratio="token"), None),
    "token+dual+kl+entropy": (dict(ratio="token", dual_clip=3.0, beta=0.1, entropy_coef=0.05),
                              None),
    "token+seq-mean+token_mask": (dict(ratio="token", aggregation="seq-mean-token-mean",
                                       eps_low=0.1), "token_mask"),
    "token+sum-norm+token_truncate": (dict(ratio="token", aggregation="seq-mean-token-sum-norm",
                                           max_len=9, temperature=0.8), "token_truncate"),
    "none+seq-sum+weights": (dict(ratio="none", aggregation="seq-mean-token-sum",
                                  num_sequences=6), "weights"),
    "none+token-mean+entropy": (dict(ratio="none", aggregation="token-mean", num_tokens=40.0,
                                     entropy_coef=0.1, beta=0.05), None),
}


def _call(b, kw, enabled, dtype_logits=None):
    x = b.logits.clone().requires_grad_(True) * 1  # a non-leaf, as an LM head's output
    two_pass.ENABLED = enabled
    try:
        with Launches() as fwd:
            out = tk.tic_loss(x, b.targets, b.old_logprobs, b.advantages, **kw)
    finally:
        two_pass.ENABLED = False
    return x, out, fwd


@pytest.fixture(autouse=True)
def _switch_off():
    yield
    two_pass.ENABLED = False


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_three_passes(name, padded, device, monkeypatch):
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b = loss_batch([5, 0, 7, 3, 4], 37, padded=padded, seed=11, device=device, drift=0.3)
    options, sampler = CASES[name]
    kw = dict(options, **b.layout_kw)
    if kw.get("beta"):
        kw["ref_logprobs"] = b.ref_logprobs
    if sampler:
        kw.update(rollout_keywords(b.old_logprobs, b.layout_kw, sampler, seed=4))
    runs = []
    for enabled in (False, True):
        x, out, fwd = _call(b, kw, enabled)
        with Launches() as bwd:
            grad, = torch.autograd.grad(out.loss, x)
        runs.append((out, grad, fwd.kernels, bwd.kernels))
    (out3, grad3, _, _), (out2, grad2, fwd2, bwd2) = runs
    assert fwd2 == TWO_PASS_FWD and bwd2 == ["aten.ones_like", "_scale_kernel"]
    assert torch.equal(out2.loss, out3.loss)
    assert sorted(out2.stats) == sorted(out3.stats)
    for k in out3.stats:
        assert torch.equal(out2.stats[k], out3.stats[k]), k
    assert torch.equal(grad2, grad3)  # padded rows included: exact zeros in both


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.5, -0.7])
def test_incoming_gradient(scale, dtype, device):
    """A loss scaled by the caller: the backward kernel multiplies the saved gradient."""
    b = loss_batch([6, 2, 9], 45, padded=True, seed=5, device=device, dtype=dtype)
    kw = dict(ratio="token", entropy_coef=0.05, **b.layout_kw)
    x, out, _ = _call(b, kw, True)
    grad, = torch.autograd.grad(out.loss * scale, x)
    want = ref.tic_loss(x, b.targets, b.old_logprobs, b.advantages, **kw)
    want_grad, = torch.autograd.grad(want.loss * scale, x)
    torch.testing.assert_close(out.loss, want.loss, **tolerance(LOSS_TOL))
    keep = b.layout_kw["mask"]
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    # the scale rounds once more in the logits' dtype: one more ulp
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad[keep].float(), want_grad[keep].float(), atol=2 * atol,
                               rtol=2 * rtol)


def test_one_backward_per_forward(device):
    b = loss_batch([4, 3], 23, seed=2, device=device)
    x, out, _ = _call(b, dict(ratio="token", **b.layout_kw), True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out.loss.backward()


@pytest.mark.parametrize("kw", [dict(ratio="trajectory"), dict(ratio="sequence_mean"),
                                dict(ratio="token", inplace_backward=True),
                                dict(ratio="token", rollout="sequence_mask")])
def test_other_options_take_three_passes(kw, device, monkeypatch):
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    b = loss_batch([4, 3], 23, seed=2, device=device)
    kw = dict(kw, **b.layout_kw)
    if kw.pop("rollout", None):
        kw.update(rollout_keywords(b.old_logprobs, b.layout_kw, "sequence_mask"))
    _, out, fwd = _call(b, kw, True)
    assert fwd.kernels == ["_token_logprobs_fwd_kernel", "_ratio_loss_fwd_kernel"]
    with Launches() as nograd:  # no gradient wanted: nothing to write in the forward
        two_pass.ENABLED = True
        tk.tic_loss(b.logits, b.targets, b.old_logprobs, b.advantages, ratio="token",
                    **b.layout_kw)
    assert "_rows_with_gradient_kernel" not in nograd.kernels
