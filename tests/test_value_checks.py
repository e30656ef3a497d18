"""The batched value checks (tic_kernels/value_checks.py): one kernel makes the flags of the
targets', cu_seqlens' and 0/1 masks' checks of a call, equal to the same checks in torch ops
(the other paths' and the error messages'), across several of its blocks; a check it cannot
take falls back to torch ops in the same single read."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import validation as check
from tic_kernels import value_checks
from tic_kernels.testing import Launches, loss_batch

pytestmark = pytest.mark.usefixtures("requires_triton")

R = 2 * value_checks.BLOCK + 37  # three programs, the last one partial


def _torch_flags(batch):
    """The flags as the torch path makes them (validation.py's formulas)."""
    want = [False] * value_checks.FLAGS
    if "targets" in batch:
        t, vocab, ignore, mask = batch["targets"]
        bad = (t < 0) | (t >= vocab)
        if ignore is not None:
            bad &= t != ignore
        if mask is not None:
            bad &= mask.bool()
        want[0] = bool(bad.any())
    if "cu_seqlens" in batch:
        cu, n = batch["cu_seqlens"]
        want[1:4] = [bool(cu[0] != 0), bool((cu[1:] < cu[:-1]).any()), bool(cu[-1] != n)]
    if "mask" in batch:
        m, = batch["mask"]
        want[4] = bool(((m != 0) & (m != 1)).any())
    return want


def _case(seed, device):
    """Random inputs of every batched check, with faults planted at random (or none)."""
    g = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(0, n, (1,), generator=g))
    vocab = 50 + pick(100)
    t_dtype = (torch.int32, torch.int64)[pick(2)]
    t = torch.randint(0, vocab, (R,), generator=g)
    ignore = (None, -100)[pick(2)]
    if ignore is not None:
        t[torch.rand(R, generator=g) < 0.1] = ignore
    mask_dtype = (None, torch.bool, torch.uint8, torch.float32)[pick(4)]
    mask = None if mask_dtype is None else (torch.rand(R, generator=g) < 0.7).to(mask_dtype)
    fault = pick(4)
    if fault:  # a target outside the vocabulary, in a later block, maybe under the mask
        at = value_checks.BLOCK + pick(R - value_checks.BLOCK)
        t[at] = (vocab, -3, vocab + 7)[fault - 1]
    B = pick(2) * value_checks.BLOCK + 5 + pick(40)  # one program or two
    lengths = torch.randint(0, 9, (B,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(cu[-1])
    cu_fault = pick(5)
    if cu_fault == 1:
        cu[0] = 2
    elif cu_fault == 2:  # one decreasing pair, anywhere
        i = 1 + pick(B - 1)
        cu[i] = cu[i - 1] - 1 - pick(3)
    elif cu_fault == 3:
        n += 1 + pick(4)
    m = (torch.rand(R, generator=g) < 0.5).float()
    m_fault = pick(4)
    if m_fault:
        m[value_checks.BLOCK + pick(R - value_checks.BLOCK)] = (0.5, 2.0, float("nan"))[m_fault - 1]
    m = m.to((torch.float32, torch.int32)[pick(2)]) if m_fault != 3 else m
    to = dict(device=device)
    return {"targets": (t.to(t_dtype).to(**to), vocab, ignore,
                        None if mask is None else mask.to(**to)),
            "cu_seqlens": (cu.to((torch.int32, torch.int64)[pick(2)]).to(**to), n),
            "mask": (m.to(**to),)}


@pytest.mark.parametrize("seed", range(24))
def test_batched_flags_equal_the_torch_checks(seed, device):
    batch = _case(seed, device)
    for kinds in (("targets", "cu_seqlens", "mask"), ("targets",), ("cu_seqlens", "mask")):
        part = {k: batch[k] for k in kinds}
        got = [bool(v) for v in value_checks.flags(part).tolist()]
        want = _torch_flags(part)
        assert got == want, (seed, kinds, got, want)


def test_a_check_the_kernel_cannot_take_reads_once_too(device):
    """A second check of a kind already batched, or a float64 mask, makes its flag with torch
    ops; the one read raises the first failure in the order the checks were made."""
    good = torch.randint(0, 7, (5,), device=device)
    bad = good.clone()
    bad[3] = 7
    with Launches() as calls, check.one_read():
        check.targets_in_range(good, 7)
        check.targets_in_range(good, 7)  # the same kind again: torch ops
    assert calls.host_reads == 1 and calls.kernels.count("_value_checks_kernel") == 1
    assert "aten.lt" in calls.kernels  # (the error path reads more, for its message)
    with pytest.raises(ValueError, match="found 7"):
        with check.one_read():
            check.targets_in_range(good, 7)
            check.targets_in_range(bad, 7)
    with pytest.raises(ValueError, match="found -1"):
        with check.one_read():
            check.targets_in_range(bad.where(bad < 7, -1), 7)  # first: raised first
            check.targets_in_range(bad, 7)
    mask = torch.tensor([[0.0, 1.0]], dtype=torch.float64, device=device)
    with Launches() as calls, check.one_read():
        check.mask_ok(mask, (1, 2))
    assert calls.host_reads == 1 and "_value_checks_kernel" not in calls.kernels
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        with check.one_read():
            check.mask_ok(mask * 0.5, (1, 2))


@pytest.mark.parametrize("padded", [False, True])
def test_checks_on_one_kernel(padded, monkeypatch, device):
    """With the value checks on (the default), a call's checks cost a zeroed flags buffer, one
    kernel and one read, before the loss's two kernels."""
    monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "1")
    b = loss_batch([3, 0, 5, 2], 23, padded=padded, seed=3, device=device)
    with Launches() as fwd:
        tk.tic_loss(b.logits, b.targets, b.old_logprobs, b.advantages, **b.layout_kw)
    assert fwd.kernels == ["aten.zeros", "_value_checks_kernel", "_token_logprobs_fwd_kernel",
                           "_ratio_loss_fwd_kernel"] and fwd.host_reads == 1
    targets = b.targets.masked_fill(~b.layout_kw["mask"], -100) if padded else b.targets
    with Launches() as fwd:
        tk.token_logprobs(b.logits, targets)
    assert fwd.kernels == ["aten.zeros", "_value_checks_kernel", "_token_logprobs_fwd_kernel"]
    assert fwd.host_reads == 1
