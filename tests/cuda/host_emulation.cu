// Test harness, not part of the extension: the CUDA row kernels' per-thread code (csrc/cuda/*.cuh) run on the CPU.
//
// tests/test_native_cuda.py builds this file with nvcc into a host-only shared library (no GPU needed) and calls it
// through ctypes on CPU tensors. Each function below replays one kernel of csrc/cuda/divergence_rows.cu /
// sampling.cu for every row: the same per-thread functions for each of the rows_threads(V) threads, then the block
// reductions done sequentially (maxima with nan_max, the rebased sums added in thread order). Only the reductions'
// summation order (a tree of doubles on the device) and the device's math library differ from a GPU run; keep the
// bodies here in step with the kernels'.

#include "../../csrc/cuda/divergence_rows.cuh"
#include "../../csrc/cuda/sampling.cuh"

#include <vector>

using namespace minillm_fast_cuda;

namespace {

// block_lse, sequentially
template <int ACC, typename A>
LseState<A> reduce_lse(std::vector<LseState<A>>& states) {
  A m_s = static_cast<A>(kLogZero), m_t = static_cast<A>(kLogZero);
  for (const auto& st : states) {
    m_s = nan_max(m_s, st.m_s);
    m_t = nan_max(m_t, st.m_t);
  }
  LseState<A> total{m_s, m_t, 0.0, 0.0, 0.0};
  for (auto& st : states) {
    rebase<ACC>(st, m_s, m_t);
    total.l_s += st.l_s;
    total.l_t += st.l_t;
    total.acc += st.acc;
  }
  return total;
}

template <typename S, int KIND>
void divergence_rows_host(S* zs, S* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V, const math_t<S>* row_grad,
                          const DivConsts<math_t<S>>& c, bool grad_s, bool grad_t, math_t<S>* loss,
                          math_t<S>* stats) {
  using A = math_t<S>;
  constexpr int ACC = AccOf<KIND>::value;
  const int nth = rows_threads(V);
  std::vector<LseState<A>> states(nth);
  for (int64_t r = 0; r < C; ++r) {
    S* xs = zs + r * ld_s;
    S* xt = zt + r * ld_t;
    for (int tid = 0; tid < nth; ++tid) states[tid] = lse_thread<ACC>(xs, xt, V, tid, nth, c.k);
    RowResult res = finish_lse<KIND>(reduce_lse<ACC>(states));
    const LogProbs<A> lpo = LogProbs<A>::of(res);
    if (ACC == ACC_NONE) {
      double sum[3] = {0.0, 0.0, 0.0};
      for (int tid = 0; tid < nth; ++tid) {
        double t[3];
        terms_thread<KIND>(xs, xt, V, tid, nth, c, lpo, t);
        for (int i = 0; i < 3; ++i) sum[i] += t[i];
      }
      res.loss = sum[0];
      res.c_s = sum[1];
      res.c_t = sum[2];
    }
    loss[r] = static_cast<A>(res.loss);
    A* out = stats + 6 * r;
    out[0] = static_cast<A>(res.m_s);
    out[1] = static_cast<A>(res.log_ls);
    out[2] = static_cast<A>(res.m_t);
    out[3] = static_cast<A>(res.log_lt);
    out[4] = static_cast<A>(res.c_s);
    out[5] = static_cast<A>(res.c_t);
    if (grad_s || grad_t) {
      const A scale = row_grad[r] * c.inv_t;
      for (int tid = 0; tid < nth; ++tid)
        grads_thread<KIND>(xs, xt, V, tid, nth, c, lpo, static_cast<A>(res.c_s), static_cast<A>(res.c_t), scale,
                           grad_s, grad_t);
    }
  }
}

template <typename S>
int divergence_dispatch_kind(void* zs, void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                             const void* row_grad, int kind, double log_w, double log_1mw, double temperature,
                             double softcap, bool grad_s, bool grad_t, void* loss, void* stats) {
  using A = math_t<S>;
  const auto c = DivConsts<A>::make(log_w, log_1mw, temperature, softcap);
  auto* ps = static_cast<S*>(zs);
  auto* pt = static_cast<S*>(zt);
  auto* rg = static_cast<const A*>(row_grad);
  auto* pl = static_cast<A*>(loss);
  auto* pst = static_cast<A*>(stats);
#define MINILLM_RUN(K) divergence_rows_host<S, K>(ps, pt, ld_s, ld_t, C, V, rg, c, grad_s, grad_t, pl, pst); break
  switch (kind) {
    case REVERSE_KL: MINILLM_RUN(REVERSE_KL);
    case FORWARD_KL: MINILLM_RUN(FORWARD_KL);
    case JSD: MINILLM_RUN(JSD);
    case TVD: MINILLM_RUN(TVD);
    case SKEW_FORWARD_KL: MINILLM_RUN(SKEW_FORWARD_KL);
    case SKEW_REVERSE_KL: MINILLM_RUN(SKEW_REVERSE_KL);
    default: return 1;
  }
#undef MINILLM_RUN
  return 0;
}

template <typename S, bool TEACHER>
void sample_rows_host(const S* zs, const S* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V, uint64_t seed,
                      int64_t row_offset, double alpha, const Scaling<math_t<S>>& k, int64_t* tokens, math_t<S>* lq,
                      math_t<S>* lp, math_t<S>* lm) {
  using A = math_t<S>;
  const int nth = rows_threads(V);
  std::vector<LseState<A>> states(nth);
  for (int64_t r = 0; r < C; ++r) {
    const int64_t row = row_offset + r;
    const S* xs = zs + r * ld_s;
    const S* xt = TEACHER ? zt + r * ld_t : nullptr;
    const bool use_t = TEACHER && teacher_coin(seed, row, alpha);
    Best<A> best{-static_cast<A>(INFINITY), kNoToken};
    for (int tid = 0; tid < nth; ++tid) {
      Best<A> b;
      sample_thread<TEACHER>(xs, xt, V, tid, nth, k, seed, row, use_t, states[tid], b);
      best = best_of(best, b);
    }
    const LseState<A> st = reduce_lse<ACC_NONE>(states);
    const A m_chosen = use_t ? st.m_t : st.m_s;
    const int64_t y = (best.token == kNoToken || is_nan(m_chosen)) ? 0 : best.token;
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
void sample_dispatch(const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V, uint64_t seed,
                     int64_t row_offset, double alpha, double temperature, double softcap, int64_t* tokens, void* lq,
                     void* lp, void* lm) {
  using A = math_t<S>;
  const auto k = Scaling<A>::make(temperature, softcap);
  if (zt != nullptr)
    sample_rows_host<S, true>(static_cast<const S*>(zs), static_cast<const S*>(zt), ld_s, ld_t, C, V, seed,
                              row_offset, alpha, k, tokens, static_cast<A*>(lq), static_cast<A*>(lp),
                              static_cast<A*>(lm));
  else
    sample_rows_host<S, false>(static_cast<const S*>(zs), nullptr, ld_s, 0, C, V, seed, row_offset, alpha, k, tokens,
                               static_cast<A*>(lq), nullptr, nullptr);
}

template <typename S>
void statistics_dispatch(const void* zs_, const void* zt_, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                         const int64_t* tokens, double temperature, double softcap, void* lq_, void* lp_,
                         void* rkl_) {
  using A = math_t<S>;
  const auto k = Scaling<A>::make(temperature, softcap);
  const int nth = rows_threads(V);
  std::vector<LseState<A>> states(nth);
  for (int64_t r = 0; r < C; ++r) {
    const S* xs = static_cast<const S*>(zs_) + r * ld_s;
    const S* xt = static_cast<const S*>(zt_) + r * ld_t;
    for (int tid = 0; tid < nth; ++tid) states[tid] = lse_thread<ACC_REVERSE>(xs, xt, V, tid, nth, k);
    const LseState<A> st = reduce_lse<ACC_REVERSE>(states);
    const int64_t y = clamp_token(tokens[r], V);
    static_cast<A*>(lq_)[r] = static_cast<A>(logprob_at(k.scaled(xs[y]), st.m_s, st.l_s));
    static_cast<A*>(lp_)[r] = static_cast<A>(logprob_at(k.scaled(xt[y]), st.m_t, st.l_t));
    static_cast<A*>(rkl_)[r] = static_cast<A>(st.acc / st.l_s - log(st.l_s) + log(st.l_t));
  }
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (launchers.h's DType). Return 0 on success.
extern "C" {

int emu_threads(int64_t V) { return rows_threads(V); }

void emu_philox(const uint32_t* counter, uint64_t seed, uint32_t* out) {
  const U32x4 r = philox4x32_10(U32x4{counter[0], counter[1], counter[2], counter[3]}, seed);
  out[0] = r.x;
  out[1] = r.y;
  out[2] = r.z;
  out[3] = r.w;
}

float emu_uniform(uint32_t bits) { return uint_to_uniform_float(bits); }

int emu_divergence_rows(int dtype, void* zs, void* zt, int64_t ld_s, int64_t ld_t, int64_t C, int64_t V,
                        const void* row_grad, int kind, double log_w, double log_1mw, double temperature,
                        double softcap, int grad_s, int grad_t, void* loss, void* stats) {
  switch (dtype) {
    case 0: return divergence_dispatch_kind<float>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw,
                                                   temperature, softcap, grad_s, grad_t, loss, stats);
    case 1: return divergence_dispatch_kind<double>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw,
                                                    temperature, softcap, grad_s, grad_t, loss, stats);
    case 2: return divergence_dispatch_kind<__half>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw,
                                                    temperature, softcap, grad_s, grad_t, loss, stats);
    case 3: return divergence_dispatch_kind<__nv_bfloat16>(zs, zt, ld_s, ld_t, C, V, row_grad, kind, log_w, log_1mw,
                                                           temperature, softcap, grad_s, grad_t, loss, stats);
  }
  return 1;
}

int emu_mixture_sample_rows(int dtype, const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C,
                            int64_t V, uint64_t seed, int64_t row_offset, double alpha, double temperature,
                            double softcap, int64_t* tokens, void* lq, void* lp, void* lm) {
  switch (dtype) {
    case 0: sample_dispatch<float>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap, tokens,
                                   lq, lp, lm); return 0;
    case 1: sample_dispatch<double>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap, tokens,
                                    lq, lp, lm); return 0;
    case 2: sample_dispatch<__half>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap, tokens,
                                    lq, lp, lm); return 0;
    case 3: sample_dispatch<__nv_bfloat16>(zs, zt, ld_s, ld_t, C, V, seed, row_offset, alpha, temperature, softcap,
                                           tokens, lq, lp, lm); return 0;
  }
  return 1;
}

int emu_rollout_statistics_rows(int dtype, const void* zs, const void* zt, int64_t ld_s, int64_t ld_t, int64_t C,
                                int64_t V, const int64_t* tokens, double temperature, double softcap, void* lq,
                                void* lp, void* rkl) {
  switch (dtype) {
    case 0: statistics_dispatch<float>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl); return 0;
    case 1: statistics_dispatch<double>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl); return 0;
    case 2: statistics_dispatch<__half>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl); return 0;
    case 3:
      statistics_dispatch<__nv_bfloat16>(zs, zt, ld_s, ld_t, C, V, tokens, temperature, softcap, lq, lp, rkl);
      return 0;
  }
  return 1;
}

}  // extern "C"
