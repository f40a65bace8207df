// ATen bindings of the CUDA row kernels (launchers.h): argument checks that name the argument, output allocation,
// the device guard and the current stream. Compiled (by minillm_fast/native_cuda.py) only where torch is a CUDA build
// and a CUDA toolkit is found; the kernels themselves are in divergence_rows.cu and sampling.cu.
//
// The functions mirror the CPU extension's (csrc/fused_divergence_cpu.cpp, csrc/sampling_cpu.cpp) on CUDA tensors:
// the same arguments, the same in-place contract, per-row outputs in float32 (float64 for float64 logits), and
// float16 / bfloat16 logits accepted as well (math in float32).

#include <torch/extension.h>

// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: that one also pulls in the cuBLAS / cuSPARSE /
// cuSOLVER headers, which these bindings do not use (at::cuda::getCurrentCUDAStream is c10::cuda's, re-exported).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "launchers.h"

namespace minillm_fast_cuda {
// A named namespace of its own: the ops share their names with the launchers of launchers.h, and an anonymous
// namespace would put both in one overload set for `minillm_fast_cuda::divergence_rows`.
namespace bind {
namespace {

constexpr const char* kRows = "divergence_rows";
constexpr const char* kSample = "mixture_sample_rows";
constexpr const char* kStats = "rollout_statistics_rows";

DType storage_dtype(const char* op, const char* name, const at::Tensor& z) {
  switch (z.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16 chunk logits [C, V], got ",
              z.scalar_type());
  return kFloat32;  // unreachable
}

// float32 math (and outputs) for every logits dtype but float64
at::ScalarType math_dtype(const at::Tensor& z) { return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_logits(const char* op, const char* name, const at::Tensor& z) {
  TORCH_CHECK(z.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", z.device());
  storage_dtype(op, name, z);
  TORCH_CHECK(z.dim() == 2, op, ": ", name, " must be 2-D [C, V], got shape ", z.sizes());
  TORCH_CHECK(z.size(1) >= 1, op, ": ", name, " must have at least one vocabulary entry, got shape ", z.sizes());
  TORCH_CHECK(z.stride(1) == 1 && (z.size(0) <= 1 || z.stride(0) >= z.size(1)), op, ": ", name,
              " must have contiguous rows (stride(1) == 1, rows not overlapping); got strides ", z.strides(),
              " (it is read and written in place, so it is not copied: pass z.contiguous())");
  TORCH_CHECK(z.size(0) <= std::numeric_limits<int32_t>::max(), op, ": ", name, " has ", z.size(0),
              " rows; at most 2^31 - 1 per call (split the chunk)");
}

void check_same_logits(const char* op, const char* name, const at::Tensor& z, const at::Tensor& zs) {
  check_logits(op, name, z);
  TORCH_CHECK(z.device() == zs.device(), op, ": ", name, " must be on the device of zs (", zs.device(), "), got ",
              z.device());
  TORCH_CHECK(z.sizes() == zs.sizes(), op, ": ", name, " must have the shape of zs ", zs.sizes(), ", got ",
              z.sizes());
  TORCH_CHECK(z.scalar_type() == zs.scalar_type(), op, ": ", name, " must have the dtype of zs (", zs.scalar_type(),
              "), got ", z.scalar_type());
  TORCH_CHECK(z.numel() == 0 || z.data_ptr() != zs.data_ptr(), op, ": zs and ", name,
              " must be distinct buffers (both are read, and written in place)");
}

// A per-row vector [C] on zs's device, converted to `dtype` and made contiguous.
at::Tensor rows_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& zs,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.device() == zs.device(), op, ": ", name, " must be on the device of the logits (", zs.device(),
              "), got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == zs.size(0), op, ": ", name, " must have shape [", zs.size(0),
              "] (one entry per row of the logits), got ", t.sizes());
  return t.to(dtype).contiguous();
}

void check_scalars(const char* op, double temperature, double softcap) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------------------------------
// zs, zt: [C, V] raw chunk logits (student, teacher), contiguous rows; overwritten with G where grad_s / grad_t.
// row_grad: [C] upstream gradient of each row's loss, required when a gradient is wanted. Returns loss [C] and
// stats [C, 6] (m_s, log l_s, m_t, log l_t, c_s, c_t).
std::tuple<at::Tensor, at::Tensor> divergence_rows(at::Tensor zs, at::Tensor zt, c10::optional<at::Tensor> row_grad,
                                                   int64_t kind, double log_w, double log_1mw, double temperature,
                                                   double softcap, bool grad_s, bool grad_t) {
  check_logits(kRows, "zs", zs);
  check_same_logits(kRows, "zt", zt, zs);
  TORCH_CHECK(kind >= 0 && kind <= 5, kRows, ": kind must be in [0, 5] ",
              "(reverse_kl, forward_kl, jsd, tvd, skew_forward_kl, skew_reverse_kl), got ", kind);
  check_scalars(kRows, temperature, softcap);
  TORCH_CHECK(!std::isnan(log_w) && log_w <= 0 && !std::isnan(log_1mw) && log_1mw <= 0, kRows,
              ": log_w and log_1mw must be logs of weights in [0, 1] (LOG_ZERO for 0), got ", log_w, " and ",
              log_1mw);
  const auto math = math_dtype(zs);
  at::Tensor rg;
  if (grad_s || grad_t) {
    TORCH_CHECK(row_grad.has_value() && row_grad->defined(), kRows,
                ": row_grad [C] is required when grad_s or grad_t is set");
    TORCH_CHECK(at::isFloatingType(row_grad->scalar_type()), kRows,
                ": row_grad must be a floating-point tensor, got ", row_grad->scalar_type());
    rg = rows_vector(kRows, "row_grad", *row_grad, zs, math);
  }
  const int64_t C = zs.size(0), V = zs.size(1);
  auto loss = at::empty({C}, zs.options().dtype(math));
  auto stats = at::empty({C, 6}, zs.options().dtype(math));
  if (C == 0) return {loss, stats};
  const c10::cuda::CUDAGuard guard(zs.device());
  check_launch(kRows, minillm_fast_cuda::divergence_rows(
                          storage_dtype(kRows, "zs", zs), zs.data_ptr(), zt.data_ptr(), zs.stride(0), zt.stride(0), C,
                          V, rg.defined() ? rg.data_ptr() : nullptr, static_cast<int>(kind), log_w, log_1mw,
                          temperature, softcap, grad_s, grad_t, loss.data_ptr(), stats.data_ptr(),
                          at::cuda::getCurrentCUDAStream(zs.device().index()).stream()));
  return {loss, stats};
}

// zs: [C, V] raw chunk logits of the student, zt: the teacher's or None; seed: [1] int64 (the Philox key; moved to
// the device if it is not there: keep it there to avoid a copy); row_offset: global index of the chunk's first row.
// Returns tokens [C] int64, log q(y), log p(y) and log m(y) [C] (the last two [0] without a teacher).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_sample_rows(const at::Tensor& zs,
                                                                               const c10::optional<at::Tensor>& zt,
                                                                               const at::Tensor& seed,
                                                                               int64_t row_offset, double alpha,
                                                                               double temperature, double softcap) {
  check_logits(kSample, "zs", zs);
  const bool teacher = zt.has_value() && zt->defined();
  if (teacher) check_same_logits(kSample, "zt", *zt, zs);
  check_scalars(kSample, temperature, softcap);
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, kSample, ": alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, kSample,
              ": seed must be an int64 tensor of one element, got ", seed.scalar_type(), " ", seed.sizes());
  TORCH_CHECK(row_offset >= 0, kSample, ": row_offset must be >= 0, got ", row_offset);
  const int64_t C = zs.size(0), V = zs.size(1);
  const auto math = math_dtype(zs);
  auto tokens = at::empty({C}, zs.options().dtype(at::kLong));
  auto lq = at::empty({C}, zs.options().dtype(math));
  auto lp = at::empty({teacher ? C : 0}, zs.options().dtype(math));
  auto lm = at::empty({teacher ? C : 0}, zs.options().dtype(math));
  if (C == 0) return {tokens, lq, lp, lm};
  const at::Tensor key = seed.reshape({1}).to(zs.device()).contiguous();
  const c10::cuda::CUDAGuard guard(zs.device());
  check_launch(kSample, minillm_fast_cuda::mixture_sample_rows(
                            storage_dtype(kSample, "zs", zs), zs.data_ptr(), teacher ? zt->data_ptr() : nullptr,
                            zs.stride(0), teacher ? zt->stride(0) : 0, C, V, key.data_ptr<int64_t>(), row_offset,
                            alpha, temperature, softcap, tokens.data_ptr<int64_t>(), lq.data_ptr(),
                            teacher ? lp.data_ptr() : nullptr, teacher ? lm.data_ptr() : nullptr,
                            at::cuda::getCurrentCUDAStream(zs.device().index()).stream()));
  return {tokens, lq, lp, lm};
}

// zs, zt: [C, V] raw chunk logits; tokens: [C] integer ids in [0, V) (clamped: the caller validates them). Returns
// log q(y), log p(y) and KL(q || p), each [C].
std::tuple<at::Tensor, at::Tensor, at::Tensor> rollout_statistics_rows(const at::Tensor& zs, const at::Tensor& zt,
                                                                       const at::Tensor& tokens, double temperature,
                                                                       double softcap) {
  check_logits(kStats, "zs", zs);
  check_same_logits(kStats, "zt", zt, zs);
  check_scalars(kStats, temperature, softcap);
  TORCH_CHECK(!at::isFloatingType(tokens.scalar_type()) && !at::isComplexType(tokens.scalar_type()) &&
                  tokens.scalar_type() != at::kBool,
              kStats, ": tokens must be an integer tensor, got ", tokens.scalar_type());
  const at::Tensor y = rows_vector(kStats, "tokens", tokens, zs, at::kLong);
  const int64_t C = zs.size(0), V = zs.size(1);
  const auto math = math_dtype(zs);
  auto lq = at::empty({C}, zs.options().dtype(math));
  auto lp = at::empty({C}, zs.options().dtype(math));
  auto rkl = at::empty({C}, zs.options().dtype(math));
  if (C == 0) return {lq, lp, rkl};
  const c10::cuda::CUDAGuard guard(zs.device());
  check_launch(kStats, minillm_fast_cuda::rollout_statistics_rows(
                           storage_dtype(kStats, "zs", zs), zs.data_ptr(), zt.data_ptr(), zs.stride(0), zt.stride(0),
                           C, V, y.data_ptr<int64_t>(), temperature, softcap, lq.data_ptr(), lp.data_ptr(),
                           rkl.data_ptr(), at::cuda::getCurrentCUDAStream(zs.device().index()).stream()));
  return {lq, lp, rkl};
}

}  // namespace bind
}  // namespace minillm_fast_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minillm-fast native CUDA row kernels; see csrc/cuda/launchers.h";
  m.def("divergence_rows", &minillm_fast_cuda::bind::divergence_rows,
        "Loss [C], stats [C, 6] of CUDA chunk logits zs, zt [C, V]; G written in place when grad_s / grad_t.",
        py::arg("zs"), py::arg("zt"), py::arg("row_grad"), py::arg("kind"), py::arg("log_w"), py::arg("log_1mw"),
        py::arg("temperature"), py::arg("softcap"), py::arg("grad_s"), py::arg("grad_t"));
  m.def("mixture_sample_rows", &minillm_fast_cuda::bind::mixture_sample_rows,
        "Tokens [C] from alpha p + (1 - alpha) q and log q(y), log p(y), log m(y) of CUDA chunk logits.",
        py::arg("zs"), py::arg("zt"), py::arg("seed"), py::arg("row_offset"), py::arg("alpha"),
        py::arg("temperature"), py::arg("softcap"));
  m.def("rollout_statistics_rows", &minillm_fast_cuda::bind::rollout_statistics_rows,
        "log q(y), log p(y), KL(q || p) [C] of CUDA chunk logits zs, zt [C, V] and tokens [C].", py::arg("zs"),
        py::arg("zt"), py::arg("tokens"), py::arg("temperature"), py::arg("softcap"));
  m.def("threads", &minillm_fast_cuda::row_kernel_threads, "Threads per block of the row kernels for V entries.",
        py::arg("V"));
}
