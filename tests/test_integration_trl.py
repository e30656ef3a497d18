"""The TRL adapter (tic_kernels.integrations.trl.TICGRPOTrainer) with the real TRL on the CPU: a
tiny random-init Llama, a WordLevel tokenizer built in memory, a generated prompt dataset.
Training runs end to end with the trajectory ratio; on hand-made inputs the adapter's loss and
gradients equal TRL's own GRPOTrainer loss for the loss types both implement (token and sequence
level, KL, entropy bonus, on-policy, gradient accumulation, vLLM's sampler correction); the
options the adapter does not implement are refused."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import require_extra

trl = require_extra("trl", "trl")
datasets = require_extra("datasets", "trl")

import tic_kernels as tk  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from tic_kernels.integrations.trl import TICGRPOTrainer, fused_head_refusal  # noqa: E402

VOCAB = 32
B, P, C = 4, 3, 5  # completions, prompt length, completion length


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def dataset():
    n = VOCAB - 3
    return datasets.Dataset.from_dict(
        {"prompt": [" ".join(f"w{(3 * i + j) % n}" for j in range(3)) for i in range(8)]})


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _reward(completions, **kwargs):
    return [float(c.count("w1")) - 0.1 * len(c.split()) for c in completions]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                per_device_train_batch_size=B, num_generations=B, max_completion_length=C,
                max_steps=2, logging_steps=1, learning_rate=1e-3, seed=0)
    return GRPOConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# 1. Real training
def test_trains_with_trajectory_ratio(tmp_path, tokenizer, dataset):
    model = _model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = _config(tmp_path, importance_sampling_level="trajectory", loss_type="grpo",
                   num_iterations=2)
    trainer = TICGRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    assert trainer._tic_fused, trainer._tic_fused_refusal
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    for name in ("clip_ratio/region_mean", "tic/ratio_mean", "tic/ratio_max", "tic/cap_fraction",
                 "tic/delta_abs_mean"):
        assert all(name in h and math.isfinite(h[name]) for h in logs), name
    # the second step re-uses the first step's completions (num_iterations=2): off-policy ratios
    assert logs[1]["tic/delta_abs_mean"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# 2./3. The adapter's loss equals TRL's on the same inputs
def _pair(tmp_path, tokenizer, dataset, fused=None, log_entropy=False, **kw):
    """TRL's trainer and the adapter on two copies of one model, with one config (float32:
    GRPOConfig's default bf16=True would run both under bf16 autocast)."""
    kw.setdefault("bf16", False)
    model = _model()
    ours = TICGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward,
                          args=_config(tmp_path / "tic", **kw), train_dataset=dataset,
                          processing_class=tokenizer, fused_lm_head=fused,
                          log_entropy=log_entropy)
    theirs = GRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path / "trl", **kw),
                         train_dataset=dataset, processing_class=tokenizer)
    return theirs, ours


