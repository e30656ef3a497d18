"""The checks the public API runs (options.py holds the accepted values they check against).

Every check raises a Python exception that names the argument and says what was wrong. Checks
on tensor *values* (target range, cu_seqlens monotonicity, 0/1 masks) compute a flag on the
device; inside ``one_read()`` (every public op's checks run in one) the flags of the call are
gathered and read back to the host once, a single synchronisation on a GPU, and the first
failing check raises as if it had run alone (its message may read more values: that is the
error path). On the kernels' path one kernel makes the flags of the target range, cu_seqlens
and 0/1 mask checks (value_checks.py), torch ops the others'. They run in eager mode, and are skipped while torch.compile traces or when
TIC_KERNELS_CHECK_VALUES=0 (for training loops that validate their data once): the kernels
then keep their documented behaviour (an out-of-range target yields NaN, never a wrong finite
number). Shape, dtype and option checks always run, and raise at once.
"""
from __future__ import annotations

import math
import threading

import torch

from .backend import environment, use_triton
from .options import (AGGREGATIONS, CLIP_MODES, MAX_LOG_RATIO_BOUND, OBJECTIVES, RATIOS,
                      ROLLOUT_IS, ROLLOUT_IS_MAX, TOKEN_ONLY_OBJECTIVES, default_aggregation)
from .layout import lengths_of
from . import value_checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def _values_checked() -> bool:
    """TIC_KERNELS_CHECK_VALUES is not 0, and no graph is being traced."""
    return environment("TIC_KERNELS_CHECK_VALUES") != "0" and \
        not torch.compiler.is_compiling()


def checking_values(*tensors) -> bool:
    """Value checks run in eager mode on tensors whose values can be read (not meta); the
    environment is read once per gathering (a call's checks)."""
    checks = getattr(_GATHERING, "checks", None)
    if not (checks.on if checks is not None else _values_checked()):
        return False
    for t in tensors:
        if t is not None and t.is_meta:
            return False
    return True


class ValueChecks:
    """The value checks of one call: ``pending``, (flag, error) pairs in the order the checks
    were made, ``error()`` raising the check's exception (it may read values) when ``flag``
    is set: a device bool, or for a check handed to the batched kernel (``batched``) the
    position of its flag among that kernel's; ``batch``, those checks' inputs."""

    def __init__(self):
        self.pending = []
        self.batch = {}
        self.on = _values_checked()

    def batched(self, kind, inputs, errors) -> bool:
        """Hands the check ``kind`` (a key of value_checks.POSITIONS) of ``inputs`` to the
        kernel that makes every batched flag of the call in one launch, ``errors`` raising
        its flags' failures in order. False when it cannot take it: the kind is taken, or a
        tensor is not on the kernels' path or not on the device of the others (the caller
        then makes its flag with torch ops, as every other path does)."""
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        device = next(iter(self.batch.values()))[0].device if self.batch else tensors[0].device
        if kind in self.batch or any(t.device != device or t.dtype == torch.float64
                                     for t in tensors):
            return False
        if not self.batch and not use_triton(tensors[0]):  # (the device's path: once a call)
            return False
        self.batch[kind] = inputs
        self.pending.extend(zip(value_checks.POSITIONS[kind], errors))
        return True

    def _values(self):
        """Every flag in one int32 tensor (the batched kernel's first, then the others in
        order) and the position in it of each pending check's."""
        parts, where, others = [], [], 0
        if self.batch:
            parts.append(value_checks.flags(self.batch))
            others = value_checks.FLAGS
        device = parts[0].device if parts else self.pending[0][0].device
        torch_flags = []
        for flag, _ in self.pending:
            if isinstance(flag, int):
                where.append(flag)
            else:
                where.append(others + len(torch_flags))
                torch_flags.append(flag.reshape(()).to(device))
        if torch_flags:
            parts.append(torch.stack(torch_flags).to(torch.int32))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), where

    def failed(self):
        """A bool tensor on the flags' device, True if any check failed (None: no check)."""
        return self._values()[0].any() if self.pending else None

    def raise_first(self):
        """Reads every flag at once (one host read) and raises the first failure's error."""
        if not self.pending:
            return
        values, where = self._values()
        values = values.tolist()
        for i, (_, error) in zip(where, self.pending):
            if values[i]:
                error()


_GATHERING = threading.local()


