// Helpers shared by the CUDA row kernels (divergence_rows.cu, sampling.cu): storage types and their conversion to
// the math type, math wrappers, NaN-propagating max, Philox4x32-10, the per-thread online softmax state and the
// block reductions.
//
// Conventions (as the C++ CPU kernels of csrc/*.cpp): a chunk of logits is [C, V] with contiguous rows (row stride
// ld >= V); one thread block computes one row. Thread `tid` of `nth` visits the entries v = base + j * nth + tid,
// j < kUnroll, for base = 0, kUnroll * nth, ...: a warp's loads are consecutive (coalesced) and each thread has
// kUnroll independent loads in flight. Entries past the end of the row are masked: the finite kLogZero stands in
// for -inf in maxima and exps (exp(kLogZero - m) == 0, and kLogZero - kLogZero is not NaN), and they are never
// written. Softcap: s = tanh(z / cap) * (cap / T), else s = z / T; tanh is recomputed where needed rather than
// stored over z, so that bf16 / fp16 buffers never hold a rounded tanh.
//
// Sums: each thread adds its kUnroll terms in the math type A (float, or double for float64 logits) and folds that
// tile sum into a double, so the error of a thread's sum does not grow with the vocabulary; the block reduction adds
// doubles. The row's result depends on V and the data only (the thread count is a function of V, see
// rows_threads), never on C or the row's position: a row gives the same bits in any chunk.
//
// Everything marked MINILLM_HD is compiled for the host as well, so tests/cuda/host_emulation.cu can run the same
// per-thread code on the CPU (the block reductions are replaced there by sequential loops).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#define MINILLM_HD __host__ __device__ __forceinline__
// `#pragma unroll` for the device pass only (the host compiler of the MINILLM_HD functions does not know it)
#ifdef __CUDA_ARCH__
#define MINILLM_UNROLL _Pragma("unroll")
#else
#define MINILLM_UNROLL
#endif

namespace minillm_fast_cuda {

// log(0) stand-in (LOG_ZERO of minillm_fast/divergences.py)
constexpr double kLogZero = -1.0e30;
// entries per thread per tile
constexpr int kUnroll = 4;
// threads per block: rows_threads(V) picks a power of two in [kMinThreads, kMaxThreads]
constexpr int kMinThreads = 32;
constexpr int kMaxThreads = 256;

enum Kind : int { REVERSE_KL = 0, FORWARD_KL, JSD, TVD, SKEW_FORWARD_KL, SKEW_REVERSE_KL };

// Threads per row: enough for one tile to cover the row (kUnroll entries each), at most kMaxThreads. A function of
// V only (see the top of the file).
MINILLM_HD int rows_threads(int64_t V) {
  int n = kMinThreads;
  while (n < kMaxThreads && static_cast<int64_t>(n) * kUnroll < V) n *= 2;
  return n;
}

// ---------------------------------------------------------------------------------------------------------------------
// storage types: S in {float, double, __half, __nv_bfloat16}; math type A = float (double for double)
// ---------------------------------------------------------------------------------------------------------------------
template <typename S>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};
template <typename S>
using math_t = typename MathType<S>::type;

