// CUDA row kernels of rollout time (minillm_fast/ops/sampling.py): the mixture sampler and the rollout statistics,
// on chunk logits [C, V] that the caller computes with one cuBLAS matmul per model (as the chunked strategy does).
//
// mixture_sample_rows_kernel   one block per row, one sweep over both models' rows: the online max / sum-exp of
//                              each (for the log-probs) and the Gumbel-max of the chosen component (sampling.cuh
//                              explains the randomness: the uniforms are those of kernels/sampling.py). The block
//                              reduces the maxima, the rebased sums and the best (score, token); thread 0 forms
//                              log q(y) = (s_y - m_s) - log l_s, log p(y) and log m(y) = log(alpha p(y) + (1 - alpha)
//                              q(y)). Without a teacher it samples q and skips the teacher's row.
// rollout_statistics_rows_kernel   the same sweep with the reverse-KL accumulator of divergence_rows.cu's first
//                              sweep: log q(y), log p(y) of given tokens and
//                              KL(q || p) = acc / l_s - log l_s + log l_t.
//
// Threads per row, dtypes and outputs as in divergence_rows.cu (launchers.h). No gradients: rollouts are data.

#include "launchers.h"
#include "sampling.cuh"

#include <climits>

namespace minillm_fast_cuda {
namespace {

// The block's best (score, token), every thread getting it.
template <typename A>
__device__ __forceinline__ Best<A> block_best(Best<A> b, A* smem_score, int64_t* smem_token) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
MINILLM_UNROLL
  for (int o = 16; o > 0; o >>= 1) {
    const Best<A> other{__shfl_xor_sync(0xffffffffu, b.score, o),
                        static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(b.token), o))};
    b = best_of(b, other);
  }
  __syncthreads();
  if (lane == 0) {
    smem_score[warp] = b.score;
    smem_token[warp] = b.token;
  }
  __syncthreads();
  b = lane < nwarps ? Best<A>{smem_score[lane], smem_token[lane]} : Best<A>{smem_score[0], smem_token[0]};
MINILLM_UNROLL
  for (int o = 16; o > 0; o >>= 1) {
    const Best<A> other{__shfl_xor_sync(0xffffffffu, b.score, o),
                        static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(b.token), o))};
    b = best_of(b, other);
  }
  return b;
}