class _Gathering:
    """The context of gathered() and one_read() (a class: a generator's context manager costs
    several microseconds of host time, which every public call would pay)."""
    __slots__ = ("read", "outer", "checks")

    def __init__(self, read):
        self.read = read

    def __enter__(self):
        self.outer = getattr(_GATHERING, "checks", None)
        self.checks = self.outer if self.outer is not None else ValueChecks()
        _GATHERING.checks = self.checks
        return self.checks

    def __exit__(self, *exc):
        _GATHERING.checks = self.outer
        if self.read and self.outer is None:
            self.checks.raise_first()  # raising here chains the block's own error, if any
        return False


def gathered():
    """Value checks made inside are kept in the ValueChecks yielded instead of read (an outer
    gathering keeps them: the outermost reads)."""
    return _Gathering(read=False)


def one_read():
    """The value checks made inside are read back together when the block ends (one host
    read), and the first that failed raises then. When the block raises, a value check that
    failed before it raises instead (the error path reads the flags): the error is the one
    the checks give in their order, as if each value check had raised at once."""
    return _Gathering(read=True)


def value_check(bad, error):
    """Raises ``error()`` when the device bool ``bad`` is True: at the end of the enclosing
    gathering, or at once outside one."""
    checks = getattr(_GATHERING, "checks", None)
    if checks is not None:
        checks.pending.append((bad, error))
    elif bool(bad):
        error()


def batched(kind, inputs, errors) -> bool:
    """Hands a value check to the enclosing gathering's batched kernel (ValueChecks.batched);
    False outside a gathering, or where the kernel cannot take it."""
    checks = getattr(_GATHERING, "checks", None)
    return checks is not None and checks.batched(kind, inputs, errors)


def choice(name, value, accepted):
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: "
                         + ", ".join(repr(a) for a in accepted))