MINILLM_HD float to_math(float x) { return x; }
MINILLM_HD double to_math(double x) { return x; }
MINILLM_HD float to_math(__half x) { return __half2float(x); }
MINILLM_HD float to_math(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename S>
MINILLM_HD S from_math(math_t<S> x);
template <>
MINILLM_HD float from_math<float>(float x) { return x; }
template <>
MINILLM_HD double from_math<double>(double x) { return x; }
template <>
MINILLM_HD __half from_math<__half>(float x) { return __float2half_rn(x); }
template <>
MINILLM_HD __nv_bfloat16 from_math<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------------------------------
// math (the accurate CUDA math library: 1-2 ulp; the extension is never built with --use_fast_math)
// ---------------------------------------------------------------------------------------------------------------------
MINILLM_HD float ex(float x) { return expf(x); }
MINILLM_HD double ex(double x) { return exp(x); }
MINILLM_HD float lg(float x) { return logf(x); }
MINILLM_HD double lg(double x) { return log(x); }
MINILLM_HD float lg1p(float x) { return log1pf(x); }
MINILLM_HD double lg1p(double x) { return log1p(x); }
MINILLM_HD float th(float x) { return tanhf(x); }
MINILLM_HD double th(double x) { return tanh(x); }
MINILLM_HD float absval(float x) { return fabsf(x); }
MINILLM_HD double absval(double x) { return fabs(x); }

template <typename T>
MINILLM_HD bool is_nan(T x) {
  return x != x;
}

// max that propagates NaN (a NaN logit gives NaN statistics, as in the other backends)
template <typename T>
MINILLM_HD T nan_max(T a, T b) {
  return (b > a || is_nan(b)) ? b : a;
}

// log(e^a + e^b) = hi + log1p(e^(lo - hi)); NaN in either gives NaN (fmax / fmin would drop it).
template <typename T>
MINILLM_HD T logaddexp(T a, T b) {
  const bool a_hi = a > b;
  const T hi = a_hi ? a : b, lo = a_hi ? b : a;
  return hi + lg1p(ex(lo - hi));
}

// sign(q - p) in {-1, 0, 1}
template <typename T>
MINILLM_HD T sign_diff(T q, T p) {
  return q > p ? T(1) : (q < p ? T(-1) : T(0));
}

// How a stored logit z becomes the scaled logit s (see the top of the file).
template <typename A>
struct Scaling {
  A mult;     // cap / T with a softcap, else 1 / T
  A inv_cap;  // 1 / cap (0 without)
  bool use_cap;

  MINILLM_HD static Scaling make(double temperature, double softcap) {
    Scaling k;
    k.use_cap = softcap > 0;
    k.mult = static_cast<A>(k.use_cap ? softcap / temperature : 1.0 / temperature);
    k.inv_cap = static_cast<A>(k.use_cap ? 1.0 / softcap : 0.0);
    return k;
  }
  // tanh(z / cap), or z itself without a softcap (the value `mult` multiplies)
  MINILLM_HD A capped(A z) const { return use_cap ? th(z * inv_cap) : z; }
  template <typename S>
  MINILLM_HD A scaled(S z) const {
    return capped(to_math(z)) * mult;
  }
};

// ---------------------------------------------------------------------------------------------------------------------
// Philox4x32-10 with the counters and key layout of Triton's tl.philox (kernels/sampling.py): key = (seed low word,
// seed high word), rounds with multipliers 0xD2511F53 / 0xCD9E8D57 and key increments 0x9E3779B9 / 0xBB67AE85 (the
// Random123 generator, as csrc/philox.h).
// ---------------------------------------------------------------------------------------------------------------------
struct U32x4 {
  uint32_t x, y, z, w;
};

MINILLM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

MINILLM_HD U32x4 philox4x32_10(U32x4 c, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
MINILLM_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c.x, c2 = c.z;
    c.x = mulhi32(0xCD9E8D57u, c2) ^ c.y ^ k0;
    c.z = mulhi32(0xD2511F53u, c0) ^ c.w ^ k1;
    c.y = 0xCD9E8D57u * c2;
    c.w = 0xD2511F53u * c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// U[0, 1) float32 from 32 random bits, exactly as Triton's tl.uint_to_uniform_float: 31 bits, U = 0 possible, the
// largest value 1 - 2^-24.
MINILLM_HD float uint_to_uniform_float(uint32_t r) {
  int32_t i = static_cast<int32_t>(r);
  if (i < 0) i = ~i;
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// The uniform of (seed, c0, c1, stream): the first word of Philox on counters (c0, c1, stream, 0).
MINILLM_HD float philox_uniform(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t stream) {
  return uint_to_uniform_float(philox4x32_10(U32x4{c0, c1, stream, 0u}, seed).x);
}

// ---------------------------------------------------------------------------------------------------------------------
// online softmax statistics of one thread (both models), with the optional shifted KL accumulator
// ---------------------------------------------------------------------------------------------------------------------
// ACC_NONE: lse only; ACC_REVERSE: acc = sum e^(s - m_s) ((s - m_s) - (t - m_t)) (the numerator of KL(q || p));
// ACC_FORWARD: acc = sum e^(t - m_t) ((t - m_t) - (s - m_s)) (of KL(p || q)).
enum Acc : int { ACC_NONE = 0, ACC_REVERSE = 1, ACC_FORWARD = 2 };

template <typename A>
struct LseState {
  A m_s, m_t;          // running maxima of s and t
  double l_s, l_t;     // sum e^(s - m_s), sum e^(t - m_t)
  double acc;          // see Acc

  MINILLM_HD static LseState empty() {
    return LseState{static_cast<A>(kLogZero), static_cast<A>(kLogZero), 0.0, 0.0, 0.0};
  }
};

// Rebase the sums to new maxima (as `_kl_update` in kernels/fused_divergence.py): each term's e^(x - m) shrinks by
// e^(m - m'), and each KL bracket grows by (m_b' - m_b) - (m_a' - m_a). A no-op when neither maximum moves; a state
// with no entries (m = kLogZero, sums 0) stays all zero; a NaN maximum makes every sum NaN.
template <int ACC, typename A>
MINILLM_HD void rebase(LseState<A>& st, A ms_new, A mt_new) {
  if (ms_new == st.m_s && mt_new == st.m_t) return;
  const double fs = exp(static_cast<double>(st.m_s) - static_cast<double>(ms_new));
  const double ft = exp(static_cast<double>(st.m_t) - static_cast<double>(mt_new));
  const double dms = static_cast<double>(ms_new) - static_cast<double>(st.m_s);
  const double dmt = static_cast<double>(mt_new) - static_cast<double>(st.m_t);
  if (ACC == ACC_REVERSE) st.acc = (st.acc + (dmt - dms) * st.l_s) * fs;
  if (ACC == ACC_FORWARD) st.acc = (st.acc + (dms - dmt) * st.l_t) * ft;
  st.l_s *= fs;
  st.l_t *= ft;
  st.m_s = ms_new;
  st.m_t = mt_new;
}

// A callback of lse_sweep that does nothing (lse_thread's).
struct NoEntry {
  template <typename A>
  MINILLM_HD void operator()(int64_t, A, A) const {}
};

// One thread's share of the first sweep over a row of both models (of s alone without TEACHER: t's state stays
// empty and zt is never read): tile by tile, the tile's maxima, a rebase if they move the running maxima, then the
// tile's exps against the running maxima (one exp per entry and model), and on_entry(v, s_v, t_v) for each of the
// thread's entries v in increasing order (the sampler's Gumbel-max; t_v = kLogZero without TEACHER).
template <int ACC, bool TEACHER, typename S, typename A, typename OnEntry>
MINILLM_HD LseState<A> lse_sweep(const S* __restrict__ xs, const S* __restrict__ xt, int64_t V, int tid, int nth,
                                 const Scaling<A>& k, OnEntry&& on_entry) {
  const A sentinel = static_cast<A>(kLogZero);
  LseState<A> st = LseState<A>::empty();
  for (int64_t base = 0; base < V; base += static_cast<int64_t>(kUnroll) * nth) {
    A a[kUnroll], b[kUnroll];
    bool ok[kUnroll];
    A mx_s = sentinel, mx_t = sentinel;
MINILLM_UNROLL
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t v = base + static_cast<int64_t>(j) * nth + tid;
      ok[j] = v < V;
      a[j] = ok[j] ? k.scaled(xs[v]) : sentinel;
      b[j] = (TEACHER && ok[j]) ? k.scaled(xt[v]) : sentinel;
      mx_s = nan_max(mx_s, a[j]);
      mx_t = nan_max(mx_t, b[j]);
    }
    rebase<ACC>(st, nan_max(st.m_s, mx_s), nan_max(st.m_t, mx_t));
    A sum_s = 0, sum_t = 0, sum_acc = 0;
MINILLM_UNROLL
    for (int j = 0; j < kUnroll; ++j) {
      // masked entries add exact zeros (a thread's first tile may be all masked, with m still kLogZero)
      const A da = a[j] - st.m_s, db = b[j] - st.m_t;
      const A ea = ok[j] ? ex(da) : A(0), eb = (TEACHER && ok[j]) ? ex(db) : A(0);
      sum_s += ea;
      sum_t += eb;
      if (ACC == ACC_REVERSE) sum_acc += ea * (da - db);
      if (ACC == ACC_FORWARD) sum_acc += eb * (db - da);
      if (ok[j]) on_entry(base + static_cast<int64_t>(j) * nth + tid, a[j], b[j]);
    }
    st.l_s += static_cast<double>(sum_s);
    st.l_t += static_cast<double>(sum_t);
    if (ACC != ACC_NONE) st.acc += static_cast<double>(sum_acc);
  }
  return st;
}

// The first sweep of the divergence and rollout-statistics kernels: both models, no per-entry work.
template <int ACC, typename S, typename A>
MINILLM_HD LseState<A> lse_thread(const S* __restrict__ xs, const S* __restrict__ xt, int64_t V, int tid, int nth,
                                  const Scaling<A>& k) {
  return lse_sweep<ACC, true>(xs, xt, V, tid, nth, k, NoEntry{});
}

// ---------------------------------------------------------------------------------------------------------------------
// block reductions (device only): every thread of the block gets the result. blockDim.x is a multiple of 32, at most
// 1024. `smem` holds 32 * N values; the leading __syncthreads makes back-to-back calls on the same buffer safe.
// ---------------------------------------------------------------------------------------------------------------------
#ifdef __CUDACC__
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct NanMaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return nan_max(a, b);
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
MINILLM_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <int N, typename T, typename Op>
__device__ __forceinline__ void block_allreduce(T (&v)[N], Op op, T identity, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
MINILLM_UNROLL
  for (int i = 0; i < N; ++i) v[i] = warp_allreduce(v[i], op);
  __syncthreads();
  if (lane == 0) {
MINILLM_UNROLL
    for (int i = 0; i < N; ++i) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
MINILLM_UNROLL
  for (int i = 0; i < N; ++i) v[i] = warp_allreduce(lane < nwarps ? smem[i * 32 + lane] : identity, op);
}

// The block's LseState: global maxima, every thread's sums rebased to them, then summed (double).
template <int ACC, typename A>
__device__ __forceinline__ LseState<A> block_lse(LseState<A> st, A* smem_m, double* smem_d) {
  A m[2] = {st.m_s, st.m_t};
  block_allreduce<2>(m, NanMaxOp{}, static_cast<A>(kLogZero), smem_m);
  rebase<ACC>(st, m[0], m[1]);
  double d[3] = {st.l_s, st.l_t, st.acc};
  block_allreduce<3>(d, SumOp{}, 0.0, smem_d);
  return LseState<A>{m[0], m[1], d[0], d[1], d[2]};
}
#endif  // __CUDACC__

}  // namespace minillm_fast_cuda
