// Variable-length packing (docs/spec.md, op 5): operator schemas, CPU kernels, and the module init of
// tic_kernels._C. The CUDA kernels live in packing_cuda.cu and register under the same schemas.
//
// pack(input_ids, attention_mask, completion_mask), all (B, T):
//   kept positions  = attention_mask != 0, in row-major order (left/right padding or holes)
//   input_ids       (N_all,)  the kept ids          cu_seqlens      (B+1,) int32
//   position_ids    (N_all,)  int64, 0.. per row    indices         (N_all,) int64, b * T + t
//   loss_rows       (N,) int64 packed positions whose next kept token in the same row is a
//                   completion token; loss_targets (N,) those next tokens; loss_cu_seqlens
//                   (B+1,) int32; max_seqlen = the longest row (0-d int64, on the CPU).
// unpack(values (N, ...), indices (N,), batch, seqlen, pad) -> (batch, seqlen, ...).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "packing.h"

namespace tic_kernels {

void check_pack_inputs(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                       const at::Tensor& completion_mask) {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be 2-D (B, T), got ", input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == at::kInt || input_ids.scalar_type() == at::kLong,
              "input_ids must be int32 or int64, got ", input_ids.scalar_type());
  TORCH_CHECK(attention_mask.sizes() == input_ids.sizes(), "attention_mask has shape ",
              attention_mask.sizes(), ", expected ", input_ids.sizes());
  TORCH_CHECK(completion_mask.sizes() == input_ids.sizes(), "completion_mask has shape ",
              completion_mask.sizes(), ", expected ", input_ids.sizes());
  TORCH_CHECK(attention_mask.device() == input_ids.device() &&
                  completion_mask.device() == input_ids.device(),
              "input_ids, attention_mask and completion_mask must be on one device");
}

void check_unpack_inputs(const at::Tensor& values, const at::Tensor& indices, int64_t batch,
                         int64_t seqlen) {
  TORCH_CHECK(values.dim() >= 1, "values must have a leading token dimension");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong,
              "indices must be a 1-D int64 tensor");
  TORCH_CHECK(indices.size(0) == values.size(0), "indices has ", indices.size(0),
              " entries but values has ", values.size(0), " rows");
  TORCH_CHECK(batch >= 0 && seqlen >= 0, "batch and seqlen must be >= 0");
  TORCH_CHECK(indices.device() == values.device(), "indices and values must be on one device");
}

PackOutputs pack_outputs(const at::Tensor& input_ids, int64_t n_all, int64_t n_loss) {
  const auto ids = input_ids.options();
  const auto longs = ids.dtype(at::kLong);
  return {at::empty({n_all}, ids), at::empty({n_all}, longs), at::empty({n_all}, longs),
          at::empty({n_loss}, longs), at::empty({n_loss}, ids)};
}

std::vector<int64_t> unpacked_shape(const at::Tensor& values, int64_t rows) {
  std::vector<int64_t> shape{rows};
  for (int64_t d = 1; d < values.dim(); ++d) shape.push_back(values.size(d));
  return shape;
}

at::Tensor as_padded(const at::Tensor& rows, int64_t batch, int64_t seqlen) {
  std::vector<int64_t> shape{batch, seqlen};
  for (int64_t d = 1; d < rows.dim(); ++d) shape.push_back(rows.size(d));
  return rows.view(shape);
}

namespace {

template <typename id_t>
void pack_rows_cpu(const id_t* ids, const bool* keep, const bool* comp, int64_t B, int64_t T,
                   const int32_t* cu, const int32_t* loss_cu, id_t* packed, int64_t* pos,
                   int64_t* indices, int64_t* loss_rows, id_t* loss_targets) {
  for (int64_t b = 0; b < B; ++b) {
    int64_t rank = 0, loss_rank = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      if (!keep[i]) continue;
      const int64_t p = cu[b] + rank;
      packed[p] = ids[i];
      pos[p] = rank;
      indices[p] = i;
      if (comp[i] && rank > 0) {  // the previous kept token predicts this one
        loss_rows[loss_cu[b] + loss_rank] = p - 1;
        loss_targets[loss_cu[b] + loss_rank] = ids[i];
        ++loss_rank;
      }
      ++rank;
    }
  }
}

PackResult pack_cpu(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                    const at::Tensor& completion_mask) {
  check_pack_inputs(input_ids, attention_mask, completion_mask);
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const auto ids = input_ids.contiguous();
  const auto keep = attention_mask.to(at::kBool).contiguous();
  const auto comp = completion_mask.to(at::kBool).contiguous();
  const bool* k = keep.data_ptr<bool>();
  const bool* c = comp.data_ptr<bool>();

  auto cu = at::zeros({B + 1}, input_ids.options().dtype(at::kInt));
  auto loss_cu = at::zeros({B + 1}, input_ids.options().dtype(at::kInt));
  int32_t* cu_p = cu.data_ptr<int32_t>();
  int32_t* lcu_p = loss_cu.data_ptr<int32_t>();
  int64_t max_seqlen = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0, n_loss = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      if (!k[i]) continue;
      if (c[i] && n > 0) ++n_loss;
      ++n;
    }
    cu_p[b + 1] = static_cast<int32_t>(cu_p[b] + n);
    lcu_p[b + 1] = static_cast<int32_t>(lcu_p[b] + n_loss);
    max_seqlen = std::max(max_seqlen, n);
  }
  const int64_t n_all = cu_p[B], n_loss = lcu_p[B];
  auto [packed, pos, indices, loss_rows, loss_targets] = pack_outputs(input_ids, n_all, n_loss);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pack_cpu", [&] {
    pack_rows_cpu<index_t>(ids.data_ptr<index_t>(), k, c, B, T, cu_p, lcu_p,
                           packed.data_ptr<index_t>(), pos.data_ptr<int64_t>(),
                           indices.data_ptr<int64_t>(), loss_rows.data_ptr<int64_t>(),
                           loss_targets.data_ptr<index_t>());
  });
  return {packed,    cu,           pos,     indices,
          loss_rows, loss_targets, loss_cu, at::scalar_tensor(max_seqlen, at::kLong)};
}

at::Tensor unpack_cpu(const at::Tensor& values, const at::Tensor& indices, int64_t batch,
                      int64_t seqlen, const at::Scalar& pad) {
  check_unpack_inputs(values, indices, batch, seqlen);
  auto out = at::full(unpacked_shape(values, batch * seqlen), pad, values.options());
  out.index_copy_(0, indices, values);  // bounds-checked on the CPU
  return as_padded(out, batch, seqlen);
}

}  // namespace

TORCH_LIBRARY(tic_kernels, m) {
  m.def("pack(Tensor input_ids, Tensor attention_mask, Tensor completion_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("unpack(Tensor values, Tensor indices, int batch, int seqlen, Scalar pad) -> Tensor");
}

TORCH_LIBRARY_IMPL(tic_kernels, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace tic_kernels

// A plain Python module: importing tic_kernels._C runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
