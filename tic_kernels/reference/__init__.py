"""The executable specification: every op of docs/spec.md in plain PyTorch, the oracle the
kernels are tested against and the CPU path (CPU tensors without TRITON_INTERPRET=1). No
function here runs on the kernels' path.

Tests, benchmarks and the CPU path all use these functions. They are written for clarity
first, with two exceptions that matter at real sizes:

* the logits are processed in row chunks, so a (16k, 152k) bf16 batch never has an fp32 copy of
  the whole (N, V) matrix in memory (the backward recomputes each chunk's softmax);
* log-ratios are formed per token (logp - logp_old) in fp32 before any reduction, never as a
  difference of two per-sequence sums (that loses ~1e-2 of Delta at 8k tokens).

Inputs are assumed valid (``tic_kernels.validation`` checks them in the public API). Float64
inputs compute in float64 (for gradcheck); everything else computes in float32. Outputs that are
log-probabilities, ratios, losses or statistics are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from ..layout import (PackedBatch, aggregation_norm, cu_seqlens_from, ignoring_masked,
                      lengths_of, row_chunks)
from .logprobs import (compute_dtype, linear_token_logprobs, token_logprobs,
                       vocab_logits_grad, vocab_partials, vocab_token_logprobs)
from .loss import (clipped_objective, group_advantages, linear_tic_loss, masked_rows,
                   rollout_correction, segment_ids, segment_sum, sequence_logprobs, tic_loss,
                   tic_loss_from_logprobs)
from .packing import varlen_pack, varlen_unpack

__all__ = ["PackedBatch", "aggregation_norm", "clipped_objective",
           "compute_dtype", "cu_seqlens_from", "group_advantages", "ignoring_masked",
           "lengths_of", "linear_tic_loss", "linear_token_logprobs", "masked_rows",
           "rollout_correction", "row_chunks", "segment_ids", "segment_sum",
           "sequence_logprobs", "tic_loss", "tic_loss_from_logprobs", "token_logprobs",
           "varlen_pack", "varlen_unpack", "vocab_logits_grad", "vocab_partials",
           "vocab_token_logprobs"]
