"""tic_kernels' verl policy losses (tic_kernels.integrations.verl) against verl's own code.

"tic_token" must equal verl's compute_policy_loss_vanilla and "tic_gspo" its
compute_policy_loss_gspo (loss, gradient w.r.t. log_prob, verl's metrics), for every
loss_agg_mode of verl's agg_loss, with and without rollout_is_weights and with verl's global
normalisers; "tic" and "tic_upper" equal a plain PyTorch TIC-GRPO loss aggregated by verl's
agg_loss. Inputs: ragged right-padded response masks (one sequence of a single token, one of
the full length), log-ratios placed so that both clip sides and the dual clip are hit.
"""
import ast
import math
import pathlib
import warnings

import pytest
import torch

from conftest import require_extra

core_algos = require_extra("verl.trainer.ppo.core_algos", "verl")
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from tic_kernels.integrations import verl as tkv  # noqa: E402

B, T = 6, 9
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]
DTYPES = [torch.float32, torch.float64]


def make_config(eps_low=0.2, eps_high=0.28, clip_c=3.0, tau_pos=1.0, tau_neg=1.05,
                dro_beta=0.6, clip_cov=(0.05, 0.0, 5.0), kl_cov=(0.1, 0.7),
                **global_batch_info):
    """verl's ActorConfig; clip_cov = (clip_cov_ratio, clip_cov_lb, clip_cov_ub), wide enough
    here that clip_cov cuts one of many candidates among the batch's few tokens; kl_cov =
    (kl_cov_ratio, ppo_kl_coef), a share that penalises a few of them."""
    share, lb, ub = clip_cov
    policy = PolicyLossConfig(dro_beta=dro_beta, clip_cov_ratio=share, clip_cov_lb=lb,
                              clip_cov_ub=ub, kl_cov_ratio=kl_cov[0], ppo_kl_coef=kl_cov[1])
    config = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=eps_low,
                         clip_ratio_high=eps_high, clip_ratio_c=clip_c, ppo_mini_batch_size=4,
                         ppo_micro_batch_size_per_gpu=2, rollout_n=2, tau_pos=tau_pos,
                         tau_neg=tau_neg, policy_loss=policy)
    config.global_batch_info.update(global_batch_info)
    return config


def make_batch(dtype, weights=False):
    """verl's (B, T) inputs. Per-sequence mean log-ratios m_i and advantage signs:
    seq 0 (1 token) m=+0.4, A>0: clipped above; seq 1 (T tokens) m=+1.3, A<0: the dual clip
    (ratio > clip_ratio_c = 3); seq 2 m=-0.4, A<0: clipped below (two-sided only); seq 3
    m=-0.4, A>0: unclipped; seqs 4, 5: noise of std 0.3 per token."""
    lengths = torch.randint(2, T, (B,))
    lengths[0], lengths[1] = 1, T
    mask = torch.arange(T) < lengths[:, None]
    old = -(torch.rand(B, T, dtype=dtype) * 3 + 0.05)
    d = 0.3 * torch.randn(B, T, dtype=dtype)
    for i, m in enumerate([0.4, 1.3, -0.4, -0.4]):
        mean = (d[i] * mask[i]).sum() / lengths[i]
        d[i] += m - mean
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0], dtype=dtype)
    adv_seq = sign * (torch.rand(B, dtype=dtype) * 1.5 + 0.2)
    # verl broadcasts a sequence's advantage over its response, zero on padding
    advantages = adv_seq[:, None] * mask
    log_prob = (old + d).requires_grad_(True)
    w = None
    if weights:  # positive, varying within each sequence, some above tic_kernels' default cap 3
        w = torch.rand(B, T, dtype=dtype) * 1.5 + 0.25
        w[1, 3] = 5.0
    return dict(old_log_prob=old, log_prob=log_prob, advantages=advantages,
                response_mask=mask, rollout_is_weights=w), adv_seq


def call(fn, inputs, loss_agg_mode, config):
    """Calls a verl policy loss the way verl's ppo_loss does (keywords); (loss, grad, metrics)."""
    log_prob = inputs["log_prob"].detach().clone().requires_grad_(True)
    loss, metrics = fn(**{**inputs, "log_prob": log_prob}, loss_agg_mode=loss_agg_mode,
                       config=config)
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