def integer(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


def boolean(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _real(value) -> bool:
    """A finite Python int or float (not a bool, not a tensor)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def optional_real(name, value):
    if value is not None and not _real(value):
        raise ValueError(f"{name} must be a finite number or None, got {value!r}")


def positive(name, value, allow_zero=False):
    if not _real(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def float_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")


def int_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def shape(name, t, expected, what=""):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}{what}")


def same_device(ref_name, ref, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def targets_in_range(targets, vocab, ignore_index=None, mask=None):
    """Targets in [0, vocab) (or equal to ignore_index); with a mask, only where it is set."""
    if not checking_values(targets, mask) or targets.numel() == 0:
        return

    def outside():
        bad = (targets < 0) | (targets >= vocab)
        if ignore_index is not None:
            bad &= targets != ignore_index
        return bad if mask is None else bad & mask.bool()

    def error():
        allowed = f"[0, {vocab})" + ("" if ignore_index is None else
                                     f" or ignore_index={ignore_index}")
        raise ValueError(f"targets must lie in {allowed}; found {targets[outside()][0].item()}")
    if not batched("targets", (targets, vocab, ignore_index, mask), [error]):
        value_check(outside().any(), error)


def nonnegative(name, t):
    """Every entry of t is >= 0 (a value check)."""
    if checking_values(t) and t.numel():
        def error():
            raise ValueError(f"{name} must be >= 0, found {t.min().item()}")
        value_check((t < 0).any(), error)


def finite_nonnegative(name, t, mask=None):
    """Every entry of t (where ``mask`` is set) is finite and >= 0 (a value check)."""
    if checking_values(t, mask) and t.numel():
        bad = ~torch.isfinite(t) | (t < 0)
        if mask is not None:
            bad &= mask.bool()

        def error():
            raise ValueError(f"{name} must be finite and >= 0, found {t[bad][0].item()}")
        value_check(bad.any(), error)


def cu_seqlens_ok(cu_seqlens, n, device_of=None):
    """cu_seqlens (B+1,) int: 0, non-decreasing, last entry n; on ``device_of``'s device when
    given as (name, tensor). Device and shape are checked before any value is read."""
    int_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B+1 >= 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if device_of is not None:
        same_device(*device_of, cu_seqlens=cu_seqlens)
    if not checking_values(cu_seqlens):
        return
    cu = cu_seqlens

    def message(text):
        def error():
            raise ValueError(text.format(first=cu[0].item(), last=cu[-1].item()))
        return error
    errors = [message("cu_seqlens must start at 0, got {first}"),
              message("cu_seqlens must be non-decreasing"),
              message(f"cu_seqlens must end at the number of tokens {n}, got {{last}}")]
    if not batched("cu_seqlens", (cu, n), errors):
        for bad, error in zip((cu[0] != 0, (cu[1:] < cu[:-1]).any(), cu[-1] != n), errors):
            value_check(bad, error)


def mask_ok(mask, expected_shape, name="mask", device_of=None):
    """A (B, T) tensor of the expected shape holding only 0 and 1 (or bool), on
    ``device_of``'s device when given as (name, tensor)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(mask.shape)}")
    shape(name, mask, expected_shape)
    if device_of is not None:
        same_device(*device_of, **{name: mask})
    if mask.dtype != torch.bool and checking_values(mask) and mask.numel():
        def error():
            raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor)")
        if not batched("mask", (mask,), [error]):
            value_check(((mask != 0) & (mask != 1)).any(), error)


def max_len_ok(max_len, cu_seqlens, mask):
    """max_len, when given, is at least the longest sequence (a value check)."""
    if max_len is None or not checking_values(cu_seqlens, mask):
        return
    lengths = lengths_of(cu_seqlens, mask)
    if lengths.numel():
        def error():
            raise ValueError(f"max_len={max_len!r} is smaller than the longest sequence "
                             f"({int(lengths.max())} tokens)")
        value_check((lengths > max_len).any(), error)


def layout(cu_seqlens, mask):
    if (cu_seqlens is None) == (mask is None):
        raise ValueError("pass exactly one of cu_seqlens (packed layout) or mask (padded layout)")


def lm_head(name, hidden, weight, bias, chunk_size, fp32_accumulation):
    """The fused LM head's inputs: hidden (..., H), weight (V, H) and bias (V,) of one float
    dtype on one device; chunk_size None or an int >= 1."""
    float_tensor(name, hidden)
    float_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be (V, H) with V >= 1 (nn.Linear's layout), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name} must be (..., H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but {name} is {hidden.dtype}: cast one so "
                        "that the LM head's GEMM has one dtype")
    same_device(name, hidden, weight=weight, bias=bias)
    if bias is not None:
        float_tensor("bias", bias)
        shape("bias", bias, weight.shape[:1], " (one per vocabulary entry)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}")
    if chunk_size is not None:
        integer("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (rows of logits per chunk), got {chunk_size}")
    boolean("fp32_accumulation", fp32_accumulation)


def per_token(name, t, expected_shape, device_of):
    float_tensor(name, t)
    shape(name, t, expected_shape, " (one value per token)")
    same_device(*device_of, **{name: t})


def advantages_ok(advantages, num_seqs, device_of):
    float_tensor("advantages", advantages)
    shape("advantages", advantages, (num_seqs,), " (one advantage per sequence)")
    same_device(*device_of, advantages=advantages)


def loss_options(ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                 ref_logprobs, beta, num_tokens, num_sequences, max_len, padded,
                 entropy_coef=0.0):
    """Checks the loss keywords (tic_kernels.config.LossConfig.of runs it)."""
    choice("ratio", ratio, RATIOS)
    choice("clip_mode", clip_mode, CLIP_MODES)
    if aggregation is not None:
        choice("aggregation", aggregation, AGGREGATIONS)
    if not (_real(eps_low) and 0 <= eps_low < 1):
        raise ValueError(f"eps_low must lie in [0, 1) so that 1 - eps_low > 0, got {eps_low!r}")
    if not (_real(eps_high) and 0 <= eps_high <= 10):
        raise ValueError(f"eps_high must lie in [0, 10], got {eps_high!r}")
    if dual_clip is not None and not (_real(dual_clip) and 1 < dual_clip):
        raise ValueError(f"dual_clip must be a finite number > 1 (or None), got {dual_clip!r}")
    positive("max_log_ratio", max_log_ratio)
    if max_log_ratio > MAX_LOG_RATIO_BOUND:
        raise ValueError(f"max_log_ratio must be <= {MAX_LOG_RATIO_BOUND:g} so that exp() of the "
                         f"capped log-ratio stays finite in float32, got {max_log_ratio!r}")
    positive("beta", beta, allow_zero=True)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's log-probabilities)")
    if not _real(entropy_coef):
        raise ValueError(f"entropy_coef must be a finite number, got {entropy_coef!r}")
    agg = aggregation or default_aggregation(ratio)
    if num_tokens is not None:
        positive("num_tokens", num_tokens)
        if agg != "token-mean":
            raise ValueError(f"num_tokens only applies to aggregation='token-mean', not {agg!r}")
    if num_sequences is not None:
        positive("num_sequences", num_sequences)
        if agg == "token-mean":
            raise ValueError("num_sequences does not apply to aggregation='token-mean'")
    if max_len is not None:
        positive("max_len", max_len)
    if agg == "seq-mean-token-sum-norm" and max_len is None and not padded:
        raise ValueError("aggregation='seq-mean-token-sum-norm' needs max_len with the packed "
                         "layout (with a mask it defaults to T)")


def share_of_tokens(name, value, what, default=""):
    """A share of the loss tokens, a number in (0, 1]."""
    if not (_real(value) and 0 < value <= 1):
        raise ValueError(f"{name} (the share of the loss tokens {what}) must be a number in "
                         f"(0, 1]{default}, got {value!r}")


def objective_options(objective, delta, sapo_tau_pos, sapo_tau_neg, dro_beta, vespo, kl_cov,
                      kl_bias_correction, ratio, dual_clip, beta):
    """Checks the objective's keywords (docs/spec.md, op 4: clip, cispo, sapo, dppo_tv,
    dppo_kl, dro, gmpo, vespo, kl_cov; ``vespo`` the four vespo_k_pos, vespo_lambda_pos,
    vespo_k_neg, vespo_lambda_neg; ``kl_cov`` kl_cov_ratio and kl_cov_coef, None for their
    defaults)."""
    choice("objective", objective, OBJECTIVES)
    if objective != "clip" and ratio == "none":
        raise ValueError(f"objective={objective!r} weighs a ratio; ratio='none' has none (use "
                         "a ratio, or objective='clip' with ratio='none' for A log pi)")
    if objective in TOKEN_ONLY_OBJECTIVES and ratio != "token":
        raise ValueError(f"objective={objective!r} acts on each token's own log-ratio: it "
                         f"takes ratio='token', not {ratio!r}")
    if objective == "gmpo" and ratio != "sequence_mean":
        raise ValueError(f"objective='gmpo' is the geometric mean of the tokens' clipped "
                         f"ratios: it takes ratio='sequence_mean', not {ratio!r}")
    if objective == "dro":
        if not (_real(dro_beta) and dro_beta > 0):
            raise ValueError(f"dro_beta (the strength of DRO's quadratic log-ratio penalty) "
                             f"must be a finite number > 0 with objective='dro', got "
                             f"{dro_beta!r}")
    elif dro_beta is not None:
        raise ValueError(f"dro_beta is DRO's penalty: it needs objective='dro', not "
                         f"{objective!r}")
    share, coef = kl_cov
    if objective == "kl_cov":
        if share is not None:
            share_of_tokens("kl_cov_ratio", share, "KL-Cov penalises", " (or None: 0.0002)")
        if coef is not None:
            positive("kl_cov_coef", coef, allow_zero=True)
    else:
        for name, value in (("kl_cov_ratio", share), ("kl_cov_coef", coef)):
            if value is not None:
                raise ValueError(f"{name} belongs to KL-Cov's penalty: it needs "
                                 f"objective='kl_cov', not {objective!r}")
    if delta is not None:
        if not (_real(delta) and delta > 0):
            raise ValueError(f"delta (the upper bound of the unclipped ratio) must be a finite "
                             f"number > 0 (or None), got {delta!r}")
        if objective not in ("clip", "dppo_tv", "dppo_kl"):
            raise ValueError(f"delta bounds the clipped objective's ratio (and DPPO's weight); "
                             f"objective={objective!r} has no such branch")
        if ratio == "none":
            raise ValueError("delta bounds a ratio; ratio='none' has none")
    if dual_clip is not None and objective != "clip":
        raise ValueError(f"dual_clip applies to objective='clip', not {objective!r}")
    for name, tau in (("sapo_tau_pos", sapo_tau_pos), ("sapo_tau_neg", sapo_tau_neg)):
        if not (_real(tau) and tau > 0):
            raise ValueError(f"{name} (SAPO's gate temperature) must be a finite number > 0, "
                             f"got {tau!r}")
    for name, value in zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                            "vespo_lambda_neg"), vespo):
        if not (_real(value) and value >= 0):
            raise ValueError(f"{name} (VESPO's gamma weight's {name.split('_')[1]}) must be a "
                             f"finite number >= 0, got {value!r}")
    boolean("kl_bias_correction", kl_bias_correction)
    if kl_bias_correction and not beta > 0:
        raise ValueError("kl_bias_correction weighs the KL term by the ratio: it needs beta > 0 "
                         "(and ref_logprobs)")
    if kl_bias_correction and ratio == "none":
        raise ValueError("kl_bias_correction weighs the KL term by the ratio; ratio='none' has "
                         "none")


