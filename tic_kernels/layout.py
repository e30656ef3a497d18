"""How a batch is laid out, and the small helpers over it that the kernels' path and the
reference share: the sequences' lengths, chunks of rows, masked rows turned into ignored
targets, the loss's normaliser, the packed batch of op 5. Plain PyTorch, no kernels."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .options import IGNORE_INDEX


def lengths_of(cu_seqlens=None, mask=None):
    """(B,) int64 lengths of the sequences of either layout."""
    if cu_seqlens is not None:
        return (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return mask.bool().sum(1)


def row_chunks(a: int, b: int, rows: int):
    """[a, b) in the fewest pieces of at most ``rows``, of equal sizes (no ragged last GEMM)."""
    if b <= a:
        return []
    pieces = -(-(b - a) // rows)
    size = -(-(b - a) // pieces)
    return [(s, min(s + size, b)) for s in range(a, b, size)]


def aggregation_norm(aggregation, n_seq, n_tok, num_sequences=None, num_tokens=None,
                     max_len=None):
    """The loss's normaliser, from the counts of non-empty sequences and of tokens (tensors):
    1/N_tok (token-mean), 1/(B' max_len) (seq-mean-token-sum-norm), else 1/B'; the given
    global counts replace the batch's. A token's aggregation weight is norm, or norm / L_i
    under seq-mean-token-mean."""
    B = (n_seq if num_sequences is None else n_seq.new_tensor(float(num_sequences))).clamp(min=1)
    if aggregation == "token-mean":
        return 1.0 / (n_tok if num_tokens is None else n_tok.new_tensor(float(num_tokens))).clamp(min=1)
    if aggregation == "seq-mean-token-sum-norm":
        return 1.0 / (B * float(max_len))
    return 1.0 / B


def ignoring_masked(targets, mask):
    """targets with the positions outside ``mask`` set to IGNORE_INDEX (mask None: unchanged):
    the losses' way of never reading a padded row."""
    if mask is None:
        return targets
    return torch.where(mask.bool(), targets, torch.full_like(targets, IGNORE_INDEX))


def cu_seqlens_from(lengths):
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


@dataclass
class PackedBatch:
    """Packed tokens of a padded (B, T) batch; N_all kept tokens, N loss rows.

    input_ids (N_all,) kept ids, row-major; cu_seqlens (B+1,) int32; position_ids (N_all,)
    int64 restarting at 0 per sequence; indices (N_all,) int64 flat positions b * T + t of the
    kept tokens (for unpack); loss_rows (N,) int64 packed positions whose next kept token is a
    completion token; loss_targets (N,) those next tokens; loss_cu_seqlens (B+1,) int32 the loss
    rows per sequence; max_seqlen int, the longest sequence. The order is the extension op's.
    """
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    indices: torch.Tensor
    loss_rows: torch.Tensor
    loss_targets: torch.Tensor
    loss_cu_seqlens: torch.Tensor
    max_seqlen: int

    def tensors(self):
        """The seven tensors, in order (for comparing two packings)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "max_seqlen")
