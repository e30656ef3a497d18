"""Op 3: group-normalised advantages (no gradient).

    A_i = (r_i - mean_g) / (std_g + eps)       scale="group"
    A_i = (r_i - mean_g) / (std_batch + eps)   scale="batch"
    A_i = r_i - mean_g                         scale="none" (Dr. GRPO)
"""
from __future__ import annotations

import torch

from . import reference
from . import validation as check


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
    check.choice("scale", scale, check.SCALES)
    check.choice("std", std, check.STDS)
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
        check.shape("lengths", lengths, (B,), " (one length per reward)")
        check.same_device("rewards", rewards, lengths=lengths)
    return reference.group_advantages(rewards, group_size, group_ids, scale, std, eps, lengths,
                                      length_normalize)
