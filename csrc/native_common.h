// Helpers shared by the native row kernels of fused_divergence_cpu.cpp, token_stats_cpu.cpp and sampling_cpu.cpp:
// vector loops with masked tails, horizontal reductions, argument checks, and the one-model pass that gives a row's
// max and log-sum-exp.
//
// Conventions, as in fused_divergence_cpu.cpp: a chunk of logits is [C, V] float32 / float64 with contiguous rows, a
// row is one task of at::parallel_for and is computed by one thread in a fixed order (results do not depend on the
// thread count), the vocabulary is swept in blocks of kBlock entries that stay in L1, vector sums within a block and
// double sums across blocks. Under a softcap the first sweep stores tanh(z / cap) in place of z; every later read
// multiplies the buffer value by `mult` (cap / T, else 1 / T) to get the scaled logit s. In the two-model kernels each
// model has its own Scale (its own T and cap: minillm_fast/scaling.py).
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace minillm_fast_native {
namespace common {

using at::vec::Vectorized;

// log(0) stand-in (LOG_ZERO of divergences.py): exp(x + kLogZero) == 0 and kLogZero - kLogZero is not NaN.
constexpr double kLogZero = -1.0e30;
// Entries per block of the first sweep: the block is read twice (max, then exp) while it sits in L1.
constexpr int64_t kBlock = 512;

// Calls f(tail, j, n) on [j0, j1) vector by vector; `tail` is std::true_type only for a last, partial vector of n.
template <typename T, typename F>
inline void for_vecs(int64_t j0, int64_t j1, F&& f) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = j0;
  for (; j + W <= j1; j += W) f(std::false_type{}, j, W);
  if (j < j1) f(std::true_type{}, j, j1 - j);
}

template <typename T, typename Tail>
inline Vectorized<T> load(const T* p, int64_t n) {
  if constexpr (Tail::value) return Vectorized<T>::loadu(p, n);
  else return Vectorized<T>::loadu(p);
}

template <typename T, typename Tail>
inline void store(T* p, const Vectorized<T>& v, int64_t n) {
  if constexpr (Tail::value) v.store(p, n);
  else v.store(p);
}

// Lanes [n, W) of v replaced by `fill` (a no-op for full vectors).
template <typename T, typename Tail>
inline Vectorized<T> keep(const Vectorized<T>& v, const Vectorized<T>& fill, int64_t n) {
  if constexpr (Tail::value) return Vectorized<T>::set(fill, v, n);
  else return v;
}

template <typename T>
inline double hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  double r = 0.0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) r += static_cast<double>(buf[i]);
  return r;
}

// max that propagates NaN (a NaN logit gives NaN statistics, as in the other backends)
template <typename T>
inline T nan_max(T a, T b) {
  return (b > a || std::isnan(b)) ? b : a;
}

template <typename T>
inline T hmax(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  T r = buf[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) r = nan_max(r, buf[i]);
  return r;
}

// How a buffer value x becomes the scaled logit s = x * mult (see the top of this file).
template <typename T>
struct Scale {
  T mult;      // 1 / T, or cap / T once x holds tanh(z / cap)
  T inv_cap;   // 1 / cap (0 without a softcap)
  bool use_cap;
  T inv_t;     // 1 / T (gradients)

  Scale(double temperature, double softcap)
      : mult(static_cast<T>(softcap > 0 ? softcap / temperature : 1.0 / temperature)),
        inv_cap(static_cast<T>(softcap > 0 ? 1.0 / softcap : 0.0)),
        use_cap(softcap > 0),
        inv_t(static_cast<T>(1.0 / temperature)) {}
};

// A row's softmax statistics: lse = m + log l, kept apart so that log-probs are formed as (s - m) - log l, exact near
// the maximum at any logit magnitude. acc = sum_v e^(s_v - m) (s_v - m) where asked (the entropy's numerator).
struct RowLse {
  double m;
  double l;
  double acc;
};