def _inputs(trainer, seed=0, noise=0.35):
    """A micro-batch as TRL's generation hands it to the loss: left-padded prompts, right-padded
    completions of lengths 5, 3, 1, 4, and old log-probs off the current ones by a per-row
    offset plus per-token noise, so that ratios differ from 1 and some clip (on both sides)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    prompt_ids[0, 0] = 0
    completion_mask = (torch.arange(C) < torch.tensor([5, 3, 1, 4])[:, None]).long()
    completion_ids = torch.randint(3, VOCAB, (B, C), generator=g) * completion_mask
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), C)
    offset = torch.tensor([0.8, -0.6, 0.8, -0.6])[:, None]  # ratio up where A > 0, down where A < 0
    old = (logp - noise * (offset + 0.6 * torch.randn(B, C, generator=g))) * completion_mask
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2]),
            "num_items_in_batch": completion_mask.sum(),
            "old_per_token_logps": old, "_logp": logp}


def _loss_and_grads(trainer, inputs, accumulation):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = accumulation
    inputs = {k: v for k, v in inputs.items() if not k.startswith("_")}
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in trainer.model.named_parameters()
                           if p.grad is not None}


def _assert_same(theirs, ours, inputs, accumulation=1):
    want, want_grads = _loss_and_grads(theirs, inputs, accumulation)
    got, got_grads = _loss_and_grads(ours, inputs, accumulation)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-3, atol=1e-6, msg=k)
    return want


CASES = {  # name: (GRPOConfig keywords, accumulation steps)
    "dapo-token": (dict(loss_type="dapo", importance_sampling_level="token",
                        epsilon_high=0.28), 1),
    "dapo-token-accumulate": (dict(loss_type="dapo", importance_sampling_level="token",
                                   gradient_accumulation_steps=2, steps_per_generation=4), 2),
    "grpo-token-accumulate": (dict(loss_type="grpo", importance_sampling_level="token"), 2),
    "bnpo-token": (dict(loss_type="bnpo", importance_sampling_level="token"), 1),
    "dr_grpo-token": (dict(loss_type="dr_grpo", importance_sampling_level="token"), 2),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-2,
                  epsilon_high=4e-2), 1),
    "dapo-entropy-bonus": (dict(loss_type="dapo", importance_sampling_level="token",
                                entropy_coef=0.05), 2),
    "cispo-token": (dict(loss_type="cispo", importance_sampling_level="token",
                         epsilon_high=1.3), 2),
    "cispo-sequence": (dict(loss_type="cispo", importance_sampling_level="sequence",
                            epsilon_high=1.05), 1),
    "sapo-token": (dict(loss_type="sapo", importance_sampling_level="token",
                        sapo_temperature_pos=0.8, sapo_temperature_neg=1.4), 2),
    "sapo-sequence": (dict(loss_type="sapo", importance_sampling_level="sequence"), 1),
    "dapo-delta": (dict(loss_type="dapo", importance_sampling_level="token", delta=1.1), 1),
    "grpo-delta-sequence": (dict(loss_type="grpo", importance_sampling_level="sequence",
                                 delta=1.05), 2),
    "luspo-sequence": (dict(loss_type="luspo", importance_sampling_level="sequence",
                            epsilon=3e-2, epsilon_high=4e-2), 2),
    "luspo-token-delta": (dict(loss_type="luspo", importance_sampling_level="token",
                               delta=1.1), 1),
    "vespo-token": (dict(loss_type="vespo", importance_sampling_level="token",
                         gradient_accumulation_steps=2, steps_per_generation=4), 2),
    "vespo-sequence": (dict(loss_type="vespo", importance_sampling_level="sequence",
                            vespo_k_pos=1.5, vespo_lambda_pos=1.0, vespo_k_neg=0.5,
                            vespo_lambda_neg=4.0), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_equals_trl(tmp_path, tokenizer, dataset, case):
    kw, accumulation = CASES[case]
    theirs, ours = _pair(tmp_path, tokenizer, dataset, **kw)
    inputs = _inputs(theirs)
    _assert_same(theirs, ours, inputs, accumulation)
    if case == "dapo-token":  # some tokens clip on each side of the band: the clip is exercised
        ratio = (inputs["_logp"] - inputs["old_per_token_logps"]).exp()
        A, on = inputs["advantages"][:, None], inputs["completion_mask"] > 0
        assert ((ratio > 1.28) & (A > 0) & on).any() and ((ratio < 0.8) & (A < 0) & on).any()
        assert ((ratio < 1.28) & (ratio > 0.8) & on).any()
    metrics = ours._metrics["train"]
    if kw["loss_type"] not in ("cispo", "sapo", "vespo"):
        assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(
            theirs._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)
    if kw["loss_type"] == "cispo" and kw["importance_sampling_level"] == "token":
        ratio = (inputs["_logp"] - inputs["old_per_token_logps"]).exp()
        on = inputs["completion_mask"] > 0
        assert ((ratio > kw["epsilon_high"]) & on).any() and ((ratio < kw["epsilon_high"]) & on).any()
    if "entropy_coef" in kw:
        for name in ("entropy", "policy_loss"):
            assert metrics[name][-1] == pytest.approx(theirs._metrics["train"][name][-1],
                                                      rel=1e-4, abs=1e-6), name


def test_loss_equals_trl_logits_path_kl_on_policy(tmp_path, tokenizer, dataset):
    """The logits path (fused_lm_head=False), the k3 KL to a reference policy, and the on-policy
    case where TRL passes no old log-probs (the ratio is exp(logp - sg(logp)))."""
    kw = dict(loss_type="grpo", importance_sampling_level="token", use_bias_correction_kl=False)
    for fused in (False, True):
        theirs, ours = _pair(tmp_path, tokenizer, dataset, fused=fused, **kw)
        assert ours._tic_fused is fused
        inputs = _inputs(theirs)
        inputs["ref_per_token_logps"] = inputs["_logp"] - 0.2 * inputs["completion_mask"]
        theirs.beta = ours.beta = 0.04
        _assert_same(theirs, ours, inputs)
        assert ours._metrics["train"]["kl"][-1] == pytest.approx(
            theirs._metrics["train"]["kl"][-1], rel=1e-4)
        del inputs["old_per_token_logps"]
        _assert_same(theirs, ours, inputs, accumulation=2)


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "sequence"),
                                              ("sapo", "token"), ("cispo", "token"),
                                              ("vespo", "token")])
def test_bias_corrected_kl_equals_trl(tmp_path, tokenizer, dataset, loss_type, level):
    """TRL 1.16's default use_bias_correction_kl=True with beta != 0: the k3 KL times the
    importance ratio (not detached), and TRL's kl metric of it."""
    kw = dict(loss_type=loss_type, importance_sampling_level=level)
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.3
    theirs, ours = _pair(tmp_path, tokenizer, dataset, **kw)
    assert theirs.args.use_bias_correction_kl
    theirs.beta = ours.beta = 0.04  # after construction: no reference model to load
    inputs = _inputs(theirs)
    inputs["ref_per_token_logps"] = inputs["_logp"] - 0.3 * inputs["completion_mask"]
    _assert_same(theirs, ours, inputs, accumulation=2)
    assert ours._metrics["train"]["kl"][-1] == pytest.approx(
        theirs._metrics["train"]["kl"][-1], rel=1e-4)


