"""TRL adapter: ``TICGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss is tic_kernels'.

Requires ``trl >= 1.16.0`` (the version it was written and tested against; ``pip install
tic_kernels[trl]``). Importing this module imports TRL; ``import tic_kernels`` does not.

    from tic_kernels.integrations.trl import TICGRPOTrainer
    args = GRPOConfig(..., importance_sampling_level="trajectory", loss_type="grpo")
    trainer = TICGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds)

What it changes: only the loss of a micro-batch (``_compute_loss``). Generation, rewards,
advantages, the old / reference / sampler log-probabilities and the rest of the loop are TRL's.

* ``importance_sampling_level``: "trajectory" (TIC-GRPO: one ratio per completion,
  exp(sum_t log-ratio_t)), TRL's "sequence" (GSPO: exp of the mean log-ratio) and "token"
  (GRPO / DAPO), and "none" (no importance sampling: A * logp). GRPOTrainer's own __init__
  accepts any string here; TRL rejects unknown levels only in its loss, which this replaces.
* ``loss_type`` -> aggregation, normalised exactly as TRL 1.16 does:
  "grpo" -> seq-mean-token-mean over all B rows of the micro-batch, then / gradient-accumulation
  steps; "bnpo" -> token-mean over the micro-batch's tokens, / accumulation steps; "dr_grpo" ->
  sum / (B * max_completion_length), / accumulation steps; "dapo" -> sum / (num_items_in_batch /
  num_processes * accumulation steps / steps_per_generation) (num_items_in_batch / num_processes
  in eval). "cispo" -> objective="cispo" (each token's log-probability weighted by its detached
  ratio capped at ``epsilon_high``: clip_mode="upper", eps_high = epsilon_high - 1), normalised
  as "dapo"; "sapo" -> objective="sapo" with ``sapo_temperature_pos`` / ``_neg``, normalised as
  "grpo". Both combine with every importance_sampling_level, "trajectory" included (the
  sequence's ratio weighs or gates every token). "luspo" -> seq-mean-token-sum over all B rows
  (TRL's sum over a row's tokens, mean over rows), / accumulation steps: the clipped
  objective, meant with importance_sampling_level "sequence" (or "trajectory"). "vespo" ->
  objective="vespo": each token's log-probability weighted by the detached gamma weight
  phi(w) of its completion's trajectory ratio w (``vespo_k_pos``, ``vespo_lambda_pos``,
  ``vespo_k_neg``, ``vespo_lambda_neg``), vLLM's token importance weights entering w rather
  than multiplying the loss, as TRL's; normalised as "dapo". TRL means it with
  importance_sampling_level "token", whose ratio then only weighs the bias-corrected KL.
* ``top_entropy_quantile`` < 1: the policy term on the high-entropy tokens only, the entropy
  bonus averaged over them, as TRL's. In one process, tic_kernels' own selection
  (``top_entropy_quantile``: TRL's quantile, taken on the device without a host sync; the
  fully fused loss when neither the entropy bonus nor ``log_entropy`` needs the entropies
  back), which combines with everything below, vespo and the sampler's log-probs included.
  Over several processes, TRL's ``get_high_entropy_mask`` (its quantile over every process's
  loss tokens, gathered with host reads as TRL's) on the entropies the loss computes, applied
  as a per-token weight on the policy term (``rollout_weights``, times TRL's precomputed
  ``importance_sampling_ratio`` with vLLM's correction; the ``tic/rollout_*`` statistics then
  describe that combined weight, and without vLLM's correction they are not logged); there it
  refuses vespo, and the off-policy mask against the sampler's log-probs, at the loss.
* ``delta`` -> delta (the unclipped ratio bounded above, the two-sided loss types);
  ``off_policy_mask_threshold`` -> the off-policy sequence mask (against the sampler's
  log-probs with vLLM's correction on, else the old ones; with the sampler's log-probs but the
  correction off it raises at the loss);
  ``use_bias_correction_kl`` (with ``beta != 0``) -> kl_bias_correction: each token's KL times
  its unit's ratio, as TRL (TRL's ``kl`` metric is then that weighted KL too).
* ``use_adaptive_entropy``: TRL's controller of ``entropy_coef`` (applied only while the
  previous step's world-mean entropy is at or below ``entropy_target``; moved by
  ``entropy_coef_delta`` within [``entropy_coef_min``, ``entropy_coef_max``] at each optimizer
  step from the window's world-mean entropy), on the entropies the loss computes.
* ``epsilon`` / ``epsilon_high`` -> eps_low / eps_high; ``beta`` with the reference log-probs ->
  the k3 KL inside the aggregation (as TRL); ``temperature`` -> the loss's temperature;
  ``entropy_coef`` -> TRL's entropy bonus (the mean entropy of the micro-batch's loss tokens,
  / accumulation steps, whatever the loss type).
* vLLM's sampler correction (``use_vllm`` with ``vllm_importance_sampling_correction``): the
  sampler's per-token log-probs (``inputs["sampling_per_token_logps"]``) go to the loss as
  ``rollout_logprobs`` with ``rollout_is = vllm_importance_sampling_mode`` and the clip bounds
  ``vllm_importance_sampling_clip_min/max`` (a clip bound of None is no bound, as in TRL). The
  kernel then forms the same weight as TRL's
  ``importance_sampling_ratio`` from the same old and sampler log-probs (NaN -> no correction),
  and also reports its effective sample size and the sampler-vs-old KL; the precomputed ratio
  is used (as ``rollout_weights``) only where the sampler's log-probs are absent.
* The policy's log-probs come from the fused LM head (``linear_tic_loss``: the (B, T, V) logits
  are never formed) when the model's output embedding is an ``nn.Linear`` under a separate
  backbone (``model.base_model``) and its config declares no final-logit softcapping and no
  logit scaling (the fused head would skip them); otherwise from the model's logits
  (``tic_loss``), which the model's own forward computes for the completion positions only.
  The loss runs *inside* the model's forward (the forward TRL patches is wrapped once more), so
  DDP, FSDP and DeepSpeed see an ordinary forward; PEFT models are unwrapped as TRL does.

Metrics, under TRL's names where tic_kernels computes the same quantity: ``kl``, ``entropy``
(when the entropy is computed: with the entropy bonus, or ``log_entropy=True``; the fully
fused loss does not compute it), ``clip_ratio/region_mean`` (tic's clip_fraction: tokens for
"token", sequences otherwise; the clipped loss types; with a delta below 1 + epsilon_high it
also counts the units delta bounds, which TRL's does not), ``policy_loss`` and ``entropy_coef``
(with the entropy bonus). TRL's ``clip_ratio/low_mean``, ``high_mean``, ``low_min``,
``high_max`` and ``cispo_clip_ratio`` need the ratios and the advantages' signs together,
which the fused loss never returns, and vespo's ``vespo/phi_seq_mean`` its weights: they are
not logged (``tic/clip_fraction`` is: for cispo the units whose ratio the cap moved, for sapo
and vespo 0). Every statistic of the loss is logged
as ``tic/<name>`` (ratio_mean, ratio_max, cap_fraction, delta_abs_mean, logp_mean,
clip_fraction, and the rollout_* statistics with the sampler correction), averaged over
processes (``*_max`` / ``*_min``: max / min over processes).

Refused at construction with a ValueError (rather than silently ignored):
``delta`` with cispo, sapo
or vespo (TRL ignores it there), cispo with an ``epsilon_high`` outside [1, 11] (its cap on
the ratio; TRL's default 0.28 would cap every ratio below 1), the trainer's ``dual_clip`` or
``clip_mode`` with cispo, sapo or vespo, and a MoE router auxiliary loss (set
``router_aux_loss_coef=0``). Multimodal inputs raise at the loss.
Errors that tic_kernels raises at the loss name TRL's arguments (``completion_mask``,
``old_per_token_logps``, ``vllm_importance_sampling_clip_max``, ``epsilon``, ...).
"""
from __future__ import annotations

