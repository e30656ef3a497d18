"""Op 1: per-token log-softmax gather, with temperature and entropy.

    logp_t = z[t, y_t] / tau - logsumexp_v(z[t, v] / tau)
    H_t    = -sum_v p[t, v] log p[t, v],              p_t = softmax(z_t / tau)
    dL/dz[t, v] = (g_t (1[v = y_t] - p[t, v]) - gH_t p[t, v] (log p[t, v] + H_t)) / tau
"""
from __future__ import annotations

import torch

from . import reference
from . import validation as check


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Log-probability of each target under softmax(logits / temperature).

    Args:
        logits: (..., V) float16, bfloat16, float32 or float64; any strides.
        targets: (...) int32 or int64, in [0, V) or equal to ``ignore_index``.
        temperature: > 0; the logits are divided by it before the softmax.
        ignore_index: targets equal to it get logp 0, entropy 0 and a zero gradient, and their
            logits row is not read.
        return_entropy: also return the entropy of softmax(logits / temperature) per row.

    Returns:
        logp (...) float32 (float64 for float64 logits), and entropy of the same shape and dtype
        when ``return_entropy``. Differentiable w.r.t. logits (gradient in the logits' dtype).
    """
    check.float_tensor("logits", logits)
    check.int_tensor("targets", targets)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension of size >= 1, got shape "
                         f"{tuple(logits.shape)}")
    check.shape("targets", targets, logits.shape[:-1], " (the logits' shape without V)")
    check.same_device("logits", logits, targets=targets)
    check.positive("temperature", temperature)
    check.targets_in_range(targets, logits.shape[-1], ignore_index)
    return reference.token_logprobs(logits, targets, temperature, ignore_index, return_entropy)