def test_trajectory_loss_is_tic_loss_on_trl_logprobs(tmp_path, tokenizer, dataset):
    """importance_sampling_level="trajectory" has no TRL counterpart: the adapter's loss is
    tic_kernels' trajectory loss on TRL's own log-probs, normalised as TRL's grpo (here through
    the log-probs route that log_entropy=True takes, logging TRL's entropy metric)."""
    theirs, ours = _pair(tmp_path, tokenizer, dataset, log_entropy=True, loss_type="grpo",
                         importance_sampling_level="trajectory")
    inputs = _inputs(theirs, noise=0.1)
    got, _ = _loss_and_grads(ours, inputs, accumulation=2)
    with torch.no_grad():
        _, entropy, _ = theirs._get_per_token_logps_and_entropies(
            theirs.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), C,
            compute_entropy=True)
    on = inputs["completion_mask"] > 0
    assert ours._metrics["train"]["entropy"][-1] == pytest.approx(entropy[on].mean().item(),
                                                                  rel=1e-4)
    mask = inputs["completion_mask"].bool()
    want = tk.tic_loss_from_logprobs(inputs["_logp"], inputs["old_per_token_logps"],
                                     inputs["advantages"], mask=mask, ratio="trajectory",
                                     eps_low=0.2, eps_high=0.2,
                                     aggregation="seq-mean-token-mean", num_sequences=B)
    torch.testing.assert_close(got, want.loss / 2, rtol=1e-4, atol=1e-6)
    assert ours._metrics["train"]["tic/ratio_max"][-1] == pytest.approx(
        want.stats["ratio_max"].item(), rel=1e-4)


