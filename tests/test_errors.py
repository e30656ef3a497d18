"""Every bad input of the public API raises a Python error that names the argument."""
import gc
import weakref

import pytest
import torch

import tic_kernels as tk
from tic_kernels.testing import cu_seqlens_from

N, V, B = 7, 11, 2
CU = cu_seqlens_from(torch.tensor([3, 4]))


def _args(**over):
    a = dict(logits=torch.randn(N, V), targets=torch.randint(0, V, (N,)),
             old_logprobs=torch.randn(N), advantages=torch.randn(B))
    a.update(over)
    return a


def _loss(kw=None, **over):
    a = _args(**over)
    kw = {"cu_seqlens": CU, **(kw or {})}
    return tk.tic_loss(a["logits"], a["targets"], a["old_logprobs"], a["advantages"], **kw)


@pytest.mark.parametrize("over,kw,exc,msg", [
    (dict(logits=torch.randint(0, 3, (N, V))), None, TypeError, "logits must be a floating"),
    (dict(targets=torch.rand(N)), None, TypeError, "targets must be an int32 or int64"),
    (dict(targets=torch.full((N,), V)), None, ValueError, r"targets must lie in \[0, 11\); found 11"),
    (dict(targets=torch.full((N,), -100)), None, ValueError, "targets must lie in"),
    (dict(targets=torch.zeros(N + 1, dtype=torch.long)), None, ValueError, "targets has shape"),
    (dict(old_logprobs=torch.randn(N - 1)), None, ValueError, "old_logprobs has shape"),
    (dict(old_logprobs=torch.zeros(N, dtype=torch.long)), None, TypeError, "old_logprobs must be a floating"),
    (dict(advantages=torch.randn(B + 1)), None, ValueError, "advantages has shape"),
    ({}, dict(ref_logprobs=torch.randn(N + 2), beta=0.1), ValueError, "ref_logprobs has shape"),
    ({}, dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
    ({}, dict(cu_seqlens=CU.float()), TypeError, "cu_seqlens must be an int32 or int64"),
    ({}, dict(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
    ({}, dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), ValueError, "non-decreasing"),
    ({}, dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "must end at the number of tokens 7"),
    ({}, dict(cu_seqlens=CU.view(1, 3)), ValueError, "cu_seqlens must be 1-D"),
    ({}, dict(mask=torch.ones(1, N, dtype=torch.bool)), ValueError, "exactly one of cu_seqlens"),
    ({}, dict(cu_seqlens=None), ValueError, "exactly one of cu_seqlens"),
    ({}, dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ({}, dict(temperature=float("nan")), ValueError, "temperature must be"),
    ({}, dict(eps_low=1.0), ValueError, r"eps_low must lie in \[0, 1\)"),
    ({}, dict(eps_low=-0.1), ValueError, "eps_low"),
    ({}, dict(eps_high=-0.1), ValueError, "eps_high must lie"),
    ({}, dict(dual_clip=1.0), ValueError, "dual_clip must be a finite number > 1"),
    ({}, dict(max_log_ratio=0), ValueError, "max_log_ratio must be"),
    ({}, dict(ratio="seq"), ValueError, "ratio='seq' is not supported; accepted values: 'trajectory'"),
    ({}, dict(clip_mode="lower"), ValueError, "clip_mode='lower' is not supported"),
    ({}, dict(aggregation="mean"), ValueError, "aggregation='mean' is not supported"),
    ({}, dict(aggregation="seq-mean-token-sum-norm"), ValueError, "needs max_len"),
    ({}, dict(num_tokens=0), ValueError, "num_tokens must be"),
    ({}, dict(num_tokens=10), ValueError, "num_tokens only applies to aggregation='token-mean'"),
    ({}, dict(num_sequences=4, ratio="token"), ValueError, "num_sequences does not apply"),
    ({}, dict(entropy_coef=float("inf")), ValueError, "entropy_coef must be a finite"),
])
def test_tic_loss_errors(over, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _loss(kw, **over)


@pytest.mark.parametrize("over", [dict(targets=torch.full((N,), V)),
                                  dict(old_logprobs=torch.randn(N - 1))])
def test_rejected_call_keeps_nothing_alive(over):
    """An error leaves no reference cycle behind: once it is handled, the caller's tensors are
    freed by reference counting, not at the next cyclic GC (for GPU logits, gigabytes)."""
    a = _args(**over)
    alive = weakref.ref(a["logits"])
    gc.disable()
    try:
        try:
            tk.tic_loss(a.pop("logits"), a["targets"], a["old_logprobs"], a["advantages"],
                        cu_seqlens=CU)
        except (TypeError, ValueError):
            pass
        else:
            pytest.fail(f"{sorted(over)} was accepted")
        assert alive() is None
    finally:
        gc.enable()


ROLLOUT_ERRORS = [
    (dict(rollout_is="token_truncate"), ValueError,
     "rollout_is='token_truncate' needs rollout_logprobs"),
    (dict(rollout_logprobs=torch.randn(N)), ValueError,
     "rollout_logprobs needs rollout_is, the correction to apply: 'token_truncate'"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token"), ValueError,
     "rollout_is='token' is not supported; accepted values: 'token_truncate'"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token_mask",
          rollout_weights=torch.rand(N)), ValueError, "rollout_logprobs .* or rollout_weights"),
    (dict(rollout_weights=torch.rand(N), rollout_is="sequence_mask"), ValueError,
     "rollout_is='sequence_mask' applies to rollout_logprobs"),
    (dict(rollout_weights=torch.rand(N), rollout_is_min=0.5), ValueError,
     "rollout_is_min=0.5 applies to rollout_logprobs"),
    (dict(rollout_logprobs=torch.tensor([-1.0, float("inf"), -2, -1, -1, -1, -1]),
          rollout_is="sequence_mask"), ValueError,
     "rollout_logprobs must be log-probabilities .* found \\+inf"),
    (dict(rollout_weights=torch.rand(N), rollout_is_max=2.0), ValueError,
     "rollout_is_max=2.0 applies to rollout_logprobs"),
    (dict(rollout_weights=torch.rand(N), rollout_is_max=float("inf")), ValueError,
     "rollout_is_max=inf applies to rollout_logprobs"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token_mask", rollout_is_max=0.0),
     ValueError, "rollout_is_max must be a number > 0"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token_mask", rollout_is_max=float("nan")),
     ValueError, "rollout_is_max must be a number > 0"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token_mask", rollout_is_min=4.0),
     ValueError, "rollout_is_min=4.0 exceeds rollout_is_max=3.0"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token_mask", rollout_is_min=-1.0),
     ValueError, "rollout_is_min must be a finite number >= 0"),
    (dict(rollout_logprobs=torch.randn(N), rollout_is="token_mask", rollout_is_min=2.0,
          rollout_is_max=1.5), ValueError, "rollout_is_min=2.0 exceeds rollout_is_max=1.5"),
    (dict(rollout_logprobs=torch.randn(N - 1), rollout_is="token_mask"), ValueError,
     "rollout_logprobs has shape"),
    (dict(rollout_logprobs=torch.randint(0, 3, (N,)), rollout_is="token_mask"), TypeError,
     "rollout_logprobs must be a floating"),
    (dict(rollout_weights=torch.rand(N, 1)), ValueError, "rollout_weights has shape"),
    (dict(rollout_weights=torch.tensor([1.0, 0.5, -0.1, 1, 1, 1, 1])), ValueError,
     "rollout_weights must be finite and >= 0, found -0.1"),
    (dict(rollout_weights=torch.tensor([1.0, 0.5, float("nan"), 1, 1, 1, 1])), ValueError,
     "rollout_weights must be finite and >= 0, found nan"),
]


@pytest.mark.parametrize("fn", ["tic_loss", "tic_loss_from_logprobs", "linear_tic_loss"])
@pytest.mark.parametrize("kw,exc,msg", ROLLOUT_ERRORS)
def test_rollout_errors(fn, kw, exc, msg):
    a = _args()
    first = {"tic_loss": (a["logits"], a["targets"]),
             "tic_loss_from_logprobs": (torch.randn(N),),
             "linear_tic_loss": (torch.randn(N, 4), torch.randn(V, 4), a["targets"])}[fn]
    with pytest.raises(exc, match=msg):
        getattr(tk, fn)(*first, a["old_logprobs"], a["advantages"], cu_seqlens=CU, **kw)


def test_rollout_weights_checked_under_the_mask_only():
    logits, targets = torch.randn(B, 4, V), torch.randint(0, V, (B, 4))
    old, adv = torch.randn(B, 4), torch.randn(B)
    mask = torch.ones(B, 4, dtype=torch.bool)
    mask[1, 3] = False
    w = torch.rand(B, 4)
    w[1, 3] = float("nan")  # padding: never read
    assert torch.isfinite(tk.tic_loss(logits, targets, old, adv, mask=mask,
                                      rollout_weights=w).loss)
    w[1, 2] = -1.0
    with pytest.raises(ValueError, match="rollout_weights must be finite and >= 0, found -1"):
        tk.tic_loss(logits, targets, old, adv, mask=mask, rollout_weights=w)
    sampler = old - 0.1
    sampler[1, 3] = float("inf")  # padding: never read
    assert torch.isfinite(tk.tic_loss(logits, targets, old, adv, mask=mask,
                                      rollout_logprobs=sampler, rollout_is="token_mask").loss)


def test_padded_layout_errors():
    logits, targets = torch.randn(B, 4, V), torch.randint(0, V, (B, 4))
    old, adv = torch.randn(B, 4), torch.randn(B)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\), expected \(2, 4\)"):
        tk.tic_loss(logits, targets, old, adv, mask=torch.ones(B, 3))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        tk.tic_loss(logits, targets, old, adv, mask=torch.full((B, 4), 2))
    with pytest.raises(ValueError, match=r"logits must be \(B, T, V\) with mask"):
        tk.tic_loss(logits[0], targets[0], old[0], adv, mask=torch.ones(B, 4))
    # a bad target under the mask is an error, one under padding is not read
    bad = targets.clone()
    bad[0, 3] = V + 5
    mask = torch.ones(B, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="targets must lie in"):
        tk.tic_loss(logits, bad, old, adv, mask=mask)
    mask[0, 3] = False
    assert torch.isfinite(tk.tic_loss(logits, bad, old, adv, mask=mask).loss)


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    with pytest.raises(ValueError, match="advantages is on"):
        _loss(advantages=torch.randn(B, device="cuda"))


def test_from_logprobs_errors():
    lp, old, adv = torch.randn(N), torch.randn(N), torch.randn(B)
    with pytest.raises(TypeError, match="logprobs must be a floating"):
        tk.tic_loss_from_logprobs(lp.long(), old, adv, cu_seqlens=CU)
    with pytest.raises(ValueError, match="logprobs must be 1-D"):
        tk.tic_loss_from_logprobs(lp.view(1, N), old, adv, cu_seqlens=CU)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        tk.tic_loss_from_logprobs(lp, old[:3], adv, cu_seqlens=CU)
    with pytest.raises(ValueError, match="ratio='x'"):
        tk.tic_loss_from_logprobs(lp, old, adv, cu_seqlens=CU, ratio="x")


def test_token_logprobs_errors():
    logits, targets = torch.randn(N, V), torch.randint(0, V, (N,))
    with pytest.raises(TypeError, match="logits must be a floating"):
        tk.token_logprobs(logits.int(), targets)
    with pytest.raises(TypeError, match="targets must be an int32"):
        tk.token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets has shape"):
        tk.token_logprobs(logits, targets[:3])
    with pytest.raises(ValueError, match=r"found -1"):
        tk.token_logprobs(logits, torch.full((N,), -1))
    with pytest.raises(ValueError, match="temperature must be"):
        tk.token_logprobs(logits, targets, temperature=-1.0)
    with pytest.raises(ValueError, match="vocabulary dimension"):
        tk.token_logprobs(torch.randn(N, 0), targets)
    # ignore_index is allowed, and a custom one too
    assert tk.token_logprobs(logits, torch.full((N,), -100))[0] == 0
    assert tk.token_logprobs(logits, torch.full((N,), -1), ignore_index=-1)[0] == 0


def test_sequence_logprobs_errors():
    x = torch.randn(N)
    with pytest.raises(ValueError, match="reduce='max' is not supported"):
        tk.sequence_logprobs(x, cu_seqlens=CU, reduce="max")
    with pytest.raises(ValueError, match="exactly one of cu_seqlens"):
        tk.sequence_logprobs(x)
    with pytest.raises(ValueError, match="values must be 1-D"):
        tk.sequence_logprobs(x.view(1, N), cu_seqlens=CU)
    with pytest.raises(ValueError, match="values must be 2-D"):
        tk.sequence_logprobs(x, mask=torch.ones(N))
    with pytest.raises(TypeError, match="values must be a floating"):
        tk.sequence_logprobs(x.long(), cu_seqlens=CU)
    with pytest.raises(ValueError, match="must end at the number of tokens"):
        tk.sequence_logprobs(x[:5], cu_seqlens=CU)


def test_group_advantages_errors():
    r = torch.randn(6)
    with pytest.raises(ValueError, match="exactly one of group_size or group_ids"):
        tk.group_advantages(r)
    with pytest.raises(ValueError, match="exactly one of group_size or group_ids"):
        tk.group_advantages(r, 3, group_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="group_size=4 does not divide the number of rewards 6"):
        tk.group_advantages(r, 4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        tk.group_advantages(r, 0)
    with pytest.raises(TypeError, match="group_ids must be an int32 or int64"):
        tk.group_advantages(r, group_ids=torch.zeros(6))
    with pytest.raises(ValueError, match="group_ids has shape"):
        tk.group_advantages(r, group_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        tk.group_advantages(r, 3, eps=0)
    with pytest.raises(ValueError, match="scale='std' is not supported"):
        tk.group_advantages(r, 3, scale="std")
    with pytest.raises(ValueError, match="std='unbiased' is not supported"):
        tk.group_advantages(r, 3, std="unbiased")
    with pytest.raises(ValueError, match="length_normalize=True needs lengths"):
        tk.group_advantages(r, 3, length_normalize=True)
    with pytest.raises(ValueError, match="lengths has shape"):
        tk.group_advantages(r, 3, lengths=torch.ones(5), length_normalize=True)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        tk.group_advantages(r.view(2, 3), 3)
    # integer rewards are fine
    torch.testing.assert_close(tk.group_advantages(torch.tensor([0, 1, 1, 0]), 2),
                               tk.group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2))


def test_value_checks_can_be_switched_off(monkeypatch, device):
    """TIC_KERNELS_CHECK_VALUES=0 skips the host-syncing value checks; the kernels then turn an
    out-of-range target into NaN (the Triton path) or an indexing error (the reference)."""
    from tic_kernels.backend import use_triton
    logits = torch.randn(3, V, device=device)
    bad = torch.tensor([1, V + 3, 2], device=device)
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
    if use_triton(logits):
        lp = tk.token_logprobs(logits, bad)
        assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2]]).all()
    else:
        with pytest.raises(RuntimeError):
            tk.token_logprobs(logits, bad)
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="targets must lie in"):
        tk.token_logprobs(logits, bad)


