"""Op 3: group-normalised advantages (no gradient).

    A_i = (r_i - mean_g) / (std_g + eps)       scale="group"
    A_i = (r_i - mean_g) / (std_batch + eps)   scale="batch"
    A_i = r_i - mean_g                         scale="none" (Dr. GRPO)

One program per reward scans the whole batch for the members of its group (O(B^2) compares,
a few microseconds at RL batch sizes), so arbitrary group ids need no sort, no unique and no
host sync, and every group statistic is summed in the same order: bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .. import validation as check
from ..backend import as_f32, launch, triton_op, use_triton
from ..options import SCALES, STDS

BLOCK_B = 1024
# the kernel's scale switch by name (options.SCALES holds the strings users pass)
BY_GROUP, BY_BATCH = tl.constexpr(SCALES.index("group")), tl.constexpr(SCALES.index("batch"))
SCALE_CODE = {s: i for i, s in enumerate(SCALES)}


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, group_ptr, batch_std_ptr, out_ptr, B, eps,
    SCALE: tl.constexpr, SAMPLE_STD: tl.constexpr, BLOCK: tl.constexpr,
):
    eps = as_f32(eps)
    i = tl.program_id(0)
    gi = tl.load(group_ptr + i)
    ri = tl.load(rewards_ptr + i)
    # Sums run over r - r_i (shifted by this program's own reward), so large rewards with small
    # differences (1e7 and 1e7 + 1) keep their differences exactly in fp32.
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    lo = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    hi = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
    for off in range(0, B, BLOCK):
        j = off + tl.arange(0, BLOCK)
        same = (j < B) & (tl.load(group_ptr + j, mask=j < B, other=0) == gi)
        r = tl.load(rewards_ptr + j, mask=same, other=0.0)
        total += tl.where(same, r - ri, 0.0)
        count += same.to(tl.float32)
        lo = tl.minimum(lo, tl.where(same, r, float("inf")))
        hi = tl.maximum(hi, tl.where(same, r, -float("inf")))
    n = tl.sum(count, 0)
    shifted_mean = tl.sum(total, 0) / n  # mean_g - r_i
    adv = -shifted_mean
    if SCALE == BY_GROUP:
        # second pass: sum of squared deviations from the mean (two passes, not E[r^2] - mean^2)
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, B, BLOCK):
            j = off + tl.arange(0, BLOCK)
            same = (j < B) & (tl.load(group_ptr + j, mask=j < B, other=0) == gi)
            dev = (tl.load(rewards_ptr + j, mask=same, other=0.0) - ri) - shifted_mean
            ss += tl.where(same, dev * dev, 0.0)
        denom = tl.maximum(n - 1.0, 1.0) if SAMPLE_STD else n
        adv = adv / (tl.sqrt(tl.sum(ss, 0) / denom) + eps)
    elif SCALE == BY_BATCH:
        adv = adv / (tl.load(batch_std_ptr) + eps)
    # a group of one, or of equal rewards, gets exactly 0 (not a rounding residue, never NaN);
    # a NaN reward is not "equal" (tl.max / tl.min skip NaN): its group's mean carries it
    equal = (tl.max(hi, 0) == tl.min(lo, 0)) & (shifted_mean == shifted_mean)
    tl.store(out_ptr + i, tl.where(equal, 0.0, adv))


@triton_op("tic_kernels::group_advantages", mutates_args=())
def group_advantages_op(rewards: torch.Tensor, group: torch.Tensor, scale: str,
                        sample_std: bool, eps: float) -> torch.Tensor:
    """(B,) fp32 advantages of fp32 ``rewards`` grouped by int ``group`` ids."""
    B = rewards.numel()
    out = torch.empty(B, dtype=torch.float32, device=rewards.device)
    ddof = 1 if sample_std else 0
    # the batch std in float64 (O(B) work), like the group statistics shifted in the kernel
    batch_std = (rewards.double().std(correction=ddof).float().reshape(1) if B > ddof
                 else rewards.new_zeros(1))
    if B:
        launch(_group_advantages_kernel, (B,),
            rewards.contiguous(), group.contiguous(), batch_std, out, B, eps,
            SCALE=SCALE_CODE[scale], SAMPLE_STD=sample_std, BLOCK=BLOCK_B)
    return out


def group_advantages(rewards, group_size=None, *, group_ids=None, scale="group", std="sample",
                     eps=1e-6, lengths=None, length_normalize=False):
    """Advantages normalised within groups of completions of the same prompt.

    Args:
        rewards: (B,) real tensor (int and bool rewards are converted to float32).
        group_size: G; groups are G consecutive rewards (B must be a multiple of G). Or
        group_ids: (B,) int tensor, equal ids form a group (any values, any order).
        scale: "group" (divide by the group's std), "batch" (by the batch's std) or "none".
        std: "sample" (divide by n - 1, as TRL and verl) or "population" (by n).
        eps: > 0, added to the std.
        lengths, length_normalize: with length_normalize=True, r_i / max(L_i, 1) replaces r_i.

    Returns:
        (B,) float32 (float64 for float64 rewards). A group of one, or of equal rewards, gets
        exactly 0.
    """
    check.choice("scale", scale, SCALES)
    check.choice("std", std, STDS)
    check.positive("eps", eps)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    B = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size or group_ids")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if B % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards {B}")
    else:
        check.int_tensor("group_ids", group_ids)
        check.shape("group_ids", group_ids, (B,), " (one id per reward)")
        check.same_device("rewards", rewards, group_ids=group_ids)
    if length_normalize and lengths is None:
        raise ValueError("length_normalize=True needs lengths")
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"lengths must be an integer or floating tensor, got {lengths.dtype}")
        check.shape("lengths", lengths, (B,), " (one length per reward)")
        check.same_device("rewards", rewards, lengths=lengths)
        with check.one_read():
            check.nonnegative("lengths", lengths)
    if not use_triton(rewards):
        return reference.group_advantages(rewards, group_size, group_ids, scale, std, eps,
                                          lengths, length_normalize)
    r = rewards.detach().float()
    if length_normalize:
        r = r / lengths.clamp(min=1).float()
    if group_ids is None:
        group_ids = torch.arange(B, device=r.device) // group_size
    return group_advantages_op(r, group_ids, scale, std == "sample", float(eps))
