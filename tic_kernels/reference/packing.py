"""The reference of op 5: a padded batch packed into variable-length sequences, and back
(the C++/CUDA extension computes the same)."""
from __future__ import annotations

import torch

from ..layout import PackedBatch, cu_seqlens_from
from .loss import segment_ids


def varlen_pack(input_ids, attention_mask, completion_mask):
    """Padded (B, T) batch -> PackedBatch (tic_kernels.ops.packing.pack). A loss row is a packed
    position whose next kept token in the same sequence is a completion token; its target is
    that token."""
    B, T = attention_mask.shape
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    indices = keep.reshape(-1).nonzero().squeeze(1)
    packed = input_ids.reshape(-1)[indices]
    position_ids = (keep.long().cumsum(1) - 1).reshape(-1)[indices]
    completion = completion_mask.bool().reshape(-1)[indices]
    has_prev = position_ids > 0
    src = (completion & has_prev).nonzero().squeeze(1)  # packed positions of predicted tokens
    loss_rows = src - 1
    seq = segment_ids(lengths)
    loss_lengths = torch.bincount(seq[src], minlength=B)
    return PackedBatch(packed, cu_seqlens_from(lengths), position_ids, indices, loss_rows,
                       packed[src], cu_seqlens_from(loss_lengths),
                       int(lengths.max()) if B and T else 0)


def varlen_unpack(values, indices, batch, seqlen, pad=0.0):
    """(N, ...) values scattered to (batch, seqlen, ...) at the flat ``indices``; ``pad``
    elsewhere. Differentiable w.r.t. values."""
    out = values.new_full((batch * seqlen, *values.shape[1:]), pad)
    out = out.index_put((indices,), values)
    return out.view(batch, seqlen, *values.shape[1:])
