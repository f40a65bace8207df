// CUDA rows function of the token-chunked fused divergence: the GPU twin of csrc/fused_divergence_cpu.cpp.
//
// The chunked strategy (minillm_fast/chunked.py) computes a chunk's logits zs, zt [C, V] with one cuBLAS matmul per
// model and hands them to a rows function, which returns per-row losses and statistics and writes G = dL/dz in place;
// G then feeds the two gradient matmuls (cuBLAS again). Nothing [N, V] exists; this kernel is the elementwise part.
//
// Math (docs/design.md section 2, divergence_rows.cuh): per row, s = softcap(z_s) / T, t = softcap(z_t) / T,
// lq = (s - m_s) - log l_s, lp = (t - m_t) - log l_t; L = sum_v phi; dL/dz_s = (q*g - q c_s) row_grad / T (1 - tanh^2).
//
// One thread block per row, rows_threads(V) threads (a power of two, at most 512; a function of V only, so a row's
// result does not depend on the chunk it is in). Per row:
//
//   sweep 1  each thread streams its entries tile by tile (common.cuh: kUnroll coalesced loads per thread per tile)
//            keeping the running maxima of s and t, sum e^(s - m_s), sum e^(t - m_t) and, for the two KLs, the
//            shifted accumulator sum e^(a - m_a) ((a - m_a) - (b - m_b)), rebased when a maximum moves (one exp per
//            entry and model). The block then takes the maxima over threads, rebases every thread's sums to them and
//            adds them (double). The KLs' loss, c_s and c_t come out of this single sweep.
//   sweep 2  (JSD, TVD, skew KLs) phi, q*g, p*h need normalised probabilities: a second sweep once both lse are known,
//            block-summed.
//   sweep 3  when a gradient is wanted: G written in place over z_s / z_t (each thread its own entries), already
//            multiplied by row_grad / T, and by 1 - tanh^2 under a softcap.
//
// Logits may be float32, float16 or bfloat16 (math in float32; G is stored back in the logits' dtype) or float64
// (math in float64). Per-row outputs are float32 (float64 for float64 logits). A NaN logit makes its row's loss,
// statistics and gradient NaN and leaves the other rows alone.

#include "divergence_rows.cuh"
#include "launchers.h"

#include <climits>

namespace minillm_fast_cuda {
namespace {

template <typename S, int KIND>
__global__ void __launch_bounds__(kMaxThreads)
divergence_rows_kernel(S* __restrict__ zs, S* __restrict__ zt,      // [C, V] logits, G written over them
                       int64_t ld_s, int64_t ld_t, int64_t V,         // row strides, vocabulary
                       const math_t<S>* __restrict__ row_grad,        // [C] upstream gradient (null: no gradient)
                       DivConsts<math_t<S>> c,                        // temperature, softcap, mixture weight
                       bool grad_s, bool grad_t,
                       math_t<S>* __restrict__ loss,                  // [C] out
                       math_t<S>* __restrict__ stats) {               // [C, 6] out
  using A = math_t<S>;
  constexpr int ACC = AccOf<KIND>::value;
  __shared__ A smem_m[2 * 32];
  __shared__ double smem_d[3 * 32];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x, nth = blockDim.x;
  S* xs = zs + r * ld_s;
  S* xt = zt + r * ld_t;

  const LseState<A> st = block_lse<ACC>(lse_thread<ACC>(xs, xt, V, tid, nth, c.k), smem_m, smem_d);
  RowResult res = finish_lse<KIND>(st);
  const LogProbs<A> lpo = LogProbs<A>::of(res);
  if constexpr (ACC == ACC_NONE) {
    double t[3];
    terms_thread<KIND>(xs, xt, V, tid, nth, c, lpo, t);
    block_allreduce<3>(t, SumOp{}, 0.0, smem_d);
    res.loss = t[0];
    res.c_s = t[1];
    res.c_t = t[2];
  }
  if (tid == 0) {
    loss[r] = static_cast<A>(res.loss);
    A* out = stats + 6 * r;
    out[0] = static_cast<A>(res.m_s);
    out[1] = static_cast<A>(res.log_ls);
    out[2] = static_cast<A>(res.m_t);
    out[3] = static_cast<A>(res.log_lt);
    out[4] = static_cast<A>(res.c_s);
    out[5] = static_cast<A>(res.c_t);
  }
  if (grad_s || grad_t) {
    const A scale = row_grad[r] * c.inv_t;
    grads_thread<KIND>(xs, xt, V, tid, nth, c, lpo, static_cast<A>(res.c_s), static_cast<A>(res.c_t), scale, grad_s,
                       grad_t);
  }
}

template <typename S>
cudaError_t launch(void* zs, void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V, const void* row_grad,
                   int kind, double log_w, double log_1mw, double temperature, double softcap, bool grad_s,
                   bool grad_t, void* loss, void* stats, cudaStream_t stream) {
  using A = math_t<S>;
  const DivConsts<A> c = DivConsts<A>::make(log_w, log_1mw, temperature, softcap);
  const dim3 grid(static_cast<unsigned>(C)), block(rows_threads(V));
  S* ps = static_cast<S*>(zs);
  S* pt = static_cast<S*>(zt);
  const A* rg = static_cast<const A*>(row_grad);
  A* pl = static_cast<A*>(loss);
  A* pst = static_cast<A*>(stats);
#define MINILLM_LAUNCH(K)                                                                                           \
  divergence_rows_kernel<S, K><<<grid, block, 0, stream>>>(ps, pt, ld_s, ld_t, V, rg, c, grad_s, grad_t, pl, pst); \
  break
  switch (kind) {
    case REVERSE_KL: MINILLM_LAUNCH(REVERSE_KL);
    case FORWARD_KL: MINILLM_LAUNCH(FORWARD_KL);
    case JSD: MINILLM_LAUNCH(JSD);
    case TVD: MINILLM_LAUNCH(TVD);
    case SKEW_FORWARD_KL: MINILLM_LAUNCH(SKEW_FORWARD_KL);
    case SKEW_REVERSE_KL: MINILLM_LAUNCH(SKEW_REVERSE_KL);
    default: return cudaErrorInvalidValue;
  }
#undef MINILLM_LAUNCH
  return cudaGetLastError();
}

}  // namespace

int row_kernel_threads(int64_t V) { return rows_threads(V); }

cudaError_t divergence_rows(DType dtype, void* zs, void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                            const void* row_grad, int kind, double log_w, double log_1mw, double temperature,
                            double softcap, bool grad_s, bool grad_t, void* loss, void* stats, cudaStream_t stream) {
  if (C < 0 || C > INT_MAX || V < 1 || ld_s < V || ld_t < V || ((grad_s || grad_t) && row_grad == nullptr))
    return cudaErrorInvalidValue;
  if (C == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32:
      return launch<float>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw, temperature, softcap, grad_s,
                           grad_t, loss, stats, stream);
    case kFloat64:
      return launch<double>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw, temperature, softcap, grad_s,
                            grad_t, loss, stats, stream);
    case kFloat16:
      return launch<__half>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw, temperature, softcap, grad_s,
                            grad_t, loss, stats, stream);
    case kBFloat16:
      return launch<__nv_bfloat16>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw, temperature, softcap,
                                   grad_s, grad_t, loss, stats, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace minillm_fast_cuda