def assert_same(ours, theirs, dtype):
    loss, grad, metrics = ours
    ref_loss, ref_grad, ref_metrics = theirs
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=1e-6, rtol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad.double(), atol=1e-7, rtol=1e-5)
    for key, value in ref_metrics.items():
        assert isinstance(metrics[key], float)
        assert metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_registry_serves_every_loss():
    for name, fn in tkv.LOSS_MODES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
    # a registry that was reset: register() puts them back, quietly and idempotently
    for name in tkv.LOSS_MODES:
        del core_algos.POLICY_LOSS_REGISTRY[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tkv.register()
        tkv.register()
    assert set(tkv.LOSS_MODES) == {"tic", "tic_upper", "tic_gspo", "tic_token", "tic_cispo",
                                   "tic_sapo", "tic_gpg", "tic_dppo_tv", "tic_dppo_kl",
                                   "tic_dro", "tic_geo_mean", "tic_clip_cov", "tic_kl_cov"}
    for name, fn in tkv.LOSS_MODES.items():
        assert core_algos.get_policy_loss_fn(name) is fn


def test_importing_tic_kernels_never_imports_verl():
    """Only tic_kernels/integrations/verl.py imports verl (a static check of every module)."""
    root = pathlib.Path(tkv.__file__).resolve().parents[1]
    for path in root.rglob("*.py"):
        if path == pathlib.Path(tkv.__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            assert not any(n == "verl" or n.startswith("verl.") for n in names), path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("ours,theirs", [("tic_token", "vanilla"), ("tic_gspo", "gspo")])
def test_equals_verl(ours, theirs, weights, dtype):
    inputs, _ = make_batch(dtype, weights)
    # GSPO with its paper's tight band and with the PPO band
    configs = [make_config()] + ([make_config(3e-4, 4e-4)] if ours == "tic_gspo" else [])
    for config in configs:
        for mode in AGG_MODES:
            mine = call(core_algos.get_policy_loss_fn(ours), inputs, mode, config)
            ref = call(core_algos.get_policy_loss_fn(theirs), inputs, mode, config)
            assert_same(mine, ref, dtype)
            assert 0 < ref[2]["actor/pg_clipfrac"] < 1
            if ours == "tic_token":
                assert ref[2]["actor/pg_clipfrac_lower"] > 0  # the dual clip was hit
            assert {"actor/tic_clip_fraction", "actor/tic_ratio_max",
                    "actor/tic_delta_abs_mean", "actor/tic_cap_fraction"} <= set(mine[2])
            if weights:
                assert "actor/tic_rollout_is_mean" in mine[2]
            assert (mine[1][~inputs["response_mask"]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("ours,theirs", [("tic_cispo", "cispo"), ("tic_sapo", "sapo"),
                                         ("tic_gpg", "gpg"), ("tic_dppo_tv", "dppo_tv"),
                                         ("tic_dppo_kl", "dppo_kl"), ("tic_dro", "dro"),
                                         ("tic_geo_mean", "geo_mean")])
def test_objectives_equal_verl(ours, theirs, weights, dtype):
    """verl's cispo, sapo (its tau_pos / tau_neg, seq-mean-token-mean whatever the mode), gpg,
    the DPPOs, dro (its policy_loss.dro_beta) and geo_mean (the rows' mean whatever the mode,
    the weights' geometric mean per sequence): loss, gradient and metrics, every
    loss_agg_mode, with and without weights."""
    inputs, _ = make_batch(dtype, weights)
    # DPPO's trust region on probabilities of about e^-1.5: bounds that some tokens pass
    config = (make_config(0.02, 0.03, clip_c=1.5) if ours.startswith("tic_dppo")
              else make_config(tau_pos=0.8, tau_neg=1.3))
    for mode in AGG_MODES:
        mine = call(core_algos.get_policy_loss_fn(ours), inputs, mode, config)
        ref = call(core_algos.get_policy_loss_fn(theirs), inputs, mode, config)
        assert_same(mine, ref, dtype)
        if ours in ("tic_cispo", "tic_dppo_tv", "tic_dppo_kl", "tic_geo_mean"):
            assert 0 < ref[2]["actor/pg_clipfrac"] < 1
        if ours == "tic_geo_mean":
            assert ref[2]["actor/pg_clipfrac_lower"] > 0
        if ours.startswith("tic_dppo"):
            assert ref[2]["actor/pg_clipfrac_lower"] > 0  # the truncation at clip_ratio_c
        assert (mine[1][~inputs["response_mask"]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
def test_clip_cov_equals_verl(weights, dtype):
    """verl's clip_cov under the same torch random state (its draw of the tokens to cut):
    loss, gradient and metrics for every loss_agg_mode; tokens are cut, and a different
    random state cuts others."""
    inputs, _ = make_batch(dtype, weights)
    config = make_config()
    for mode in AGG_MODES:
        torch.manual_seed(7)
        mine = call(tkv.compute_policy_loss_tic_clip_cov, inputs, mode, config)
        torch.manual_seed(7)
        ref = call(core_algos.get_policy_loss_fn("clip_cov"), inputs, mode, config)
        assert_same(mine, ref, dtype)
        assert 0 < ref[2]["actor/pg_clipfrac"] < 0.5
    draws = []
    for seed in range(7, 13):
        torch.manual_seed(seed)
        draws.append(call(tkv.compute_policy_loss_tic_clip_cov, inputs, "token-mean", config)[1])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    with pytest.raises(ValueError, match="clip_cov_ratio must be > 0"):
        call(tkv.compute_policy_loss_tic_clip_cov, inputs, "token-mean",
             make_config(clip_cov=(0.0, 0.0, 5.0)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
def test_kl_cov_equals_verl(weights, dtype):
    """verl's kl_cov (its top-k covariance tokens under ppo_kl_coef |log-ratio|): loss,
    gradient and metric for every loss_agg_mode, at verl's default share (one token), at one
    that penalises several, and with both keys None (verl's function then takes 0.0002 and
    1.0); the penalty changes the loss; a share of 0 raises."""
    inputs, _ = make_batch(dtype, weights)
    unpenalised = call(tkv.compute_policy_loss_tic_kl_cov, inputs, "token-mean",
                       make_config(kl_cov=(0.3, 0.0)))
    for kl_cov in ((0.3, 0.7), (0.0002, 0.1), (None, None)):
        config = make_config(kl_cov=kl_cov)
        for mode in AGG_MODES:
            mine = call(tkv.compute_policy_loss_tic_kl_cov, inputs, mode, config)
            ref = call(core_algos.get_policy_loss_fn("kl_cov"), inputs, mode, config)
            assert_same(mine, ref, dtype)
            if mode == "token-mean":  # the penalised tokens' share, one of them at least
                assert mine[2]["actor/tic_clip_fraction"] > 0
                assert not torch.allclose(mine[0], unpenalised[0])
    with pytest.raises(ValueError, match=r"config\.policy_loss\.kl_cov_ratio .* in \(0, 1\]"):
        call(tkv.compute_policy_loss_tic_kl_cov, inputs, "token-mean",
             make_config(kl_cov=(0.0, 1.0)))


@pytest.mark.parametrize("ours,theirs", [("tic_token", "vanilla"), ("tic_gspo", "gspo"),
                                         ("tic_cispo", "cispo"), ("tic_sapo", "sapo"),
                                         ("tic_gpg", "gpg"), ("tic_dppo_kl", "dppo_kl"),
                                         ("tic_dro", "dro"), ("tic_geo_mean", "geo_mean"),
                                         ("tic_kl_cov", "kl_cov")])
def test_global_batch_normalisers(ours, theirs):
    """verl's gradient-accumulation normalisers (config.global_batch_info, as ppo_loss sets
    them): dp_size, batch_num_tokens, global_batch_size, loss_scale_factor."""
    inputs, _ = make_batch(torch.float32, weights=True)
    config = make_config(dp_size=2, batch_num_tokens=97, global_batch_size=13,
                         loss_scale_factor=16)
    for mode in AGG_MODES:
        mine = call(core_algos.get_policy_loss_fn(ours), inputs, mode, config)
        ref = call(core_algos.get_policy_loss_fn(theirs), inputs, mode, config)
        assert_same(mine, ref, torch.float32)


def test_omegaconf_config():
    """verl also hands its losses an omegaconf DictConfig (clip ratios, global_batch_info)."""
    from omegaconf import OmegaConf
    config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28,
                                   clip_ratio_c=2.5, global_batch_info=dict(dp_size=1)))
    inputs, _ = make_batch(torch.float32, weights=True)
    for mode in ("token-mean", "seq-mean-token-sum-norm"):
        mine = call(tkv.compute_policy_loss_tic_token, inputs, mode, config)
        ref = call(core_algos.compute_policy_loss_vanilla, inputs, mode, config)
        assert_same(mine, ref, torch.float32)


def plain_tic(inputs, adv_seq, loss_agg_mode, config, upper):
    """TIC-GRPO in plain PyTorch: one ratio exp(sum of the log-ratios) per sequence, clipped,
    dual-clipped for A < 0, broadcast over the response, times the rollout weights, aggregated
    by verl's agg_loss; and verl's metrics with every token carrying its sequence's decision."""
    log_prob, old, mask = inputs["log_prob"], inputs["old_log_prob"], inputs["response_mask"]
    log_prob = log_prob.detach().clone().requires_grad_(True)
    m = mask.to(log_prob.dtype)
    delta = ((log_prob - old) * m).sum(-1)
    x = torch.exp(delta.clamp(-20, 20))
    hi = 1 + config.clip_ratio_high
    xc = x.clamp(max=hi) if upper else x.clamp(1 - config.clip_ratio_low, hi)
    j = torch.minimum(x * adv_seq, xc * adv_seq)
    lifted = (adv_seq < 0) & (j < config.clip_ratio_c * adv_seq)
    j = torch.where(adv_seq < 0, torch.maximum(j, config.clip_ratio_c * adv_seq), j)
    loss_mat = -j[:, None] * m
    if inputs["rollout_is_weights"] is not None:
        loss_mat = loss_mat * inputs["rollout_is_weights"]
    loss = core_algos.agg_loss(loss_mat, mask, loss_agg_mode, **config.global_batch_info)
    loss.backward()
    lengths, n = m.sum(-1), m.sum()
    clipped = (x * adv_seq > xc * adv_seq).to(m.dtype)
    metrics = {"actor/pg_clipfrac": (clipped * lengths).sum() / n,
               "actor/ppo_kl": -delta.detach().sum() / n,
               "actor/pg_clipfrac_lower": (lifted.to(m.dtype) * lengths).sum() / n}
    return loss.detach(), log_prob.grad, metrics, delta.detach()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("name", ["tic", "tic_upper"])
def test_tic_equals_plain_pytorch(name, weights, dtype):
    inputs, adv_seq = make_batch(dtype, weights)
    config = make_config()
    for mode in AGG_MODES:
        mine = call(core_algos.get_policy_loss_fn(name), inputs, mode, config)
        *ref, delta = plain_tic(inputs, adv_seq, mode, config, upper=name == "tic_upper")
        assert_same(mine, ref, dtype)
        assert ref[2]["actor/pg_clipfrac_lower"] > 0
        assert 0 < ref[2]["actor/pg_clipfrac"] < 1
        assert mine[2]["actor/tic_delta_abs_mean"] == pytest.approx(
            delta.abs().mean().item(), rel=1e-5)
        assert mine[2]["actor/tic_ratio_max"] == pytest.approx(
            delta.clamp(max=20).exp().max().item(), rel=1e-5)
    # the two clips differ exactly where A < 0 and the ratio is below 1 - clip_ratio_low
    # (seq 2 among others)
    if name == "tic_upper" and not weights:
        two_sided = call(core_algos.get_policy_loss_fn("tic"), inputs, "token-mean", config)
        upper = call(core_algos.get_policy_loss_fn("tic_upper"), inputs, "token-mean", config)
        differs = (two_sided[1] != upper[1]).any(-1)
        expected = (adv_seq < 0) & (delta < math.log(1 - config.clip_ratio_low))
        assert differs.tolist() == expected.tolist() and expected[2]


def test_gspo_sequence_level_weights_match_both_views():
    """Weights constant over each sequence (verl's rollout_is="sequence"): tic_kernels'
    sequence_mean definition and verl's GSPO-token form agree; so must tic_gspo and gspo."""
    inputs, _ = make_batch(torch.float64, weights=True)
    inputs["rollout_is_weights"] = (torch.rand(B, 1, dtype=torch.float64) + 0.5).expand(B, T)
    config = make_config(3e-4, 4e-4)
    for mode in ("token-mean", "seq-mean-token-mean"):
        mine = call(tkv.compute_policy_loss_tic_gspo, inputs, mode, config)
        ref = call(core_algos.compute_policy_loss_gspo, inputs, mode, config)
        assert_same(mine, ref, torch.float64)


@pytest.mark.parametrize("name", list(tkv.LOSS_MODES))
def test_advantages_varying_within_a_sequence(name, monkeypatch):
    inputs, _ = make_batch(torch.float32)
    inputs["advantages"] = inputs["advantages"].clone()
    inputs["advantages"][1, 4] += 0.5  # as GAE gives
    with pytest.raises(ValueError, match="one advantage per sequence.*sequence 1"):
        call(core_algos.get_policy_loss_fn(name), inputs, "token-mean", make_config())
    # advantages on the padding are never read
    inputs, _ = make_batch(torch.float32)
    inputs["advantages"] = inputs["advantages"] + (~inputs["response_mask"]) * 7.0
    call(core_algos.get_policy_loss_fn(name), inputs, "token-mean", make_config())
    if name == "tic":  # a value check, skipped like tic_kernels' own
        monkeypatch.setenv("TIC_KERNELS_CHECK_VALUES", "0")
        inputs["advantages"][1, 4] += 0.5
        loss, _, _ = call(tkv.compute_policy_loss_tic, inputs, "token-mean", make_config())
        assert math.isfinite(loss.item())


def test_unsupported_aggregation_and_missing_normalisers():
    inputs, _ = make_batch(torch.float32)
    fn = core_algos.get_policy_loss_fn("tic")
    with pytest.raises(ValueError, match="loss_agg_mode='seq-mean-token-max'.*accepted values"):
        call(fn, inputs, "seq-mean-token-max", make_config())
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        call(fn, inputs, "token-mean", make_config(dp_size=2))
    with pytest.raises(ValueError, match="global_batch_size is required"):
        call(fn, inputs, "seq-mean-token-mean", make_config(dp_size=2))
    with pytest.raises(ValueError, match="needs the actor config"):
        call(fn, inputs, "token-mean", None)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        call(fn, inputs, "token-mean", make_config(clip_c=1.0))
    for beta in (None, 0.0):  # verl's dro: "policy_loss.dro_beta must be a positive value"
        with pytest.raises(ValueError, match=r"^config.policy_loss.dro_beta .* must be a finite"
                                             r" number > 0"):
            call(tkv.compute_policy_loss_tic_dro, inputs, "token-mean",
                 make_config(dro_beta=beta))


def test_loss_scale_factor_below_the_longest_response():
    """verl accepts any loss_scale_factor > 0 for seq-mean-token-sum-norm, one shorter than
    a response included: so does the adapter, with verl's value and gradient."""
    inputs, _ = make_batch(torch.float32, weights=True)
    config = make_config(loss_scale_factor=4)  # responses run to T = 9 tokens
    for ours, theirs in [("tic_token", "vanilla"), ("tic_gspo", "gspo")]:
        mine = call(core_algos.get_policy_loss_fn(ours), inputs, "seq-mean-token-sum-norm",
                    config)
        ref = call(core_algos.get_policy_loss_fn(theirs), inputs, "seq-mean-token-sum-norm",
                   config)
        assert_same(mine, ref, torch.float32)
    with pytest.raises(ValueError, match=r"config.global_batch_info\['loss_scale_factor'\] "
                                         "must be a finite number > 0"):
        call(core_algos.get_policy_loss_fn("tic"), inputs, "seq-mean-token-sum-norm",
             make_config(loss_scale_factor=0))


@pytest.mark.parametrize("bad, message", [
    (dict(response_mask=2), r"^response_mask must hold only 0 and 1"),
    (dict(rollout_is_weights=-1.0), r"^rollout_is_weights must be finite and >= 0"),
    (dict(rollout_is_weights="shape"), r"^rollout_is_weights has shape \(6, 8\)"),
    (dict(old_log_prob="shape"), r"^old_log_prob has shape \(6, 8\)"),
    (dict(old_log_prob="int"), r"^old_log_prob must be a floating"),
    (dict(config="eps_low"), r"^config.clip_ratio_low must lie in \[0, 1\)"),
])
def test_errors_name_verl_arguments(bad, message):
    """An error raised through the adapter names verl's argument (response_mask,
    rollout_is_weights, old_log_prob, config.clip_ratio_low), not tic_kernels' (mask,
    rollout_weights, old_logprobs, eps_low)."""
    inputs, _ = make_batch(torch.float32, weights=True)
    config = make_config()
    (key, how), = bad.items()
    if key == "config":
        config = make_config(eps_low=1.5)
    elif how == "shape":
        inputs[key] = inputs[key][:, :-1]
    elif how == "int":
        inputs[key] = inputs[key].long()
    elif key == "response_mask":
        inputs[key] = inputs[key].long() * 2
    else:
        inputs[key] = inputs[key].clone()
        inputs[key][0, 0] = how
    with pytest.raises((TypeError, ValueError), match=message):
        call(core_algos.get_policy_loss_fn("tic_token"), inputs, "token-mean", config)