def gather_call(name, x, last, vocab, targets, temperature, ignore_index, return_entropy):
    """The checks of a log-prob gather over rows of ``x`` once x's own have passed: the
    logits (last dimension "V") or the fused LM head's hidden states ("H")."""
    int_tensor("targets", targets)
    shape("targets", targets, x.shape[:-1], f" ({name}'s shape without {last})")
    same_device(name, x, targets=targets)
    positive("temperature", temperature)
    integer("ignore_index", ignore_index)
    boolean("return_entropy", return_entropy)
    targets_in_range(targets, vocab, ignore_index)


def rollout_options(rollout_logprobs, rollout_is, rollout_is_max, rollout_is_min,
                    rollout_weights):
    """Checks the keywords of the sampler correction (op 4b); the tensors' shapes are
    loss_inputs' to check."""
    if rollout_is_max is not None and not (
            isinstance(rollout_is_max, (int, float)) and not isinstance(rollout_is_max, bool)
            and rollout_is_max > 0):  # NaN fails the comparison
        raise ValueError(f"rollout_is_max must be a number > 0 (float('inf'): no upper bound; "
                         f"None: {ROLLOUT_IS_MAX:g}), got {rollout_is_max!r}")
    if rollout_is_min is not None:
        positive("rollout_is_min", rollout_is_min, allow_zero=True)
        top = ROLLOUT_IS_MAX if rollout_is_max is None else rollout_is_max
        if rollout_is_min > top:
            raise ValueError(f"rollout_is_min={rollout_is_min!r} exceeds "
                             f"rollout_is_max={top!r}")
    if rollout_weights is not None:
        if rollout_logprobs is not None:
            raise ValueError("pass rollout_logprobs (with rollout_is) or rollout_weights "
                             "(precomputed weights), not both")
        given = [f"{k}={v!r}" for k, v in (("rollout_is", rollout_is),
                                           ("rollout_is_max", rollout_is_max),
                                           ("rollout_is_min", rollout_is_min)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} applies to rollout_logprobs; rollout_weights are used "
                             "as given (bound or mask them before passing them)")
        return
    if rollout_is is not None:
        choice("rollout_is", rollout_is, ROLLOUT_IS)
        if rollout_logprobs is None:
            raise ValueError(f"rollout_is={rollout_is!r} needs rollout_logprobs (the sampler's "
                             "per-token log-probabilities)")
    elif rollout_logprobs is not None:
        raise ValueError("rollout_logprobs needs rollout_is, the correction to apply: "
                         + ", ".join(repr(m) for m in ROLLOUT_IS))


