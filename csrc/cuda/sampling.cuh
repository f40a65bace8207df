// Per-thread pieces of the rollout-time row kernels (sampling.cu), host-and-device so that
// tests/cuda/host_emulation.cu runs them on the CPU.
//
// Mixture sampling, exact and in one sweep (as kernels/sampling.py): a draw from alpha p + (1 - alpha) q is "pick the
// component (the teacher with probability alpha), then draw from it", and a draw from softmax(x) is the Gumbel-max
// argmax_v x_v + G_v with G_v = -log(-log U_v). The uniforms are those of the Triton sampler: Philox4x32-10 keyed
// by the 64-bit seed, counters (v, row, 0, 0) for the noise of entry v and (0, row, 1, 0) for the row's coin, the
// first output word made a float by tl.uint_to_uniform_float. So a draw depends only on (seed, global row, v):
// not on the thread count, the chunking or the other rows. U = 0 gives G = -inf (never chosen); the float32
// spacing of U below 1 caps G near 16.6, a truncation of probability ~1e-7 per entry, as in every float32 Gumbel
// sampler (the Triton one included).
#pragma once

#include "common.cuh"

namespace minillm_fast_cuda {

// The running Gumbel-max of a thread (or a block): its best score and token; ties go to the smaller token, NaN
// scores never win, and kNoToken means none was seen (a row of NaN logits: token 0).
constexpr int64_t kNoToken = INT64_MAX;

template <typename A>
struct Best {
  A score;
  int64_t token;
};

template <typename A>
MINILLM_HD Best<A> best_of(Best<A> a, Best<A> b) {
  return (b.score > a.score || (b.score == a.score && b.token < a.token)) ? b : a;
}

// The row's coin: true when the teacher component is drawn (probability alpha).
MINILLM_HD bool teacher_coin(uint64_t seed, int64_t row, double alpha) {
  return static_cast<double>(philox_uniform(seed, 0u, static_cast<uint32_t>(row), 1u)) < alpha;
}

// Standard Gumbel noise of entry v of a row
MINILLM_HD float gumbel(uint64_t seed, int64_t row, int64_t v) {
  const float u = philox_uniform(seed, static_cast<uint32_t>(v), static_cast<uint32_t>(row), 0u);
  return -logf(-logf(u));
}

// One thread's share of the sampler's sweep: the online lse of s (and t with TEACHER) of lse_sweep, and the best
// Gumbel score of the chosen model's scaled logits (t when use_t, else s).
template <bool TEACHER, typename S, typename A>
MINILLM_HD void sample_thread(const S* __restrict__ xs, const S* __restrict__ xt, int64_t V, int tid, int nth,
                              const Scaling<A>& k, uint64_t seed, int64_t row, bool use_t, LseState<A>& st,
                              Best<A>& best) {
  best = Best<A>{-static_cast<A>(INFINITY), kNoToken};
  st = lse_sweep<ACC_NONE, TEACHER>(xs, xt, V, tid, nth, k, [&](int64_t v, A s, A t) {
    const A score = ((TEACHER && use_t) ? t : s) + static_cast<A>(gumbel(seed, row, v));
    if (score > best.score) best = Best<A>{score, v};  // a thread sees its entries in increasing order
  });
}

// log(w a + (1 - w) b) from log a and log b, as minillm_fast.divergences._log_mix: log 0 = -inf, and -inf when both
// terms vanish.
MINILLM_HD double log_mix(double log_a, double log_b, double w) {
  const double x = (w > 0 ? log(w) : -INFINITY) + log_a;
  const double y = (w < 1 ? log(1.0 - w) : -INFINITY) + log_b;
  const double hi = x > y ? x : y, lo = x > y ? y : x;
  if (hi == -INFINITY) return hi;
  return hi + log1p(exp(lo - hi));
}

// log-probability of the entry with scaled logit x under a row with statistics (m, l): (x - m) - log l, the
// subtraction of the maximum in the math type (exact near the maximum at any logit magnitude).
template <typename A>
MINILLM_HD double logprob_at(A x, A m, double l) {
  return static_cast<double>(x - m) - log(l);
}

MINILLM_HD int64_t clamp_token(int64_t y, int64_t V) { return y < 0 ? 0 : (y >= V ? V - 1 : y); }

}  // namespace minillm_fast_cuda