def test_option_types_and_value_bounds():
    """Silently accepted before: a non-int ignore_index, a non-bool switch, negative lengths, a
    max_len below the longest sequence, repeated unpack indices."""
    logits, targets = torch.randn(N, V), torch.randint(0, V, (N,))
    for bad in (2.5, None, True, "-100"):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            tk.token_logprobs(logits, targets, ignore_index=bad)
    with pytest.raises(TypeError, match="return_entropy must be True or False"):
        tk.token_logprobs(logits, targets, return_entropy=1)
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        _loss(dict(inplace_backward="yes"))
    with pytest.raises(ValueError, match="eps_high must lie"):
        _loss(dict(eps_high=True))
    with pytest.raises(ValueError, match=r"max_len=3 is smaller than the longest sequence \(4 tokens\)"):
        _loss(dict(aggregation="seq-mean-token-sum-norm", max_len=3))
    logits3, t3 = torch.randn(B, 5, V), torch.randint(0, V, (B, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"max_len=2 is smaller than the longest sequence \(3"):
        tk.tic_loss(logits3, t3, torch.randn(B, 5), torch.randn(B), mask=mask, max_len=2,
                    aggregation="seq-mean-token-sum-norm")
    assert torch.isfinite(tk.tic_loss(logits3, t3, torch.randn(B, 5), torch.randn(B), mask=mask,
                                      max_len=3, aggregation="seq-mean-token-sum-norm").loss)
    with pytest.raises(ValueError, match="lengths must be >= 0, found -2"):
        tk.group_advantages(torch.randn(4), 2, lengths=torch.tensor([3, -2, 1, 1]),
                            length_normalize=True)
    with pytest.raises(TypeError, match="lengths must be an integer or floating tensor"):
        tk.group_advantages(torch.randn(4), 2, lengths=torch.ones(4, dtype=torch.bool))
    from tic_kernels.ops.packing import unpack
    with pytest.raises(ValueError, match="indices must not repeat"):
        unpack(torch.randn(3, 2), torch.tensor([0, 4, 0]), 2, 3)


def test_device_checks_come_before_value_checks():
    """A tensor on another device is named as such, never read (a meta cu_seqlens used to
    fail with "Cannot copy out of meta tensor")."""
    with pytest.raises(ValueError, match="cu_seqlens is on meta but logits is on cpu"):
        _loss(dict(cu_seqlens=CU.to("meta")))
    with pytest.raises(ValueError, match="cu_seqlens is on meta but values is on cpu"):
        tk.sequence_logprobs(torch.randn(N), cu_seqlens=CU.to("meta"))
    with pytest.raises(ValueError, match="mask is on meta but logits is on cpu"):
        tk.tic_loss(torch.randn(B, 4, V), torch.randint(0, V, (B, 4)), torch.randn(B, 4),
                    torch.randn(B), mask=torch.ones(B, 4, device="meta"))
    lp = torch.randn(N)
    with pytest.raises(ValueError, match="advantages is on meta but logprobs is on cpu"):
        tk.tic_loss_from_logprobs(lp, torch.randn(N), torch.randn(B, device="meta"), cu_seqlens=CU)
    with pytest.raises(ValueError, match="cu_seqlens is on meta but logprobs is on cpu"):
        tk.tic_loss_from_logprobs(lp, torch.randn(N), torch.randn(B), cu_seqlens=CU.to("meta"))
