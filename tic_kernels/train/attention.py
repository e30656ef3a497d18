"""Varlen attention for packed sequences inside Hugging Face transformers models.

``register_varlen_attention()`` adds the attention implementation "tic_varlen": a model run
with it on packed input_ids (1, N_all) takes the sequence boundaries from the forward's
``cu_seq_lens_q`` / ``max_length_q`` keywords (as flash-attn's integration does) and builds no
(S, S) mask. On CUDA in fp16/bf16 it calls flash-attn's varlen kernel when it imports, else
torch.nn.attention.varlen; otherwise (the CPU, or a float32 model) causal sdpa per sequence
(the same function, for tests, CPUs and fp32). ``attention(lm, name)`` switches a model's implementation for a while (sampling
uses padded sdpa, the loss the packed varlen path).
"""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=None)
def _cuda_varlen():
    """(q, k, v, cu, max_len, scale) -> out on (S, H, D) tensors, k and v with H or fewer
    (grouped-query) heads: flash-attn's varlen kernel when it imports, else torch's built-in
    varlen flash attention. Both share each kv head among its query heads natively."""
    try:
        from flash_attn import flash_attn_varlen_func

        return lambda q, k, v, cu, n, scale: flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)
    except ImportError:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if "enable_gqa" in params:
            return lambda q, k, v, cu, n, scale: varlen_attn(
                q, k, v, cu, cu, n, n, scale=scale, enable_gqa=k.shape[1] != q.shape[1], **causal)

        def repeat_kv(q, k, v, cu, n, scale):  # a torch whose varlen_attn predates GQA
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, **causal)
        return repeat_kv


def varlen_kernel_applies(device_type: str, dtype: torch.dtype) -> bool:
    """The CUDA varlen kernels take fp16 and bf16 only: a float32 model (the trainer's default
    tiny Llama) runs causal sdpa per sequence instead, on CUDA as on the CPU."""
    return device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """A transformers attention function for packed sequences: query/key/value (1, H, S, D)
    (key/value may have fewer heads: grouped-query attention), sequences delimited by
    ``cu_seq_lens_q`` (passed through the model's forward). On CUDA in fp16/bf16 the varlen
    flash kernels; otherwise causal sdpa per sequence (the same function, slowly: it reads
    the sequence bounds on the host)."""
    if cu_seq_lens_q is None:
        raise ValueError("tic_varlen attention needs cu_seq_lens_q and max_length_q")
    if varlen_kernel_applies(query.device.type, query.dtype):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = _cuda_varlen()(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q), scaling)
        return out[None], None
    bounds = cu_seq_lens_q.tolist()
    gqa = key.shape[1] != query.shape[1]
    outs = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
        enable_gqa=gqa) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def register_varlen_attention():
    """Makes 'tic_varlen' a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register("tic_varlen", varlen_attention)
    # like flash-attn: no dense (S, S) mask for packed sequences
    AttentionMaskInterface.register("tic_varlen", flash_attention_mask)


@contextlib.contextmanager
def attention(lm, implementation):
    """Runs ``lm`` with another attention implementation (sdpa or tic_varlen) for a while."""
    before = lm.config._attn_implementation
    lm.config._attn_implementation = implementation
    try:
        yield
    finally:
        lm.config._attn_implementation = before
