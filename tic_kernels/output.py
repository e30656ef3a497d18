"""What the losses return."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    """``loss``: scalar float32 tensor with autograd. ``stats``: dict of detached float32 scalars:
    clip_fraction, ratio_mean, ratio_max, cap_fraction, delta_abs_mean, logp_mean, and
    entropy_mean (when entropy is computed) and kl_mean (when ref_logprobs is given); with a
    sampler correction (op 4b) rollout_is_mean, rollout_is_max, rollout_is_min,
    rollout_masked_fraction, rollout_ess, and rollout_kl (from rollout_logprobs)."""
    loss: torch.Tensor
    stats: dict