def _trl_importance_sampling_ratio(old, sampler, mask, mode, lo, hi):
    """TRL 1.16's vLLM importance-sampling weight (_generate_and_score_completions)."""
    diff = torch.nan_to_num((old - sampler) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    w = diff.exp()
    if mode.endswith("truncate"):
        return w.clamp(min=lo, max=hi)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return w.masked_fill((w < lo) | (w > hi), 0.0)


@pytest.mark.parametrize("loss_type,mode,lo,hi", [
    ("dapo", "token_truncate", None, 1.2),
    ("dapo", "token_truncate", 0.95, None),  # TRL: no upper bound
    ("dapo", "sequence_mask", 0.9, None),
    ("dapo", "token_mask", 0.8, 1.25),
    ("dapo", "sequence_truncate", 0.9, 1.1),
    ("dapo", "sequence_mask", None, 1.5),
    # vespo: the weights enter its trajectory weight instead of multiplying the loss
    ("vespo", "token_truncate", None, 1.2),
    ("vespo", "token_mask", 0.8, 1.25)])
def test_sampler_correction_equals_trl(tmp_path, tokenizer, dataset, loss_type, mode, lo, hi):
    theirs, ours = _pair(tmp_path, tokenizer, dataset, loss_type=loss_type,
                         importance_sampling_level="token")
    inputs = _inputs(theirs)
    g = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"]
    old = inputs["old_per_token_logps"]
    # wider without an upper bound: weights above the default bound 3 must stay unbounded
    sampler = old + (0.15 if hi is not None else 0.8) * torch.randn(B, C, generator=g) * mask
    sampler[0, 1] = float("nan")  # a token vLLM could not score: no correction
    inputs["sampling_per_token_logps"] = sampler
    inputs["importance_sampling_ratio"] = _trl_importance_sampling_ratio(old, sampler, mask,
                                                                         mode, lo, hi)
    for t in (theirs, ours):
        t.use_vllm = t.vllm_importance_sampling_correction = True
        t.vllm_importance_sampling_mode = mode
        t.vllm_importance_sampling_clip_min, t.vllm_importance_sampling_clip_max = lo, hi
    weights = inputs["importance_sampling_ratio"].expand(B, C)[mask > 0]
    assert (weights != 1).any() and (not mode.endswith("mask") or (weights == 0).any())
    assert hi is not None or (weights > 3).any()
    want = _assert_same(theirs, ours, inputs)
    assert math.isfinite(ours._metrics["train"]["tic/rollout_ess"][-1])
    # without the sampler's log-probs the adapter applies TRL's precomputed weights
    del inputs["sampling_per_token_logps"]
    got, _ = _loss_and_grads(ours, inputs, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type, level, sampler", [("dapo", "token", False),
                                                       ("grpo", "sequence", False),
                                                       ("dapo", "token", True)])
def test_off_policy_mask_equals_trl(tmp_path, tokenizer, dataset, loss_type, level, sampler):
    """off_policy_mask_threshold (OPSM): a threshold between the two negative-advantage rows'
    drifts drops one and keeps the other; the drift is against the old log-probs, or the
    sampler's with vLLM's correction on."""
    theirs, ours = _pair(tmp_path, tokenizer, dataset, loss_type=loss_type,
                         importance_sampling_level=level)
    inputs = _inputs(theirs)
    mask = inputs["completion_mask"]
    base = inputs["old_per_token_logps"]
    if sampler:
        g = torch.Generator().manual_seed(3)
        base = base + 0.3 * torch.randn(B, C, generator=g) * mask
        inputs["sampling_per_token_logps"] = base
        inputs["importance_sampling_ratio"] = _trl_importance_sampling_ratio(
            inputs["old_per_token_logps"], base, mask, "token_truncate", None, 2.0)
        for t in (theirs, ours):
            t.use_vllm = t.vllm_importance_sampling_correction = True
            t.vllm_importance_sampling_mode = "token_truncate"
            t.vllm_importance_sampling_clip_min, t.vllm_importance_sampling_clip_max = None, 2.0
    drift = ((base - inputs["_logp"]) * mask).sum(-1) / mask.sum(-1)
    threshold = float(drift[[1, 3]].mean())  # rows 1 and 3 have A < 0
    assert (drift[1] - threshold) * (drift[3] - threshold) < 0
    for t in (theirs, ours):
        t.off_policy_mask_threshold = t.args.off_policy_mask_threshold = threshold
    _assert_same(theirs, ours, inputs, accumulation=2)
    if sampler:  # the sampler's log-probs without the correction: refused, not misread
        ours.vllm_importance_sampling_correction = False
        with pytest.raises(ValueError, match="off_policy_mask_threshold against the sampler"):
            _loss_and_grads(ours, inputs, 1)


