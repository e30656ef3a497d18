// Shared declarations of the packing extension (see packing.cpp for the contract).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace tic_kernels {

// input_ids, cu_seqlens, position_ids, indices, loss_rows, loss_targets, loss_cu_seqlens,
// max_seqlen (a 0-d int64 tensor on the CPU: the CUDA path has it on the host already, and a
// tensor, unlike a data-dependent int, can be faked for torch.compile)
using PackResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor>;

// packed ids, position ids, indices, loss rows, loss targets: allocated, not filled
using PackOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
PackOutputs pack_outputs(const at::Tensor& input_ids, int64_t n_all, int64_t n_loss);

void check_pack_inputs(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                       const at::Tensor& completion_mask);
void check_unpack_inputs(const at::Tensor& values, const at::Tensor& indices, int64_t batch,
                         int64_t seqlen);
std::vector<int64_t> unpacked_shape(const at::Tensor& values, int64_t rows);
// (batch * seqlen, ...) -> a (batch, seqlen, ...) view
at::Tensor as_padded(const at::Tensor& rows, int64_t batch, int64_t seqlen);

}  // namespace tic_kernels
