"""Accepted option values, defaults, the result type, and the checks the public API runs.

Every check raises a Python exception that names the argument and says what was wrong. Checks
on tensor *values* (target range, cu_seqlens monotonicity, 0/1 masks) read a few bytes back to
the host, a synchronisation on a GPU. They run in eager mode, and are skipped while
torch.compile traces or when TIC_KERNELS_CHECK_VALUES=0 (for training loops that validate
their data once): the kernels then keep their documented behaviour (an out-of-range target
yields NaN, never a wrong finite number). Shape, dtype and option checks always run.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

RATIOS = ("trajectory", "sequence_mean", "token", "none")
CLIP_MODES = ("two_sided", "upper")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REDUCES = ("sum", "mean")
SCALES = ("group", "batch", "none")
STDS = ("sample", "population")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


class LossOutput(NamedTuple):
    """``loss``: scalar float32 tensor with autograd. ``stats``: dict of detached float32 scalars:
    clip_fraction, ratio_mean, ratio_max, cap_fraction, delta_abs_mean, logp_mean, and
    entropy_mean (when entropy is computed) and kl_mean (when ref_logprobs is given)."""
    loss: torch.Tensor
    stats: dict


def default_aggregation(ratio: str) -> str:
    return "token-mean" if ratio == "token" else "seq-mean-token-mean"


def _checking_values() -> bool:
    return os.environ.get("TIC_KERNELS_CHECK_VALUES", "1") != "0" and not torch.compiler.is_compiling()


def choice(name, value, accepted):
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: "
                         + ", ".join(repr(a) for a in accepted))


def positive(name, value, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
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
    if not _checking_values() or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= vocab)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if mask is not None:
        bad &= mask.bool()
    if bool(bad.any()):
        first = targets[bad][0].item()
        allowed = f"[0, {vocab})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"targets must lie in {allowed}; found {first}")


def cu_seqlens_ok(cu_seqlens, n):
    int_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B+1 >= 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if not _checking_values():
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] != n:
        raise ValueError(f"cu_seqlens must end at the number of tokens {n}, got {cu[-1]}")


def mask_ok(mask, expected_shape, name="mask"):
    """A (B, T) tensor of the expected shape holding only 0 and 1 (or bool)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {tuple(mask.shape)}")
    shape(name, mask, expected_shape)
    if mask.dtype != torch.bool and _checking_values() and mask.numel():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor)")


def layout(cu_seqlens, mask):
    if (cu_seqlens is None) == (mask is None):
        raise ValueError("pass exactly one of cu_seqlens (packed layout) or mask (padded layout)")


def per_token(name, t, expected_shape, ref):
    float_tensor(name, t)
    shape(name, t, expected_shape, " (one value per token, like targets)")
    same_device("logits", ref, **{name: t})


def advantages_ok(advantages, num_seqs, ref):
    float_tensor("advantages", advantages)
    shape("advantages", advantages, (num_seqs,), " (one advantage per sequence)")
    same_device("logits", ref, advantages=advantages)


def loss_options(ratio, clip_mode, eps_low, eps_high, dual_clip, max_log_ratio, aggregation,
                 ref_logprobs, beta, num_tokens, num_sequences, max_len, padded,
                 entropy_coef=0.0):
    choice("ratio", ratio, RATIOS)
    choice("clip_mode", clip_mode, CLIP_MODES)
    if aggregation is not None:
        choice("aggregation", aggregation, AGGREGATIONS)
    if not (isinstance(eps_low, (int, float)) and 0 <= eps_low < 1):
        raise ValueError(f"eps_low must lie in [0, 1) so that 1 - eps_low > 0, got {eps_low!r}")
    if not (isinstance(eps_high, (int, float)) and 0 <= eps_high <= 10):
        raise ValueError(f"eps_high must lie in [0, 10], got {eps_high!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and 1 < dual_clip < math.inf):
        raise ValueError(f"dual_clip must be a finite number > 1 (or None), got {dual_clip!r}")
    positive("max_log_ratio", max_log_ratio)
    positive("beta", beta, allow_zero=True)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's log-probabilities)")
    if not (isinstance(entropy_coef, (int, float)) and math.isfinite(entropy_coef)):
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


def loss_inputs(tokens, token_name, cu_seqlens, mask, old_logprobs, advantages, ref_logprobs, ref):
    """Check the layout and the per-token and per-sequence tensors of a loss; returns B.

    ``tokens`` is the per-token tensor that fixes the layout (targets or logprobs): (N,) with
    cu_seqlens, (B, T) with mask.
    """
    layout(cu_seqlens, mask)
    if cu_seqlens is not None:
        if tokens.dim() != 1:
            raise ValueError(f"{token_name} must be 1-D (N,) with cu_seqlens, got shape "
                             f"{tuple(tokens.shape)}")
        cu_seqlens_ok(cu_seqlens, tokens.shape[0])
        same_device("logits", ref, cu_seqlens=cu_seqlens)
        num_seqs = cu_seqlens.shape[0] - 1
    else:
        if tokens.dim() != 2:
            raise ValueError(f"{token_name} must be 2-D (B, T) with mask, got shape "
                             f"{tuple(tokens.shape)}")
        mask_ok(mask, tokens.shape)
        same_device("logits", ref, mask=mask)
        num_seqs = tokens.shape[0]
    per_token("old_logprobs", old_logprobs, tokens.shape, ref)
    if ref_logprobs is not None:
        per_token("ref_logprobs", ref_logprobs, tokens.shape, ref)
    advantages_ok(advantages, num_seqs, ref)
    return num_seqs
