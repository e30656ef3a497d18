// CUDA kernels of the packing extension (schemas and the contract: packing.cpp).
//
// One thread block per row. Pass 1 counts each row's kept tokens and loss rows; the row
// offsets are their cumulative sums. Pass 2 walks the row in tiles of blockDim tokens and
// gives each kept token its rank with a block-wide exclusive scan of a 0/1 flag (warp ballots,
// then a shuffle scan of the warp totals), carrying the running count between tiles. Work is
// linear in B * T; the only host synchronisation is the copy of three totals that size the
// outputs (see pack_cuda).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <climits>

#include "packing.h"

namespace tic_kernels {
namespace {

constexpr int kThreads = 256;  // a multiple of 32: the scan works in whole warps

// Exclusive prefix count of `flag` over the block; *total gets the block's count.
// Every thread of the block must call it (it synchronises).
__device__ int block_exclusive_count(bool flag, int* smem, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int rank_in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) smem[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    const int v = lane < warps ? smem[lane] : 0;
    int inclusive = v;
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    smem[lane] = inclusive - v;
    if (lane == 31) smem[32] = inclusive;
  }
  __syncthreads();
  const int result = smem[warp] + rank_in_warp;
  *total = smem[32];
  __syncthreads();  // smem is reused by the next call
  return result;
}

__global__ void count_rows_kernel(const bool* keep, const bool* comp, int64_t T,
                                  int32_t* lengths, int32_t* loss_lengths) {
  __shared__ int kept, kept_comp, first;
  if (threadIdx.x == 0) {
    kept = 0;
    kept_comp = 0;
    first = INT_MAX;
  }
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * T;
  int n = 0, nc = 0, f = INT_MAX;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    if (keep[row + t]) {
      ++n;
      nc += comp[row + t];
      f = min(f, static_cast<int>(t));
    }
  }
  atomicAdd(&kept, n);
  atomicAdd(&kept_comp, nc);
  atomicMin(&first, f);
  __syncthreads();
  if (threadIdx.x == 0) {
    // every kept completion token is a loss target except a row's first kept token
    const bool first_is_comp = first < T && comp[row + first];
    lengths[blockIdx.x] = kept;
    loss_lengths[blockIdx.x] = kept_comp - (first_is_comp ? 1 : 0);
  }
}

template <typename id_t>
__global__ void pack_rows_kernel(const id_t* ids, const bool* keep, const bool* comp, int64_t T,
                                 const int32_t* cu, const int32_t* loss_cu, id_t* packed,
                                 int64_t* pos, int64_t* indices, int64_t* loss_rows,
                                 id_t* loss_targets) {
  __shared__ int smem[33];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * T;
  const int64_t base = cu[blockIdx.x], loss_base = loss_cu[blockIdx.x];
  int carry = 0, loss_carry = 0;
  for (int64_t t0 = 0; t0 < T; t0 += blockDim.x) {  // uniform trip count: scans sync safely
    const int64_t t = t0 + threadIdx.x;
    const int64_t i = row + t;
    const bool kept = t < T && keep[i];
    int total, loss_total;
    const int rank = carry + block_exclusive_count(kept, smem, &total);
    const bool is_loss = kept && comp[i] && rank > 0;
    const int loss_rank = loss_carry + block_exclusive_count(is_loss, smem, &loss_total);
    if (kept) {
      packed[base + rank] = ids[i];
      pos[base + rank] = rank;
      indices[base + rank] = i;
    }
    if (is_loss) {
      loss_rows[loss_base + loss_rank] = base + rank - 1;
      loss_targets[loss_base + loss_rank] = ids[i];
    }
    carry += total;
    loss_carry += loss_total;
  }
}

template <typename scalar_t>
__global__ void scatter_rows_kernel(const scalar_t* values, const int64_t* indices, int64_t n,
                                    int64_t width, int64_t rows, scalar_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * width;
       e += stride) {
    const int64_t r = e / width;
    const int64_t dst = indices[r];
    if (dst >= 0 && dst < rows) out[dst * width + (e - r * width)] = values[e];
  }
}

PackResult pack_cuda(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                     const at::Tensor& completion_mask) {
  check_pack_inputs(input_ids, attention_mask, completion_mask);
  const c10::cuda::CUDAGuard guard(input_ids.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const auto ids = input_ids.contiguous();
  const auto keep = attention_mask.to(at::kBool).contiguous();
  const auto comp = completion_mask.to(at::kBool).contiguous();
  auto int_opts = input_ids.options().dtype(at::kInt);
  auto lengths = at::zeros({B}, int_opts);
  auto loss_lengths = at::zeros({B}, int_opts);
  if (B > 0 && T > 0) {
    count_rows_kernel<<<B, kThreads, 0, stream>>>(keep.data_ptr<bool>(), comp.data_ptr<bool>(),
                                                  T, lengths.data_ptr<int32_t>(),
                                                  loss_lengths.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto cu = at::zeros({B + 1}, int_opts);
  auto loss_cu = at::zeros({B + 1}, int_opts);
  cu.slice(0, 1).copy_(lengths.cumsum(0, at::kInt));
  loss_cu.slice(0, 1).copy_(loss_lengths.cumsum(0, at::kInt));
  // The one host synchronisation: the output sizes (and max_seqlen) in a single copy.
  auto longest = B > 0 ? lengths.max().reshape({1}) : at::zeros({1}, int_opts);
  const auto sizes = at::cat({cu.slice(0, B), loss_cu.slice(0, B), longest}).cpu();
  const int64_t n_all = sizes[0].item<int32_t>(), n_loss = sizes[1].item<int32_t>();
  const int64_t max_seqlen = sizes[2].item<int32_t>();

  auto [packed, pos, indices, loss_rows, loss_targets] = pack_outputs(input_ids, n_all, n_loss);
  if (n_all > 0) {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pack_cuda", [&] {
      pack_rows_kernel<index_t><<<B, kThreads, 0, stream>>>(
          ids.data_ptr<index_t>(), keep.data_ptr<bool>(), comp.data_ptr<bool>(), T,
          cu.data_ptr<int32_t>(), loss_cu.data_ptr<int32_t>(), packed.data_ptr<index_t>(),
          pos.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), loss_rows.data_ptr<int64_t>(),
          loss_targets.data_ptr<index_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {packed,    cu,           pos,     indices,
          loss_rows, loss_targets, loss_cu, at::scalar_tensor(max_seqlen, at::kLong)};
}

at::Tensor unpack_cuda(const at::Tensor& values, const at::Tensor& indices, int64_t batch,
                       int64_t seqlen, const at::Scalar& pad) {
  check_unpack_inputs(values, indices, batch, seqlen);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto src = values.contiguous();
  const auto idx = indices.contiguous();
  auto out = at::full(unpacked_shape(values, batch * seqlen), pad, values.options());
  const int64_t n = values.size(0);
  const int64_t width = n > 0 ? values.numel() / n : 1;
  if (n > 0 && width > 0) {
    const int64_t blocks = std::min<int64_t>((n * width + kThreads - 1) / kThreads, 65535);
    AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, values.scalar_type(),
                               "unpack_cuda", [&] {
      scatter_rows_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          src.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), n, width, batch * seqlen,
          out.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return as_padded(out, batch, seqlen);
}

}  // namespace

TORCH_LIBRARY_IMPL(tic_kernels, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
}

}  // namespace tic_kernels
