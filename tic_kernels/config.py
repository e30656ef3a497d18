"""The losses' configuration: every keyword of tic_loss, tic_loss_from_logprobs and
linear_tic_loss, checked once and frozen into one ``LossConfig``.

The public functions spell their keywords out (that is the API a user reads); each builds its
LossConfig with ``LossConfig.of`` (which checks every value and resolves the defaults) and
from then on only the config travels: ``encode()`` is the one string argument of the loss's
torch.library ops, the kernels' launchers read their scalars and switches from it, and
``reference_keywords()`` hands the same values to the reference.

Adding a loss option therefore touches: a field here (with its check in ``of``), the kernel
that uses it, the reference function that defines it, and the public signatures.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from . import validation as check
from .options import (KL_COV_COEF, KL_COV_RATIO, ROLLOUT_IS, ROLLOUT_IS_MAX, SAPO_TAU_NEG,
                      SAPO_TAU_POS, VESPO_K_NEG, VESPO_K_POS, VESPO_LAMBDA_NEG,
                      VESPO_LAMBDA_POS, default_aggregation)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The resolved keywords of a loss (see tic_kernels.tic_loss_from_logprobs for each).

    ``aggregation`` and ``max_len`` hold the values in force (the ratio's default
    aggregation; T of a padded batch); ``rollout`` is "" (no sampler correction), "weights"
    (given weights) or one of options.ROLLOUT_IS, with its bounds resolved
    (``rollout_is_min`` 0, ``rollout_is_max`` inf: no bound); ``ref`` says that
    ref_logprobs are given (the KL statistic, and the KL term when beta > 0)."""
    ratio: str = "trajectory"
    clip_mode: str = "two_sided"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None
    max_log_ratio: float = 20.0
    aggregation: str = "seq-mean-token-mean"
    beta: float = 0.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    num_tokens: Optional[float] = None
    num_sequences: Optional[float] = None
    max_len: Optional[float] = None
    ref: bool = False
    rollout: str = ""
    rollout_is_min: float = 0.0
    rollout_is_max: float = math.inf
    objective: str = "clip"
    delta: Optional[float] = None
    sapo_tau_pos: float = SAPO_TAU_POS
    sapo_tau_neg: float = SAPO_TAU_NEG
    dro_beta: Optional[float] = None
    vespo_k_pos: float = VESPO_K_POS
    vespo_lambda_pos: float = VESPO_LAMBDA_POS
    vespo_k_neg: float = VESPO_K_NEG
    vespo_lambda_neg: float = VESPO_LAMBDA_NEG
    kl_cov_ratio: float = KL_COV_RATIO
    kl_cov_coef: float = KL_COV_COEF
    kl_bias_correction: bool = False
    off_policy_mask_threshold: Optional[float] = None
    top_entropy_quantile: float = 1.0

    def __hash__(self):
        """The fields' hash, computed once: the launchers' caches key on the config at every
        call (dataclass keeps an explicit __hash__ of a frozen class)."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

    def __reduce__(self):  # the fields alone: the cached hash is this process's
        return LossConfig, tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @staticmethod
    def of(*, ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation, beta,
           entropy_coef, temperature, num_tokens, num_sequences, max_len, ref_logprobs,
           rollout_logprobs, rollout_is, rollout_is_max, rollout_is_min, rollout_weights, mask,
           objective, delta, sapo_tau_pos, sapo_tau_neg, dro_beta, vespo_k_pos,
           vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, kl_cov_ratio, kl_cov_coef,
           kl_bias_correction, off_policy_mask_threshold, top_entropy_quantile):
        """(LossConfig, the sampler correction's tensor or None) from a loss's public
        keywords, each checked (a ValueError or TypeError naming it); ``mask`` that of a
        padded batch (None: packed), whose T is max_len's default. Every keyword is required,
        so that a public function that does not forward one fails at once rather than run
        with its default.

        Remembered: a call whose keywords are plain numbers, strings, booleans and None (each
        with its type), and whose tensors are present or absent (the mask's T), as a call that
        passed the checks before, takes that call's config without checking again (the
        tensors' values and shapes are loss_call's to check, on every call)."""
        scalars = (ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                   beta, entropy_coef, temperature, num_tokens, num_sequences, max_len,
                   rollout_is, rollout_is_max, rollout_is_min, objective, delta, sapo_tau_pos,
                   sapo_tau_neg, dro_beta, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                   vespo_lambda_neg, kl_cov_ratio, kl_cov_coef, kl_bias_correction,
                   off_policy_mask_threshold, top_entropy_quantile)
        key = None
        types = tuple(map(type, scalars))
        if _PLAIN.issuperset(types) and not torch.compiler.is_compiling():
            key = (types, scalars, ref_logprobs is None,
                   rollout_logprobs is None, rollout_weights is None, mask is None,
                   getattr(mask, "ndim", 0) == 2 and mask.shape[1])
            config = _REMEMBERED.get(key)
            if config is not None:
                return config, config.rollout_tensor(rollout_logprobs, rollout_weights)
        check.positive("temperature", temperature)
        check.loss_options(ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio,
                           aggregation, ref_logprobs, beta, num_tokens, num_sequences, max_len,
                           mask is not None, entropy_coef)
        check.rollout_options(rollout_logprobs, rollout_is, rollout_is_max, rollout_is_min,
                              rollout_weights)
        vespo = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        check.objective_options(objective, delta, sapo_tau_pos, sapo_tau_neg, dro_beta, vespo,
                                (kl_cov_ratio, kl_cov_coef), kl_bias_correction, ratio,
                                dual_clip, beta)
        check.optional_real("off_policy_mask_threshold", off_policy_mask_threshold)
        check.share_of_tokens("top_entropy_quantile", top_entropy_quantile,
                              "whose policy term counts, those of highest entropy")
        if max_len is None and getattr(mask, "ndim", 0) == 2:
            max_len = mask.shape[1]

        def number(x):
            return None if x is None else float(x)
        rollout, lo, hi = "", 0.0, math.inf
        if rollout_weights is not None:
            rollout = "weights"
        elif rollout_logprobs is not None:
            rollout = _text(rollout_is)
            lo = 0.0 if rollout_is_min is None else float(rollout_is_min)
            hi = float(ROLLOUT_IS_MAX if rollout_is_max is None else rollout_is_max)
        config = LossConfig(
            ratio=_text(ratio), clip_mode=_text(clip_mode), eps_low=float(eps_low),
            eps_high=float(eps_high), dual_clip=number(dual_clip),
            max_log_ratio=float(max_log_ratio),
            aggregation=_text(aggregation or default_aggregation(ratio)), beta=float(beta),
            entropy_coef=float(entropy_coef), temperature=float(temperature),
            num_tokens=number(num_tokens), num_sequences=number(num_sequences),
            max_len=number(max_len), ref=ref_logprobs is not None, rollout=rollout,
            rollout_is_min=lo, rollout_is_max=hi, objective=_text(objective),
            delta=number(delta), sapo_tau_pos=float(sapo_tau_pos),
            sapo_tau_neg=float(sapo_tau_neg), dro_beta=number(dro_beta),
            vespo_k_pos=float(vespo_k_pos), vespo_lambda_pos=float(vespo_lambda_pos),
            vespo_k_neg=float(vespo_k_neg), vespo_lambda_neg=float(vespo_lambda_neg),
            kl_cov_ratio=float(KL_COV_RATIO if kl_cov_ratio is None else kl_cov_ratio),
            kl_cov_coef=float(KL_COV_COEF if kl_cov_coef is None else kl_cov_coef),
            kl_bias_correction=bool(kl_bias_correction),
            off_policy_mask_threshold=number(off_policy_mask_threshold),
            top_entropy_quantile=float(top_entropy_quantile))
        tensor = config.rollout_tensor(rollout_logprobs, rollout_weights)
        if key is not None:
            if len(_REMEMBERED) >= _REMEMBER_AT_MOST:
                _REMEMBERED.clear()
            _REMEMBERED[key] = config
        return config, tensor

    # -- what the kernels read ------------------------------------------------------------
    @property
    def with_entropy(self) -> bool:
        """The entropy is computed (for the bonus, the top-entropy selection and its
        statistic)."""
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0

    @property
    def selects_tokens(self) -> bool:
        """A batch-wide token selection is made before op 4's kernel (KL-Cov's covariances,
        the top-entropy quantile): it needs every loss token's log-prob and entropy first."""
        return self.objective == "kl_cov" or self.top_entropy_quantile < 1.0

    @property
    def entropy_bonus(self) -> bool:
        """The entropy has a gradient: the bonus is on (the selection reads it detached)."""
        return self.entropy_coef != 0.0

    @property
    def rollout_per_sequence(self) -> bool:
        return self.rollout.startswith("sequence")

    @property
    def rollout_masks(self) -> bool:
        """Weights outside the bounds are set to 0 (the *_mask modes), not clamped."""
        return self.rollout.endswith("_mask")

    @property
    def objective_parameters(self) -> tuple:
        """The objective's parameters as the kernels take them, (param_pos, param_neg,
        param2_pos, param2_neg) by the advantage's sign: SAPO's temperatures, DRO's dro_beta,
        VESPO's shapes k and rates lambda, KL-Cov's kl_cov_coef; 1.0 where the objective has
        none."""
        if self.objective == "dro":
            return self.dro_beta, self.dro_beta, 1.0, 1.0
        if self.objective == "kl_cov":
            return self.kl_cov_coef, self.kl_cov_coef, 1.0, 1.0
        if self.objective == "sapo":
            return self.sapo_tau_pos, self.sapo_tau_neg, 1.0, 1.0
        if self.objective == "vespo":
            return (self.vespo_k_pos, self.vespo_k_neg, self.vespo_lambda_pos,
                    self.vespo_lambda_neg)
        return 1.0, 1.0, 1.0, 1.0

    # -- how it travels -------------------------------------------------------------------
    def encode(self) -> str:
        """The config as one string: the argument of the loss's torch.library ops (a schema
        holds no dataclass); ``decode`` reverses it. Plain string operations, which
        torch.compile traces (it cannot trace json)."""
        return "|".join(repr(getattr(self, f.name)) for f in dataclasses.fields(self))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(text: str) -> "LossConfig":
        return LossConfig(*(_DECODE[f.type](s) for f, s in
                            zip(dataclasses.fields(LossConfig), text.split("|"))))

    def replace(self, **changes) -> "LossConfig":
        return dataclasses.replace(self, **changes)

    def rollout_tensor(self, rollout_logprobs, rollout_weights):
        """The sampler correction's tensor among the two public inputs (None without one)."""
        if not self.rollout:
            return None
        return rollout_weights if self.rollout == "weights" else rollout_logprobs

    def rollout_inputs(self, rollout_tensor) -> dict:
        """{public name: tensor} of the sampler correction's input (empty without one)."""
        if not self.rollout:
            return {}
        return {"rollout_weights" if self.rollout == "weights" else "rollout_logprobs":
                rollout_tensor}

    def reference_keywords(self, rollout_tensor=None) -> dict:
        """The keywords of tic_kernels.reference's losses for this config (the sampler
        correction's tensor given apart), temperature excluded (the logits' and the LM head's
        references take it; the log-prob one does not)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ("temperature", "ref", "rollout", "rollout_is_min",
                                "rollout_is_max")}
        kw.update(self.rollout_inputs(rollout_tensor))
        if self.rollout and self.rollout != "weights":
            kw.update(rollout_is=self.rollout, rollout_is_min=self.rollout_is_min,
                      rollout_is_max=self.rollout_is_max)
        return kw

    def agreement(self) -> dict:
        """{argument name: value} of every field, as the ranks of a process group compare them
        (``ref`` left out: the ranks compare ref_logprobs itself)."""
        named = {"rollout": "rollout_is (or rollout_weights)"}
        return {named.get(f.name, f.name): getattr(self, f.name)
                for f in dataclasses.fields(self) if f.name != "ref"}


assert set(ROLLOUT_IS).isdisjoint({"", "weights"})

# LossConfig.of's memory of the calls that passed its checks (cleared when full)
_PLAIN = frozenset((str, float, int, bool, type(None)))
_REMEMBERED: dict = {}
_REMEMBER_AT_MOST = 512


def _text(option: str) -> str:
    """A checked string option as a plain str: an enum member or numpy string that equals an
    accepted value is accepted, and must encode as that value."""
    return str.__str__(option)


# decode's reading of each field type's repr (a field of another type fails here, at import)
_DECODE = {"str": lambda s: s[1:-1], "bool": lambda s: s == "True", "float": float,
           "Optional[float]": lambda s: None if s == "None" else float(s)}
assert all(f.type in _DECODE for f in dataclasses.fields(LossConfig)), \
    [f.type for f in dataclasses.fields(LossConfig)]


def loss_call(name, x, last, vocab, targets, old_logprobs, advantages, cu_seqlens, mask,
              ref_logprobs, keywords):
    """The checks of a loss over rows of ``x``: the logits (last dimension "V") or the hidden
    states of the fused LM head ("H"), packed (N, last) with cu_seqlens or padded (B, T, last)
    with mask; ``keywords`` LossConfig.of's, as the public function received them. Returns
    (LossConfig, the sampler correction's tensor or None)."""
    check.int_tensor("targets", targets)
    config, rollout = LossConfig.of(**keywords)
    check.layout(cu_seqlens, mask)
    if x.dim() != (2 if mask is None else 3):
        want = f"(B, T, {last}) with mask" if mask is not None else f"(N, {last}) with cu_seqlens"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    check.shape("targets", targets, x.shape[:-1], f" ({name}'s shape without {last})")
    check.same_device(name, x, targets=targets)
    check.loss_inputs(targets, "targets", cu_seqlens, mask, old_logprobs, advantages,
                      ref_logprobs, (name, x), keywords.get("max_len"),
                      config.rollout_inputs(rollout))
    check.targets_in_range(targets, vocab, mask=mask)
    return config, rollout
