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


def _keywords(**changes):
    """LossConfig.of's keywords at the public defaults, with ``changes``."""
    kw = dict(ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
              dual_clip=None, max_log_ratio=20.0, aggregation=None, beta=0.0, entropy_coef=0.0,
              temperature=1.0, num_tokens=None, num_sequences=None, max_len=None,
              ref_logprobs=None, rollout_logprobs=None, rollout_is=None, rollout_is_max=None,
              rollout_is_min=None, rollout_weights=None, mask=None, objective="clip",
              delta=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, dro_beta=None, vespo_k_pos=2.0,
              vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_cov_ratio=None,
              kl_cov_coef=None, kl_bias_correction=False, off_policy_mask_threshold=None,
              top_entropy_quantile=1.0)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("passes, fails, error", [
    # what differs: whether a tensor is given
    (dict(beta=0.1, ref_logprobs=torch.zeros(3)), dict(beta=0.1), "needs ref_logprobs"),
    (dict(rollout_is="token_mask", rollout_logprobs=torch.zeros(3)),
     dict(rollout_is="token_mask"), "needs rollout_logprobs"),
    (dict(aggregation="seq-mean-token-sum-norm", mask=torch.ones(2, 3)),
     dict(aggregation="seq-mean-token-sum-norm"), "needs max_len"),
    # a value equal to the one that passed, of another type
    (dict(beta=0.1, ref_logprobs=torch.zeros(3), kl_bias_correction=True),
     dict(beta=0.1, ref_logprobs=torch.zeros(3), kl_bias_correction=1), "True or False"),
])
def test_remembered_configs_are_checked_again(passes, fails, error):
    """LossConfig.of remembers the configs of calls that passed; a call that differs from one
    of them only where the key must tell them apart is checked, and fails."""
    config, _ = LossConfig.of(**_keywords(**passes))
    again, _ = LossConfig.of(**_keywords(**passes))
    assert again is config  # remembered
    with pytest.raises((ValueError, TypeError), match=error):
        LossConfig.of(**_keywords(**fails))


def test_remembered_config_returns_this_calls_tensor():
    sampler, other = torch.zeros(3), torch.ones(3)
    for rollout_logprobs in (sampler, other):
        config, tensor = LossConfig.of(**_keywords(rollout_is="token_mask",
                                                   rollout_logprobs=rollout_logprobs))
        assert tensor is rollout_logprobs and config.rollout == "token_mask"
    config, tensor = LossConfig.of(**_keywords(rollout_weights=other))
    assert tensor is other and config.rollout == "weights"