@pytest.mark.parametrize("route", ["tic", "trl"])
@pytest.mark.parametrize("case", ["dapo-token", "grpo-sequence-entropy-bonus",
                                  "dapo-token-vllm", "cispo-token-kl", "vespo-token-vllm",
                                  "dapo-token-vllm-opsm"])
def test_top_entropy_quantile_equals_trl(tmp_path, tokenizer, dataset, case, route):
    """top_entropy_quantile < 1: the policy term on the high-entropy tokens only, the KL and the
    normalisers on every token, the entropy bonus over the kept tokens; with vLLM's importance
    weights, vespo and the off-policy mask against the sampler too. Route "tic": tic_kernels'
    selection on the device (one process); "trl": TRL's gathered mask as a per-token weight
    (the route of several processes), which refuses vespo and the off-policy mask against the
    sampler."""
    loss_type, level = case.split("-")[:2]
    kw = dict(loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=0.4)
    if "entropy-bonus" in case:
        kw["entropy_coef"] = 0.05
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.3
    theirs, ours = _pair(tmp_path, tokenizer, dataset, **kw)
    assert not ours._tic_trl_entropy_mask  # one process
    ours._tic_trl_entropy_mask = route == "trl"
    inputs = _inputs(theirs)
    if "vllm" in case:
        mask, old = inputs["completion_mask"], inputs["old_per_token_logps"]
        g = torch.Generator().manual_seed(5)
        sampler = old + 0.2 * torch.randn(B, C, generator=g) * mask
        inputs["sampling_per_token_logps"] = sampler
        inputs["importance_sampling_ratio"] = _trl_importance_sampling_ratio(
            old, sampler, mask, "token_truncate", None, 1.5)
        for t in (theirs, ours):
            t.use_vllm = t.vllm_importance_sampling_correction = True
            t.vllm_importance_sampling_mode = "token_truncate"
            t.vllm_importance_sampling_clip_min, t.vllm_importance_sampling_clip_max = None, 1.5
    if case.endswith("kl"):
        theirs.beta = ours.beta = 0.04
        inputs["ref_per_token_logps"] = inputs["_logp"] - 0.3 * inputs["completion_mask"]
    if case.endswith("opsm"):  # a threshold that drops one of the two negative rows
        drift = ((inputs["sampling_per_token_logps"] - inputs["_logp"])
                 * inputs["completion_mask"]).sum(-1) / inputs["completion_mask"].sum(-1)
        threshold = float(drift[[1, 3]].mean())
        for t in (theirs, ours):
            t.off_policy_mask_threshold = t.args.off_policy_mask_threshold = threshold
    if route == "trl" and (loss_type == "vespo" or case.endswith("opsm")):
        with pytest.raises(ValueError, match="over several processes"):
            _loss_and_grads(ours, inputs, 2)
        return
    _assert_same(theirs, ours, inputs, accumulation=2)
    got, want = ours._metrics["train"], theirs._metrics["train"]
    # the entropy metric comes with the entropies: the bonus, or the log-probs route
    fused = route == "tic" and "entropy-bonus" not in case
    assert ("entropy" in got) != fused
    for name in ("entropy", "policy_loss") if "entropy-bonus" in case else ():
        assert got[name][-1] == pytest.approx(want[name][-1], rel=1e-4, abs=1e-6), name
    assert not any(k.startswith("tic/rollout_") for k in got) or "vllm" in case