// One sweep over the row x[0, V) in blocks: under a softcap x is overwritten with tanh(z / cap); the running max and
// sum-exp (and, with ACC, the shifted accumulator, rebased as `_kl_update` does when the max moves). After each
// block, on_block(b0, b1, m, sum) is called with the running max m the block's exps were taken against and their
// sum (the sampler keeps them to find a token's block without a second sweep).
template <typename T, bool ACC, typename OnBlock>
inline RowLse row_lse(T* x, int64_t V, const Scale<T>& k, OnBlock&& on_block) {
  using Vec = Vectorized<T>;
  const Vec mult(k.mult), inv_cap(k.inv_cap), zero(T(0)), sentinel(static_cast<T>(kLogZero));
  T m = static_cast<T>(kLogZero);
  double l = 0.0, acc = 0.0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    Vec vmax(sentinel);
    for_vecs<T>(b0, b1, [&](auto tail, int64_t j, int64_t n) {
      using Tail = decltype(tail);
      Vec a = load<T, Tail>(x + j, n);
      if (k.use_cap) {
        a = (a * inv_cap).tanh();
        store<T, Tail>(x + j, a, n);
      }
      vmax = at::vec::maximum(vmax, keep<T, Tail>(a * mult, sentinel, n));
    });
    const T m_new = nan_max(m, hmax(vmax));
    if (!(m_new == m)) {  // rebase: every old term's (s - m) shrinks by the move of the max
      const double f = std::exp(static_cast<double>(m) - m_new);
      if constexpr (ACC) acc = (acc - (static_cast<double>(m_new) - m) * l) * f;
      l *= f;
      m = m_new;
    }
    const Vec vm(m);
    Vec sum(zero), sum_acc(zero);
    for_vecs<T>(b0, b1, [&](auto tail, int64_t j, int64_t n) {
      using Tail = decltype(tail);
      const Vec d = keep<T, Tail>(load<T, Tail>(x + j, n) * mult, sentinel, n) - vm;
      const Vec e = d.exp();
      sum += e;
      if constexpr (ACC) sum_acc += e * d;  // masked lanes: 0 * (finite) = 0
    });
    const double block_sum = hsum(sum);
    l += block_sum;
    if constexpr (ACC) acc += hsum(sum_acc);
    on_block(b0, b1, static_cast<double>(m), block_sum);
  }
  return {static_cast<double>(m), l, acc};
}

template <typename T>
inline RowLse row_lse(T* x, int64_t V, const Scale<T>& k) {
  return row_lse<T, false>(x, V, k, [](int64_t, int64_t, double, double) {});
}

// Rows per task of at::parallel_for: a task gets at least ~32k entries (a row is ~1-10 ns per entry).
inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)); }

// Token id clamped into [0, V): ignored rows (and ids the caller did not check) never index outside the row.
inline int64_t clamp_token(int64_t y, int64_t V) { return std::min<int64_t>(std::max<int64_t>(y, 0), V - 1); }

// ---------------------------------------------------------------------------------------------------------------------
// argument checks (messages name the op and the argument)
// ---------------------------------------------------------------------------------------------------------------------
inline void check_logits(const char* op, const char* name, const at::Tensor& z) {
  TORCH_CHECK(z.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 chunk logits [C, V], got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2, op, ": ", name, " must be 2-D [C, V], got shape ", z.sizes());
  TORCH_CHECK(z.size(1) >= 1, op, ": ", name, " must have at least one vocabulary entry, got shape ", z.sizes());
  TORCH_CHECK(z.stride(1) == 1 && (z.size(0) <= 1 || z.stride(0) >= z.size(1)), op, ": ", name,
              " must have contiguous rows (stride(1) == 1, rows not overlapping); got strides ", z.strides(),
              " (it is overwritten in place, so it is not copied: pass z.contiguous())");
}

inline void check_same_logits(const char* op, const char* name, const at::Tensor& z, const at::Tensor& like) {
  check_logits(op, name, z);
  TORCH_CHECK(z.sizes() == like.sizes(), op, ": ", name, " must have the shape of zs ", like.sizes(), ", got ",
              z.sizes());
  TORCH_CHECK(z.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of zs (",
              like.scalar_type(), "), got ", z.scalar_type());
  TORCH_CHECK(z.numel() == 0 || z.data_ptr() != like.data_ptr(), op, ": zs and ", name,
              " must be distinct buffers (both are overwritten in place)");
}

// A per-row vector [C] of `dtype` (contiguous CPU); returns it contiguous.
inline at::Tensor check_rows(const char* op, const char* name, const at::Tensor& t, int64_t C,
                             at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C,
              "] (one entry per row of the logits), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  return t.contiguous();
}

// One model's scaling: its (effective) temperature and softcap, named as the op's arguments are (e.g.
// "temperature_s", "softcap_s").
inline void check_scalars(const char* op, const char* temperature_name, double temperature, const char* softcap_name,
                          double softcap) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": ", temperature_name,
              " must be finite and > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": ", softcap_name,
              " must be finite and >= 0 (0: none), got ", softcap);
}

inline void check_scalars(const char* op, double temperature, double softcap) {
  check_scalars(op, "temperature", temperature, "softcap", softcap);
}

}  // namespace common
}  // namespace minillm_fast_native
