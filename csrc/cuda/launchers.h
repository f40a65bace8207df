// Host entry points of the CUDA row kernels (csrc/cuda/*.cu): raw device pointers, sizes and a stream, no torch.
// bindings.cpp wraps them for ATen tensors; the .cu files include only CUDA headers, so nvcc compiles them without
// torch (tests/test_native_cuda.py does, on machines without a GPU).
//
// Common arguments. A chunk of logits is [C, V] with contiguous rows: element (r, v) at z[r * ld + v], ld >= V.
// `dtype` names the logits' storage type; math is fp32 for fp32 / fp16 / bf16 logits and fp64 for fp64 logits, and
// every per-row output (and row_grad) has that math type (float, or double for kFloat64). Launches are asynchronous
// on `stream`; the return value is the launch's error (cudaSuccess if it was queued), and C == 0 launches nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace minillm_fast_cuda {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Threads per block of every row kernel for a row of V entries (a power of two in [32, 512]; rows never depend on
// the chunk they are in).
int row_kernel_threads(int64_t V);

// The rows function of the token-chunked fused divergence (csrc/fused_divergence_cpu.cpp's, on the GPU).
//   zs, zt      [C, V] student / teacher logits (raw, before temperature and softcap); overwritten with
//               G = dL/dz (scaled by row_grad) where grad_s / grad_t, left alone otherwise
//   row_grad    [C] upstream gradient of each row's loss (math type); may be null when neither gradient is asked
//   kind        0..5: reverse_kl, forward_kl, jsd, tvd, skew_forward_kl, skew_reverse_kl (divergences.py)
//   log_w, log_1mw   log of the mixture weight (beta / skew) and of 1 - it, LOG_ZERO (-1e30) for log 0
//   loss        [C] out; stats [C, 6] out: m_s, log l_s, m_t, log l_t, c_s, c_t
cudaError_t divergence_rows(DType dtype, void* zs, void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                            const void* row_grad, int kind, double log_w, double log_1mw, double temperature,
                            double softcap, bool grad_s, bool grad_t, void* loss, void* stats, cudaStream_t stream);

// One token per row from the mixture alpha p + (1 - alpha) q (p = softmax(t) the teacher, q = softmax(s) the
// student), or from q alone when zt is null.
//   seed        [1] int64 on the device: the Philox key (read by the kernel: no host sync)
//   row_offset  global index of the chunk's first row: the Philox counters use row_offset + r, so the draws do not
//               depend on the chunking
//   tokens      [C] int64 out; lq, lp, lm [C] out: log q(y), log p(y), log(alpha p(y) + (1 - alpha) q(y));
//               lp and lm are not written (may be null) without a teacher
cudaError_t mixture_sample_rows(DType dtype, const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C,
                                int64_t V, const int64_t* seed, int64_t row_offset, double alpha, double temperature,
                                double softcap, int64_t* tokens, void* lq, void* lp, void* lm, cudaStream_t stream);

// Rollout statistics of given tokens: log q(y), log p(y) and the full-vocabulary KL(q || p), one sweep per row.
//   tokens      [C] int64 in [0, V) (clamped into it: the caller validates ids)
//   lq, lp, rkl [C] out
cudaError_t rollout_statistics_rows(DType dtype, const void* zs, const void* zt, int64_t ld_s, int64_t ld_t,
                                    int64_t C, int64_t V, const int64_t* tokens, double temperature, double softcap,
                                    void* lq, void* lp, void* rkl, cudaStream_t stream);

}  // namespace minillm_fast_cuda