def loss_inputs(tokens, token_name, cu_seqlens, mask, old_logprobs, advantages, ref_logprobs,
                device_of, max_len=None, rollout=None):
    """Check the layout and the per-token and per-sequence tensors of a loss; returns B.

    ``tokens`` is the per-token tensor that fixes the layout (targets or logprobs): (N,) with
    cu_seqlens, (B, T) with mask. ``device_of`` is (name, tensor) of the input that fixes the
    device (the logits, or the log-probabilities), as the error messages name it.
    """
    layout(cu_seqlens, mask)
    if cu_seqlens is not None:
        if tokens.dim() != 1:
            raise ValueError(f"{token_name} must be 1-D (N,) with cu_seqlens, got shape "
                             f"{tuple(tokens.shape)}")
        cu_seqlens_ok(cu_seqlens, tokens.shape[0], device_of=device_of)
        num_seqs = cu_seqlens.shape[0] - 1
    else:
        if tokens.dim() != 2:
            raise ValueError(f"{token_name} must be 2-D (B, T) with mask, got shape "
                             f"{tuple(tokens.shape)}")
        mask_ok(mask, tokens.shape, device_of=device_of)
        num_seqs = tokens.shape[0]
    per_token("old_logprobs", old_logprobs, tokens.shape, device_of)
    if ref_logprobs is not None:
        per_token("ref_logprobs", ref_logprobs, tokens.shape, device_of)
    for name in ("rollout_logprobs", "rollout_weights"):
        if (rollout or {}).get(name) is not None:
            per_token(name, rollout[name], tokens.shape, device_of)
    if (rollout or {}).get("rollout_logprobs") is not None:
        # NaN marks a token the sampler did not score; +inf is no log-probability (and with a
        # -inf elsewhere in the sequence its weight would be NaN)
        sampler = rollout["rollout_logprobs"]
        if checking_values(sampler, mask) and sampler.numel():
            bad = sampler == math.inf
            if mask is not None:
                bad &= mask.bool()

            def error():
                raise ValueError("rollout_logprobs must be log-probabilities (or NaN where "
                                 "the sampler gave none), found +inf")
            value_check(bad.any(), error)
    if (rollout or {}).get("rollout_weights") is not None:
        finite_nonnegative("rollout_weights", rollout["rollout_weights"], mask)
    advantages_ok(advantages, num_seqs, device_of)
    max_len_ok(max_len, cu_seqlens, mask)
    return num_seqs