@pytest.mark.parametrize("target", [10.0, 0.01])
def test_adaptive_entropy_equals_trl(tmp_path, tokenizer, dataset, target):
    """use_adaptive_entropy: over micro-batches and optimizer steps (an accumulation window of
    two), the applied bonus, the coefficient's moves and the logged entropy_coef follow TRL's
    controller; a target above the entropy raises the coefficient, one below lowers it."""
    kw = dict(loss_type="dapo", importance_sampling_level="token", use_adaptive_entropy=True,
              entropy_coef=0.02, entropy_coef_delta=0.01, entropy_target=target,
              gradient_accumulation_steps=2, steps_per_generation=4)
    theirs, ours = _pair(tmp_path, tokenizer, dataset, **kw)
    coefs = []
    for step in range(3):
        for micro in range(2):
            sync = micro == 1
            for t in (theirs, ours):
                t.accelerator.gradient_state._set_sync_gradients(sync)
            _assert_same(theirs, ours, _inputs(theirs, seed=10 * step + micro), accumulation=2)
            assert ours.entropy_coef == pytest.approx(theirs.entropy_coef)
            assert ours._last_world_entropy == pytest.approx(theirs._last_world_entropy)
        coefs.append(ours.entropy_coef)
    assert coefs == sorted(coefs, reverse=target < 1) and coefs[0] != coefs[-1]
    assert ours._metrics["train"]["entropy_coef"] == pytest.approx(
        theirs._metrics["train"]["entropy_coef"])


def test_errors_at_the_loss_name_trl_arguments(tmp_path, tokenizer, dataset):
    """tic_kernels' errors raised at the loss speak TRL's names (here its sampler clip
    bounds), not tic_kernels' (rollout_is_min / rollout_is_max)."""
    _, ours = _pair(tmp_path, tokenizer, dataset, loss_type="dapo",
                    importance_sampling_level="token")
    inputs = _inputs(ours)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - 0.1
    ours.use_vllm = ours.vllm_importance_sampling_correction = True
    ours.vllm_importance_sampling_mode = "token_truncate"
    ours.vllm_importance_sampling_clip_min, ours.vllm_importance_sampling_clip_max = 2.0, 1.5
    with pytest.raises(ValueError, match="^vllm_importance_sampling_clip_min=2.0 exceeds "
                                         "vllm_importance_sampling_clip_max=1.5$"):
        _loss_and_grads(ours, inputs, 1)


# ---------------------------------------------------------------------------------------------
# 4. What the adapter refuses, before any model is loaded
@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="kl_cov"),
     "loss_type='kl_cov' is not supported.*'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', "
     "'luspo', 'vespo'"),
    (dict(loss_type="vespo", delta=2.0), "delta=2.0 with loss_type='vespo'"),
    (dict(importance_sampling_level="group"),
     "importance_sampling_level='group' is not supported.*'trajectory', 'sequence', 'token'"),
    (dict(loss_type="sapo", delta=2.0), "delta=2.0 with loss_type='sapo'"),
    (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high, which must lie in"),
])
def test_refuses_what_it_does_not_implement(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        TICGRPOTrainer(model=_model(), reward_funcs=_reward, args=_config(tmp_path, **kw))


def test_refuses_bad_loss_keywords_and_forced_fused_head(tmp_path, tokenizer, dataset):
    with pytest.raises(ValueError, match="clip_mode"):
        TICGRPOTrainer(model=_model(), reward_funcs=_reward, args=_config(tmp_path),
                       clip_mode="lower")
    model = _model()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_head_refusal(model)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        TICGRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path),
                       train_dataset=dataset, processing_class=tokenizer, fused_lm_head=True)


def test_import_tic_kernels_does_not_import_trl():
    code = "import sys, tic_kernels, tic_kernels.integrations; assert 'trl' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
