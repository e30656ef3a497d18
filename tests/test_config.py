"""The losses' configuration (tic_kernels.config.LossConfig): it travels to the ops as one
string, which must give back exactly the config it came from; string options equal to an
accepted value (an enum's member, a numpy string) work as that value on both paths."""
import enum
import math

import numpy as np
import pytest
import torch

import tic_kernels as tk
from tic_kernels.config import LossConfig
from tic_kernels.testing import LOSS_TOL, loss_batch, tolerance


@pytest.mark.parametrize("config", [
    LossConfig(),
    LossConfig(ratio="token", clip_mode="upper", eps_low=0.0, eps_high=10.0, dual_clip=3.0,
               max_log_ratio=60.0, aggregation="token-mean", beta=0.04, entropy_coef=-0.01,
               temperature=0.7, num_tokens=123.0, ref=True, rollout="sequence_mask",
               rollout_is_min=0.25, rollout_is_max=math.inf),
    LossConfig(ratio="none", aggregation="seq-mean-token-sum-norm", max_len=4096.0,
               num_sequences=1e-300, rollout="weights", eps_high=0.1 + 0.2),
])
def test_encode_decode_round_trip(config):
    assert LossConfig.decode(config.encode()) == config


class _Ratio(str, enum.Enum):
    TOKEN = "token"


@pytest.mark.parametrize("as_given", [_Ratio.TOKEN, np.str_("token")])
def test_string_subclasses_are_their_value(as_given, path, device):
    batch = loss_batch([3, 0, 4], 13, device=device, seed=2)
    sampler = dict(rollout_logprobs=batch.old_logprobs - 0.1)
    want = tk.tic_loss(batch.logits, batch.targets, batch.old_logprobs, batch.advantages,
                       ratio="token", rollout_is="token_mask", **sampler, **batch.layout_kw)
    got = tk.tic_loss(batch.logits, batch.targets, batch.old_logprobs, batch.advantages,
                      ratio=as_given, rollout_is=np.str_("token_mask"), **sampler,
                      **batch.layout_kw)
    torch.testing.assert_close(got.loss, want.loss, **tolerance(LOSS_TOL))