import functools
import math
import types
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
from torch import nn

import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from trl import GRPOTrainer

import tic_kernels as tk

from ..ops.token_selection import entropy_selection
from ._names import renamer

MIN_TRL_VERSION = "1.16.0"
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(f"tic_kernels.integrations.trl needs trl >= {MIN_TRL_VERSION}, found "
                      f"{trl.__version__}: pip install 'trl>={MIN_TRL_VERSION}'")

__all__ = ["TICGRPOTrainer", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "MIN_TRL_VERSION"]

#: TRL's importance_sampling_level -> tic_kernels' ratio
IMPORTANCE_SAMPLING_LEVELS = {"trajectory": "trajectory", "sequence": "sequence_mean",
                              "token": "token", "none": "none"}
#: TRL's loss_type -> tic_kernels' aggregation (normalisers: see the module docstring)
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
              "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
              "cispo": "token-mean", "sapo": "seq-mean-token-mean",
              "luspo": "seq-mean-token-sum", "vespo": "token-mean"}
#: TRL's loss_type -> tic_kernels' objective (the others: "clip")
OBJECTIVES = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
# the loss types normalised as TRL's "dapo" (by the global count of loss tokens) and as "grpo"
_PER_TOKEN = ("dapo", "cispo", "vespo")
_PER_ROW = ("grpo", "sapo", "luspo")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# config attributes by which a model scales or softcaps its logits (the ones TRL's fused head
# reads): the fused LM head here would skip them, so such models take the logits path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                    "spatial_shapes", "image_position_ids")