template <typename S, bool TEACHER>
__global__ void __launch_bounds__(kMaxThreads)
mixture_sample_rows_kernel(const S* __restrict__ zs, const S* __restrict__ zt,  // [C, V] logits (zt unused without
                           int64_t ld_s, int64_t ld_t, int64_t V,                // TEACHER)
                           const int64_t* __restrict__ seed_ptr,                 // [1] Philox key
                           int64_t row_offset,                                   // global index of row 0
                           double alpha, Scaling<math_t<S>> k,
                           int64_t* __restrict__ tokens,                         // [C] out
                           math_t<S>* __restrict__ lq,                           // [C] out: log q(y)
                           math_t<S>* __restrict__ lp,                           // [C] out: log p(y) (TEACHER)
                           math_t<S>* __restrict__ lm) {                         // [C] out: log m(y) (TEACHER)
  using A = math_t<S>;
  __shared__ A smem_m[2 * 32];
  __shared__ double smem_d[3 * 32];
  __shared__ A smem_score[32];
  __shared__ int64_t smem_token[32];
  const int64_t r = blockIdx.x, row = row_offset + r;
  const int tid = threadIdx.x, nth = blockDim.x;
  const S* xs = zs + r * ld_s;
  const S* xt = TEACHER ? zt + r * ld_t : nullptr;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  // the coin is drawn with or without a teacher: alpha = 0 draws what the student alone draws (as on triton)
  const bool use_t = TEACHER && teacher_coin(seed, row, alpha);

  LseState<A> st;
  Best<A> best;
  sample_thread<TEACHER>(xs, xt, V, tid, nth, k, seed, row, use_t, st, best);
  st = block_lse<ACC_NONE>(st, smem_m, smem_d);
  best = block_best(best, smem_score, smem_token);
  if (tid == 0) {
    const A m_chosen = use_t ? st.m_t : st.m_s;
    const int64_t y = (best.token == kNoToken || is_nan(m_chosen)) ? 0 : best.token;  // NaN row: token 0
    tokens[r] = y;
    const double lq_y = logprob_at(k.scaled(xs[y]), st.m_s, st.l_s);
    lq[r] = static_cast<A>(lq_y);
    if (TEACHER) {
      const double lp_y = logprob_at(k.scaled(xt[y]), st.m_t, st.l_t);
      lp[r] = static_cast<A>(lp_y);
      lm[r] = static_cast<A>(log_mix(lp_y, lq_y, alpha));
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kMaxThreads)
rollout_statistics_rows_kernel(const S* __restrict__ zs, const S* __restrict__ zt,  // [C, V] logits
                               int64_t ld_s, int64_t ld_t, int64_t V,
                               const int64_t* __restrict__ tokens,                   // [C] token ids
                               Scaling<math_t<S>> k,
                               math_t<S>* __restrict__ lq,                           // [C] out: log q(y)
                               math_t<S>* __restrict__ lp,                           // [C] out: log p(y)
                               math_t<S>* __restrict__ rkl) {                        // [C] out: KL(q || p)
  using A = math_t<S>;
  __shared__ A smem_m[2 * 32];
  __shared__ double smem_d[3 * 32];
  const int64_t r = blockIdx.x;
  const S* xs = zs + r * ld_s;
  const S* xt = zt + r * ld_t;
  const LseState<A> st =
      block_lse<ACC_REVERSE>(lse_thread<ACC_REVERSE>(xs, xt, V, threadIdx.x, blockDim.x, k), smem_m, smem_d);
  if (threadIdx.x == 0) {
    const int64_t y = clamp_token(tokens[r], V);
    lq[r] = static_cast<A>(logprob_at(k.scaled(xs[y]), st.m_s, st.l_s));
    lp[r] = static_cast<A>(logprob_at(k.scaled(xt[y]), st.m_t, st.l_t));
    rkl[r] = static_cast<A>(st.acc / st.l_s - log(st.l_s) + log(st.l_t));
  }
}

template <typename S>
cudaError_t launch_sample(const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                          const int64_t* seed, int64_t row_offset, double alpha, double temperature, double softcap,
                          int64_t* tokens, void* lq, void* lp, void* lm, cudaStream_t stream) {
  using A = math_t<S>;
  const Scaling<A> k = Scaling<A>::make(temperature, softcap);
  const dim3 grid(static_cast<unsigned>(C)), block(rows_threads(V));
  const S* ps = static_cast<const S*>(zs);
  if (zt != nullptr) {
    mixture_sample_rows_kernel<S, true><<<grid, block, 0, stream>>>(
        ps, static_cast<const S*>(zt), ld_s, ld_t, V, seed, row_offset, alpha, k, tokens, static_cast<A*>(lq),
        static_cast<A*>(lp), static_cast<A*>(lm));
  } else {
    mixture_sample_rows_kernel<S, false><<<grid, block, 0, stream>>>(
        ps, nullptr, ld_s, 0, V, seed, row_offset, alpha, k, tokens, static_cast<A*>(lq), nullptr, nullptr);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_statistics(const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                              const int64_t* tokens, double temperature, double softcap, void* lq, void* lp,
                              void* rkl, cudaStream_t stream) {
  using A = math_t<S>;
  const Scaling<A> k = Scaling<A>::make(temperature, softcap);
  const dim3 grid(static_cast<unsigned>(C)), block(rows_threads(V));
  rollout_statistics_rows_kernel<S><<<grid, block, 0, stream>>>(
      static_cast<const S*>(zs), static_cast<const S*>(zt), ld_s, ld_t, V, tokens, k, static_cast<A*>(lq),
      static_cast<A*>(lp), static_cast<A*>(rkl));
  return cudaGetLastError();
}

}  // namespace

cudaError_t mixture_sample_rows(DType dtype, const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C,
                                int64_t V, const int64_t* seed, int64_t row_offset, double alpha, double temperature,
                                double softcap, int64_t* tokens, void* lq, void* lp, void* lm, cudaStream_t stream) {
  if (C < 0 || C > INT_MAX || V < 1 || ld_s < V || (zt != nullptr && (ld_t < V || lp == nullptr || lm == nullptr)) ||
      seed == nullptr || row_offset < 0 || !(alpha >= 0.0 && alpha <= 1.0))
    return cudaErrorInvalidValue;
  if (C == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32:
      return launch_sample<float>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap, tokens, lq,
                                  lp, lm, stream);
    case kFloat64:
      return launch_sample<double>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap, tokens,
                                   lq, lp, lm, stream);
    case kFloat16:
      return launch_sample<__half>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap, tokens,
                                   lq, lp, lm, stream);
    case kBFloat16:
      return launch_sample<__nv_bfloat16>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap,
                                          tokens, lq, lp, lm, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rollout_statistics_rows(DType dtype, const void* zs, const void* zt, int64_t ld_s, int64_t ld_t,
                                    int64_t C, int64_t V, const int64_t* tokens, double temperature, double softcap,
                                    void* lq, void* lp, void* rkl, cudaStream_t stream) {
  if (C < 0 || C > INT_MAX || V < 1 || ld_s < V || ld_t < V || zt == nullptr || tokens == nullptr)
    return cudaErrorInvalidValue;
  if (C == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32:
      return launch_statistics<float>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl, stream);
    case kFloat64:
      return launch_statistics<double>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl, stream);
    case kFloat16:
      return launch_statistics<__half>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl, stream);
    case kBFloat16:
      return launch_statistics<__nv_bfloat16>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace minillm_fast_cuda