def check_config(args) -> None:
    """Raises a ValueError for the GRPOConfig settings the adapter does not implement."""
    def refuse(what, fix):
        raise ValueError(f"TICGRPOTrainer does not implement {what}; {fix} (or use "
                         "trl.GRPOTrainer)")

    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"TICGRPOTrainer: loss_type={args.loss_type!r} is not supported; "
                         f"supported: {', '.join(map(repr, LOSS_TYPES))} (TRL's other loss "
                         "types need trl.GRPOTrainer)")
    if args.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"TICGRPOTrainer: importance_sampling_level="
                         f"{args.importance_sampling_level!r} is not supported; supported: "
                         f"{', '.join(map(repr, IMPORTANCE_SAMPLING_LEVELS))}")
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.loss_type == "cispo" and not 1.0 <= eps_high <= 11.0:
        raise ValueError(f"TICGRPOTrainer: loss_type='cispo' caps the ratio at epsilon_high, "
                         f"which must lie in [1, 11] here (ScaleRL's 4 or 5; a cap below 1 "
                         f"would lower every ratio), got {eps_high!r}")
    if args.delta is not None and args.loss_type in OBJECTIVES:
        refuse(f"delta={args.delta} with loss_type={args.loss_type!r} (TRL applies delta to "
               "the two-sided loss types only)", "set delta=None")
    if (args.use_vllm and args.vllm_importance_sampling_correction
            and args.vllm_importance_sampling_mode not in ROLLOUT_IS_MODES):
        raise ValueError(f"TICGRPOTrainer: vllm_importance_sampling_mode="
                         f"{args.vllm_importance_sampling_mode!r} is not one of "
                         f"{', '.join(map(repr, ROLLOUT_IS_MODES))}")


def fused_head_refusal(model) -> Optional[str]:
    """Why the fused LM head cannot compute ``model``'s log-probs (None: it can)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"its output embedding is {type(head).__name__}, not an nn.Linear"
    if getattr(model, "base_model", model) is model:
        return "it exposes no backbone (model.base_model) separate from the LM head"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and not (name != "final_logit_softcapping" and value == 1):
            return f"its config sets {name}={value!r}, which the fused head would skip"
    return None


class _HeadOutput(NamedTuple):
    loss: torch.Tensor
    stats: dict
    entropy: Optional[torch.Tensor]  # (B, T) per-token entropy, when computed
    entropy_mask: Optional[torch.Tensor] = None  # (B, T) top_entropy_quantile's tokens


# tic_kernels' argument names -> TRL's, in the errors raised through the adapter
_in_trl_terms = renamer({
    "targets": "completion_ids", "mask": "completion_mask",
    "old_logprobs": "old_per_token_logps", "ref_logprobs": "ref_per_token_logps",
    "rollout_logprobs": "sampling_per_token_logps",
    "rollout_weights": "importance_sampling_ratio", "rollout_is": "vllm_importance_sampling_mode",
    "rollout_is_max": "vllm_importance_sampling_clip_max",
    "rollout_is_min": "vllm_importance_sampling_clip_min", "eps_low": "epsilon",
    "eps_high": "epsilon_high", "sapo_tau_pos": "sapo_temperature_pos",
    "sapo_tau_neg": "sapo_temperature_neg", "kl_bias_correction": "use_bias_correction_kl",
})  # vespo_k_pos etc. are TRL's names too


class _MicroBatchLoss:
    """The loss of one micro-batch, computed inside the policy's forward (see _install_forward)
    from the backbone's last hidden states (fused head) or from the model's logits."""

    def __init__(self, fused, completion_length, targets, mask, old_logprobs, advantages,
                 keywords, with_entropy, head_in_fp32, entropy_mask_fn=None):
        self.fused, self.C = fused, completion_length
        self.targets, self.mask, self.old, self.advantages = targets, mask, old_logprobs, advantages
        self.keywords, self.with_entropy, self.head_in_fp32 = keywords, with_entropy, head_in_fp32
        # top_entropy_quantile: (entropy, mask) -> the tokens whose policy term counts
        self.entropy_mask_fn = entropy_mask_fn

    def __call__(self, model, inner_forward, *args, **kwargs):
        kwargs["use_cache"] = False
        for key in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep"):
            kwargs.pop(key, None)
        if not self.fused:
            logits = inner_forward(*args, logits_to_keep=self.C + 1, **kwargs).logits
            return self.loss(logits[:, :-1])
        # the backbone and the head are looked up on each call: FSDP and PEFT replace them
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, -self.C - 1:-1]
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if _is_dtensor(weight):  # FSDP2 outside the head's own forward: gather it, as TRL does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden = hidden.to(weight.device)
        autocast = nullcontext()
        if self.head_in_fp32:  # GRPOConfig(cast_lm_head_to_fp32=True), as TRL's head
            hidden = hidden.float()
            autocast = torch.autocast(hidden.device.type, enabled=False)
        from trl.trainer.utils import maybe_gather_lm_head_ctx  # DeepSpeed ZeRO-3
        with autocast, maybe_gather_lm_head_ctx(weight, bias):
            return self.loss(hidden, weight, bias)

    def loss(self, x, weight=None, bias=None) -> _HeadOutput:
        """x: the hidden states (B, T, H) with the head's weight / bias, or the logits (B, T, V).
        tic_kernels' errors come out in TRL's names."""
        try:
            return self._loss(x, weight, bias)
        except (TypeError, ValueError) as e:
            raise _in_trl_terms(e) from None

    def _loss(self, x, weight, bias):
        kw = dict(self.keywords)
        temperature = kw.pop("temperature")
        if self.old is not None and not self.with_entropy and self.entropy_mask_fn is None:
            # the whole loss in one fused call
            if weight is not None:
                out = tk.linear_tic_loss(x, weight, self.targets, self.old, self.advantages,
                                         bias=bias, mask=self.mask, temperature=temperature, **kw)
            else:
                out = tk.tic_loss(x, self.targets, self.old, self.advantages, mask=self.mask,
                                  temperature=temperature, **kw)
            return _HeadOutput(out.loss, out.stats, None)
        # the log-probs (and entropy) with autograd, then the loss on them: used when the entropy
        # is needed, and on-policy (TRL passes no old log-probs: the ratio is exp(logp - sg(logp)))
        targets = torch.where(self.mask, self.targets, torch.full_like(self.targets, -100))
        selecting = kw.get("top_entropy_quantile", 1.0) < 1.0  # tic_kernels' selection
        with_entropy = self.with_entropy or selecting
        if weight is not None:
            res = tk.linear_token_logprobs(x, weight, targets, bias=bias, temperature=temperature,
                                           return_entropy=with_entropy)
        else:
            res = tk.token_logprobs(x, targets, temperature=temperature,
                                    return_entropy=with_entropy)
        logp, entropy = res if with_entropy else (res, None)
        old = logp.detach() if self.old is None else self.old
        entropy_mask = None
        if self.entropy_mask_fn is not None:
            # TRL's mask multiplies the policy term only, as a per-token weight does (with
            # vLLM's precomputed importance weights, if any)
            entropy_mask = self.entropy_mask_fn(entropy.detach(), self.mask)
            weights = entropy_mask.to(torch.float32)
            if kw.get("rollout_weights") is not None:
                weights = weights * kw["rollout_weights"]
            kw["rollout_weights"] = weights
        elif selecting:
            kw["entropy"] = entropy.detach()
            # the tokens it keeps, for the entropy bonus (the same function, on the device)
            entropy_mask = entropy_selection(entropy, self.mask.reshape(-1),
                                             kw["top_entropy_quantile"]).view_as(self.mask).bool()
        out = tk.tic_loss_from_logprobs(logp, old, self.advantages, mask=self.mask, **kw)
        return _HeadOutput(out.loss, out.stats, entropy, entropy_mask)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _install_forward(model) -> None:
    """Wraps ``model.forward`` (TRL's already patched one) so that a call with ``tic_loss_fn=``
    computes the tic_kernels loss inside the forward; any other call is unchanged."""
    if getattr(model, "_tic_kernels_forward", False):
        return
    inner = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates kwargs on it
    def forward(self, *args, tic_loss_fn=None, **kwargs):
        if tic_loss_fn is None:
            return inner(*args, **kwargs)
        return tic_loss_fn(self, inner, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._tic_kernels_forward = True


def _nanreduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """Mean / max / min over dim 0 ignoring NaN (NaN where a column is all NaN)."""
    if how == "mean":
        return x.nanmean(0)
    fill = -math.inf if how == "max" else math.inf
    y = torch.where(torch.isnan(x), torch.full_like(x, fill), x)
    y = y.amax(0) if how == "max" else y.amin(0)
    return torch.where(torch.isinf(y) & torch.isnan(x).all(0), torch.full_like(y, math.nan), y)


class TICGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` (trl >= 1.16.0) with tic_kernels' fused loss; see the module docstring
    for the mapping of GRPOConfig onto the loss and what is refused.

    Args beyond GRPOTrainer's (keywords only):
        clip_mode: "two_sided" (TRL's clip, default) or "upper" (only the upper bound: the
            TIC-GRPO paper's recipe).
        dual_clip: c > 1 bounds the objective of negative advantages below by c * A; None: off.
        max_log_ratio: cap on |log-ratio| before exp (default 20, verl's).
        fused_lm_head: None (default) uses the fused LM head when the model allows it (see
            fused_head_refusal), False always computes the logits, True requires the fused head.
        log_entropy: compute the per-token entropy to log TRL's ``entropy`` metric even without
            the entropy bonus (it takes the log-probs route: a little slower than the fully
            fused loss).
    """

    def __init__(self, *args, clip_mode: str = "two_sided", dual_clip: Optional[float] = None,
                 max_log_ratio: float = 20.0, fused_lm_head: Optional[bool] = None,
                 log_entropy: bool = False, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # fail before TRL loads models; re-checked below for the default
            check_config(config)
        self._tic_options = dict(clip_mode=clip_mode, dual_clip=dual_clip,
                                 max_log_ratio=max_log_ratio)
        # the keywords tic_kernels checks itself, before any model is built
        tk.tic_loss_from_logprobs(torch.zeros(1, 1, dtype=torch.float64),
                                  torch.zeros(1, 1, dtype=torch.float64),
                                  torch.zeros(1, dtype=torch.float64),
                                  mask=torch.ones(1, 1, dtype=torch.bool), **self._tic_options)
        if fused_lm_head not in (None, True, False):
            raise ValueError(f"fused_lm_head must be None, True or False, got {fused_lm_head!r}")
        self._tic_log_entropy = bool(log_entropy)
        super().__init__(*args, **kwargs)
        check_config(self.args)
        if self.aux_loss_enabled:
            raise ValueError("TICGRPOTrainer does not implement the MoE router auxiliary loss; "
                             "set GRPOConfig(router_aux_loss_coef=0.0) (or use trl.GRPOTrainer)")
        if self.loss_type in OBJECTIVES and (dual_clip is not None or clip_mode != "two_sided"):
            raise ValueError(f"TICGRPOTrainer: dual_clip and clip_mode apply to the clipped loss "
                             f"types, not loss_type={self.loss_type!r} (cispo's cap is "
                             f"epsilon_high)")
        self._tic_ratio = IMPORTANCE_SAMPLING_LEVELS[self.importance_sampling_level]
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        why = fused_head_refusal(target)
        if fused_lm_head and why is not None:
            raise ValueError(f"fused_lm_head=True, but the fused LM head cannot serve "
                             f"{type(target).__name__}: {why}")
        self._tic_fused = why is None if fused_lm_head is None else bool(fused_lm_head)
        self._tic_fused_refusal = why
        # top_entropy_quantile over several processes: TRL's mask (its quantile of every
        # process's tokens), else tic_kernels' selection on the device
        self._tic_trl_entropy_mask = self.accelerator.num_processes > 1
        _install_forward(target)

    # ---------------------------------------------------------------------------------------
    def _tic_keywords(self, inputs, mask, train):
        """The loss keywords of this micro-batch, and the factor that completes TRL's normaliser
        (TRL's loss = factor * tic's loss; the accumulation division comes after)."""
        args = self.args
        B, C = mask.shape
        kw = dict(ratio=self._tic_ratio, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                  aggregation=LOSS_TYPES[self.loss_type], temperature=self.temperature,
                  **self._tic_options)
        factor = 1.0
        if self.beta != 0.0:
            kw.update(ref_logprobs=inputs["ref_per_token_logps"], beta=self.beta,
                      # TRL weighs the KL by its ratio; level "none" has none
                      kl_bias_correction=bool(args.use_bias_correction_kl)
                      and self._tic_ratio != "none")
        objective = OBJECTIVES.get(self.loss_type, "clip")
        if objective == "cispo":  # TRL caps the ratio at epsilon_high itself
            kw.update(objective="cispo", clip_mode="upper", eps_high=self.epsilon_high - 1.0)
        elif objective == "sapo":
            kw.update(objective="sapo", sapo_tau_pos=args.sapo_temperature_pos,
                      sapo_tau_neg=args.sapo_temperature_neg)
        elif objective == "vespo":
            kw.update(objective="vespo", vespo_k_pos=args.vespo_k_pos,
                      vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
                      vespo_lambda_neg=args.vespo_lambda_neg)
        if args.delta is not None:
            kw["delta"] = args.delta
        # TRL's entropy mask as a per-token weight (several processes), else tic_kernels'
        entropy_masked = args.top_entropy_quantile < 1.0 and self._tic_trl_entropy_mask
        if args.top_entropy_quantile < 1.0 and not entropy_masked:
            kw["top_entropy_quantile"] = args.top_entropy_quantile
        if entropy_masked and self.loss_type == "vespo":
            raise ValueError(f"TICGRPOTrainer does not implement top_entropy_quantile="
                             f"{args.top_entropy_quantile} with loss_type='vespo' over several "
                             "processes (TRL's gathered mask would enter vespo's weight as the "
                             "sampler's weights do); set top_entropy_quantile=1.0 (or use "
                             "trl.GRPOTrainer)")
        if args.off_policy_mask_threshold is not None:
            kw["off_policy_mask_threshold"] = args.off_policy_mask_threshold
            if inputs.get("sampling_per_token_logps") is not None and (
                    entropy_masked
                    or not (self.use_vllm and self.vllm_importance_sampling_correction)):
                # TRL then measures the drift against the sampler, whose log-probs the loss
                # reads only with the sampler correction on and no entropy mask
                raise ValueError("TICGRPOTrainer does not implement off_policy_mask_threshold "
                                 "against the sampler's log-probs without "
                                 "vllm_importance_sampling_correction, or with "
                                 "top_entropy_quantile < 1 over several processes; turn the "
                                 "correction on and the mask off (or use trl.GRPOTrainer)")
        if self.loss_type in _PER_ROW + ("dr_grpo",):
            kw["num_sequences"] = B  # TRL averages over every row, empty ones included
        if self.loss_type == "dr_grpo":
            # TRL divides by B * max_completion_length; tic's max_len must cover the longest row
            max_len = max(int(self.max_completion_length), C)
            kw["max_len"] = max_len
            factor = max_len / self.max_completion_length
        elif self.loss_type in _PER_TOKEN:
            normalizer = (inputs["num_items_in_batch"].clamp(min=1.0)
                          / self.accelerator.num_processes)
            if train:
                normalizer = (normalizer * self.current_gradient_accumulation_steps
                              / args.steps_per_generation)
            normalizer = float(normalizer)
            kw["num_tokens"] = max(normalizer, 1.0)  # tic clamps its count at 1; TRL does not
            factor = kw["num_tokens"] / normalizer
        if self.use_vllm and self.vllm_importance_sampling_correction:
            sampler = inputs.get("sampling_per_token_logps")
            # with the entropy mask the weights are TRL's precomputed ones, times the mask
            if sampler is not None and not entropy_masked:
                hi = self.vllm_importance_sampling_clip_max  # None: TRL sets no upper bound
                kw.update(rollout_logprobs=sampler, rollout_is=self.vllm_importance_sampling_mode,
                          rollout_is_max=math.inf if hi is None else hi,
                          rollout_is_min=self.vllm_importance_sampling_clip_min)
            else:  # (B, T), or (B, 1) in the sequence modes
                kw["rollout_weights"] = inputs["importance_sampling_ratio"].expand(B, C)
        return kw, factor

    def _compute_loss(self, model, inputs):
        for key in _MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise NotImplementedError("TICGRPOTrainer supports text-only models (the inputs "
                                          f"carry {key!r}); use trl.GRPOTrainer")
        mode = "train" if self.model.training else "eval"
        train = mode == "train"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask.bool()
        if "tool_mask" in inputs:  # tool outputs inside a completion carry no loss
            mask = mask & inputs["tool_mask"].bool()
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError("TICGRPOTrainer takes one advantage per completion, shape (B,); got "
                             f"{tuple(advantages.shape)}")
        keywords, factor = self._tic_keywords(inputs, mask, train)
        entropy_bonus = self._entropy_bonus_enabled
        quantile = self.args.top_entropy_quantile
        entropy_mask_fn = None if quantile >= 1.0 or not self._tic_trl_entropy_mask else (
            # TRL's own mask, gathered as TRL's
            lambda entropy, m: self.get_high_entropy_mask(entropy, m, 1.0 - quantile))
        loss_fn = _MicroBatchLoss(
            self._tic_fused, completion_ids.size(1), completion_ids, mask,
            inputs.get("old_per_token_logps"), advantages, keywords,
            with_entropy=entropy_bonus or self._tic_log_entropy or entropy_mask_fn is not None,
            head_in_fp32=bool(getattr(self.args, "cast_lm_head_to_fp32", False)),
            entropy_mask_fn=entropy_mask_fn)
        model_inputs = dict(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1))
        for key in ("token_type_ids", "mm_token_type_ids"):
            if inputs.get(key) is not None:
                model_inputs[key] = inputs[key]
        with self.accelerator.autocast():
            out = model(**model_inputs, tic_loss_fn=loss_fn)

        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        policy_loss = out.loss * factor if factor != 1.0 else out.loss
        loss = policy_loss if self.loss_type in _PER_TOKEN else policy_loss / accumulation
        if entropy_bonus:
            # TRL's bonus: the mean entropy of the loss tokens (those of the entropy mask),
            # / accumulation steps only
            on = mask if out.entropy_mask is None else mask & out.entropy_mask
            entropy_mean = (out.entropy * on).sum() / on.sum().clamp(min=1.0)
            coef = self.entropy_coef
            if self.use_adaptive_entropy:
                coef = self._adaptive_entropy_coef(out.entropy.detach(), on, train)
            loss = loss - coef * entropy_mean / accumulation
        self._tic_log(mode, out, mask, policy_loss.detach() if entropy_bonus else None)
        return loss

    def _adaptive_entropy_coef(self, entropy, on, train):
        """use_adaptive_entropy, as TRL's controller: the coefficient applied in this
        accumulation window is entropy_coef when the previous step's world-mean entropy was at
        or below entropy_target, else 0; in training the window's entropy sum and token count
        accumulate, and at the optimizer-step boundary their world totals move entropy_coef
        by entropy_coef_delta (up to at most entropy_coef_max when at or below the target,
        else down to at least entropy_coef_min) for the next step."""
        args = self.args
        coef = self.entropy_coef if self._last_world_entropy <= args.entropy_target else 0.0
        if not train:
            return coef
        window = torch.stack([(entropy * on).sum(), on.sum().to(entropy.dtype)])
        if self._entropy_window_stats is not None:
            window = window + self._entropy_window_stats
        self._entropy_window_stats = window
        if self.accelerator.sync_gradients:
            total = self.accelerator.reduce(window, reduction="sum")
            world = (total[0] / total[1].clamp(min=1.0)).item()
            if world <= args.entropy_target:  # too little entropy: push harder
                self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta,
                                        args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta,
                                        args.entropy_coef_min)
            self._last_world_entropy, self._entropy_window_stats = world, None
        return coef

    def _tic_log(self, mode, out, mask, policy_loss):
        metrics, acc = self._metrics[mode], self.accelerator
        stats = out.stats
        # TRL's names: sums and counts over the processes, as TRL's global_masked_mean
        n_tok = mask.sum().float()
        names, sums, counts = [], [], []
        if "kl_mean" in stats:
            names.append("kl"), sums.append(stats["kl_mean"] * n_tok), counts.append(n_tok)
        if out.entropy is not None:
            names.append("entropy"), sums.append((out.entropy.detach() * mask).sum())
            counts.append(n_tok)
        if self._tic_ratio != "none" and self.loss_type not in OBJECTIVES:  # TRL's clip band
            units = n_tok if self._tic_ratio == "token" else (mask.sum(-1) > 0).sum().float()
            names.append("clip_ratio/region_mean")
            sums.append(stats["clip_fraction"] * units), counts.append(units)
        if names:
            totals = acc.reduce(torch.stack([torch.stack(sums).float(),
                                             torch.stack(counts).float()]), reduction="sum")
            for name, value in zip(names, (totals[0] / totals[1].clamp(min=1.0)).tolist()):
                metrics[name].append(value)
        if policy_loss is not None:
            metrics["policy_loss"].append(acc.gather(policy_loss.float()).nanmean().item())
            if mode == "train" and acc.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        # tic_kernels' own statistics, one gather for all of them
        if out.entropy_mask is not None and not (self.use_vllm
                                                 and self.vllm_importance_sampling_correction):
            # the weights were the entropy mask alone: no sampler to describe
            stats = {k: v for k, v in stats.items() if not k.startswith("rollout_")}
        keys = sorted(stats)
        gathered = acc.gather(torch.stack([stats[k].detach().float().reshape(()) for k in keys]))
        gathered = gathered.view(-1, len(keys))
        reduced = {how: _nanreduce(gathered, how) for how in ("mean", "max", "min")}
        values = torch.stack([reduced[_how(k)][i] for i, k in enumerate(keys)]).tolist()
        for key, value in zip(keys, values):
            metrics[f"tic/{key}"].append(value)


def _how(name: str) -> str:
    return "max" if name.endswith("_max") else "min" if name.endswith("_min") else "mean"
