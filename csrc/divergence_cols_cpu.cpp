// Native (C++) column kernel of the fused divergence: the rows function on vocabulary-major chunks, for CPU tensors.
//
// Why a second layout. On CPU the chunked strategy spends nearly all its time in four matmuls per chunk, and MKL runs
// the chunk's logits as `W h^T` ([V, H] x [H, C] -> [V, C]) and the gradient matmuls on that [V, C] buffer at the
// speed of the full-size matmuls, while `h W^T` -> [C, V] loses ~5% at chunk sizes that keep memory low (bench
// figures in bench/README.md). So the chunk arrives vocabulary-major: entry (r, v) at x[v * ld + r], a row's entries
// ld apart. Transposing it would cost a pass over memory; instead this kernel puts W consecutive rows in the vector
// lanes and sweeps the vocabulary down the columns, all W rows at once. Per row the math and the passes are the row
// kernel's (fused_divergence_cpu.cpp; per-entry formulas shared in divergence_math.h):
//
//   pass 0  the rows' maxima (tanh(z / cap) stored in place under a model's softcap). A pass of its own, so that pass 1
//           takes its exps against the final maxima and no running sum is ever rebased: with one-hot rows whose
//           two models peak in different blocks, a rebased KL accumulator no longer cancels exactly against the
//           log-probabilities of pass 3, and the gradient of a row at rest would be a rounding error instead of 0.
//   pass 1  the sums of exp of both models and the KL accumulator (the KLs' loss and c_s, c_t in closed form).
//   pass 2  (JSD, TVD, skew KLs) the sums of phi, q*g and p*h once both lse are known.
//   pass 3  when a gradient is wanted: G written in place, already multiplied by row_grad / T_s (row_grad / T_t).
//
// Memory order. A task is a contiguous range of rows (whole lane groups of U x W rows, a 64-byte cache line of a
// block row for float32 on AVX2); each pass goes over the vocabulary in blocks of kColBlock entries and, within a
// block, over the task's groups left to right, so each block row's segment [r0, r1) is read front to back while the
// block (kColBlock rows of it) stays in L2. The next group's line is prefetched one group ahead: the hardware
// prefetchers do not follow kColBlock interleaved column streams.
//
// Sums: a lane adds kColBlock terms in T per block (compensated where terms have both signs), blocks are added in
// double, so the error does not grow with the vocabulary. Lanes past the last row of a partial group compute on
// zeros (finite, independent of the other lanes) and are never stored; every row's result is computed by one thread
// in a fixed order, so it does not depend on the thread count or on which rows share its task.
//
// Cost: the chunk is read three times (passes 0, 1, 3) and written once; a chunk takes ~30% longer than the row
// kernel takes on the same chunk row-major (bench/README.md, "Chunk layout"), which the faster matmuls of this
// layout more than repay.

#include <torch/extension.h>

#include "divergence_math.h"
#include "native_common.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace minillm_fast_native {
namespace divergence {
namespace {

using common::kLogZero;
using common::load;
using common::store;

// Vocabulary entries per block: the length of a lane's T sums before they go to double, and the number of block
// rows whose segments stay in L2 while the task's groups go over them.
constexpr int64_t kColBlock = 16;

// A lane group: U vectors of W rows each (U = 2: a float32 group on AVX2 is one 64-byte cache line of a column
// block row, and two independent exp chains per entry keep the FMA units busy).
constexpr int64_t U = 2;

// Calls f(tail, g, base, n) for the lane groups of rows [r0, r1): group g holds rows base .. base + n - 1, `tail` is
// std::true_type for a last, partial group (n < U * W).
template <typename T, typename F>
inline void for_groups(int64_t r0, int64_t r1, F&& f) {
  constexpr int64_t G = U * Vectorized<T>::size();
  int64_t g = 0, base = r0;
  for (; base + G <= r1; base += G, ++g) f(std::false_type{}, g, base, G);
  if (base < r1) f(std::true_type{}, g, base, r1 - base);
}

// Lanes of vector u of a group of n rows.
template <typename T>
inline int64_t lanes_of(int64_t n, int64_t u) {
  constexpr int64_t W = Vectorized<T>::size();
  return std::max<int64_t>(0, std::min<int64_t>(W, n - u * W));
}

// One group's U vectors at column-block row p (a partial group: lanes past n read as 0, never written).
template <typename T, typename Tail>
struct GroupIO {
  static void load(const T* p, int64_t n, Vectorized<T> (&x)[U]) {
    constexpr int64_t W = Vectorized<T>::size();
    for (int64_t u = 0; u < U; ++u) {
      if constexpr (Tail::value) x[u] = Vectorized<T>::loadu(p + u * W, lanes_of<T>(n, u));
      else x[u] = Vectorized<T>::loadu(p + u * W);
    }
  }
  static void store(T* p, int64_t n, const Vectorized<T>& x, int64_t u) {
    constexpr int64_t W = Vectorized<T>::size();
    if constexpr (Tail::value) {
      const int64_t m = lanes_of<T>(n, u);
      if (m > 0) x.store(p + u * W, m);
    } else {
      x.store(p + u * W);
    }
  }
};

// The next group's entries of the same block row, one group (a block's sweep) ahead of their use: the hardware
// prefetchers do not follow the kColBlock interleaved column streams of a block, and a missed line costs ~100 ns
// (prefetching took a 768-row reverse-KL chunk from 86 to 74 ms).
template <typename T>
inline void prefetch_next(const T* ps, const T* pt) {
  constexpr int64_t GW = U * Vectorized<T>::size();
  for (int64_t off = GW; off < 2 * GW; off += 64 / sizeof(T)) {
    __builtin_prefetch(ps + off);
    __builtin_prefetch(pt + off);
  }
}

// One lane group's share of one vocabulary block: rows base .. base + n - 1 (ps = xs + base, pt = xt + base) over the
// block rows [b0, b1); its per-lane state is at i0 = g * U * W of the state arrays (load_state, store_state).
template <typename T, typename Tail>
struct GroupBlock {
  using IO = GroupIO<T, Tail>;
  T* ps;
  T* pt;
  int64_t ld_s, ld_t, b0, b1, i0, n;

  // Calls f(s, t, a, b) for every block row: s, t point to the group's entries of both models there, a, b hold them
  // (U vectors each; lanes past n read as 0). The next group's line is prefetched one group ahead.
  template <typename F>
  void rows(F&& f) const {
    Vectorized<T> a[U], b[U];
    for (int64_t v = b0; v < b1; ++v) {
      T* s = ps + v * ld_s;
      T* t = pt + v * ld_t;
      IO::load(s, n, a);
      IO::load(t, n, b);
      prefetch_next(s, t);
      f(s, t, a, b);
    }
  }

  // vector u of the group's entries at p (a block row's s or t) := x; lanes past n are not written
  void store(T* p, const Vectorized<T>& x, int64_t u) const { IO::store(p, n, x, u); }
};

// Calls f(block) with a GroupBlock for every vocabulary block [b0, b1) and, within it, every lane group of rows
// [r0, r1) (see for_groups): the memory order described at the top of this file.
template <typename T, typename F>
inline void for_blocks(T* xs, T* xt, int64_t ld_s, int64_t ld_t, int64_t V, int64_t r0, int64_t r1, F&& f) {
  constexpr int64_t GW = U * Vectorized<T>::size();
  for (int64_t b0 = 0; b0 < V; b0 += kColBlock) {
    const int64_t b1 = std::min(V, b0 + kColBlock);
    for_groups<T>(r0, r1, [&](auto tail, int64_t g, int64_t base, int64_t n) {
      f(GroupBlock<T, decltype(tail)>{xs + base, xt + base, ld_s, ld_t, b0, b1, g * GW, n});
    });
  }
}

// A compensated (Kahan) vector sum: the sums whose terms have both signs (the KL accumulator, pass 2's phi, q*g,
// p*h) cancel, and their rounding error, which is relative to the partial sums, would otherwise show in the loss and
// through c_s, c_t in every gradient entry. Four more vector ops per term; the positive sums of exp need none.
template <typename T>
struct Compensated {
  Vectorized<T> sum = Vectorized<T>(T(0)), carry = Vectorized<T>(T(0));
  void add(const Vectorized<T>& x) {
    const Vectorized<T> y = x - carry;
    const Vectorized<T> t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  }
};

// Per-lane state vectors of group lanes [i0, i0 + U * W) from an array.
template <typename T>
inline void load_state(const std::vector<T>& a, int64_t i0, Vectorized<T> (&x)[U]) {
  for (int64_t u = 0; u < U; ++u) x[u] = Vectorized<T>::loadu(&a[i0 + u * Vectorized<T>::size()]);
}

template <typename T>
inline void store_state(std::vector<T>& a, int64_t i0, const Vectorized<T> (&x)[U]) {
  for (int64_t u = 0; u < U; ++u) x[u].store(&a[i0 + u * Vectorized<T>::size()]);
}

template <typename T, int64_t KIND>
void cols(T* xs, T* xt, int64_t ld_s, int64_t ld_t, int64_t V, int64_t r0, int64_t r1, const Consts<T>& k,
          const T* scale_s, const T* scale_t, bool grad_s, bool grad_t, T* out_loss, T* out_stats) {
  using Vec = Vectorized<T>;
  constexpr int64_t GW = U * Vec::size();
  // each model's own scaling (s = x * mult_s, t = x * mult_t; its softcap where it has one)
  const Vec mult_s(k.s.mult), mult_t(k.t.mult), inv_cap_s(k.s.inv_cap), inv_cap_t(k.t.inv_cap), zero(T(0)),
      one(T(1));
  const bool cap_s = k.s.use_cap, cap_t = k.t.use_cap;
  const int64_t lanes = (r1 - r0 + GW - 1) / GW * GW;
  // Per-lane state (lane i is row r0 + i): running maxima in T, sums in double; after pass 1 log l and c_s, c_t in T
  // for the vector passes.
  std::vector<T> m_s(lanes, static_cast<T>(kLogZero)), m_t(lanes, static_cast<T>(kLogZero));
  std::vector<T> log_l_s(lanes), log_l_t(lanes), vc_s(lanes), vc_t(lanes), vscale_s(lanes, T(0)),
      vscale_t(lanes, T(0));
  std::vector<double> l_s(lanes, 0.0), l_t(lanes, 0.0), acc(lanes, 0.0), loss(lanes), c_s(lanes), c_t(lanes);
  std::vector<T> part_s(lanes), part_t(lanes), part_a(lanes);  // one block's vector sums

  using Group = Vec (&)[U];  // a lane group's U vectors at one block row (GroupBlock::rows)

  // ---- pass 0: the rows' maxima (tanh(z / cap) stored in place under a model's softcap)
  for_blocks<T>(xs, xt, ld_s, ld_t, V, r0, r1, [&](const auto& blk) {
    Vec max_s[U], max_t[U];
    load_state(m_s, blk.i0, max_s);
    load_state(m_t, blk.i0, max_t);
    blk.rows([&](T* s, T* t, Group a, Group b) {
      for (int64_t u = 0; u < U; ++u) {
        if (cap_s) {
          a[u] = (a[u] * inv_cap_s).tanh();
          blk.store(s, a[u], u);
        }
        if (cap_t) {
          b[u] = (b[u] * inv_cap_t).tanh();
          blk.store(t, b[u], u);
        }
        max_s[u] = at::vec::maximum(max_s[u], a[u] * mult_s);  // propagates NaN
        max_t[u] = at::vec::maximum(max_t[u], b[u] * mult_t);
      }
    });
    store_state(m_s, blk.i0, max_s);
    store_state(m_t, blk.i0, max_t);
  });

  // Each block's vector sums (part_*) go to the rows' double sums.
  auto add_parts = [&](int64_t i0, std::vector<double>& x, std::vector<double>& y, std::vector<double>& z) {
    for (int64_t i = i0; i < i0 + GW; ++i) {
      x[i] += part_s[i];
      y[i] += part_t[i];
      z[i] += part_a[i];
    }
  };

  // ---- pass 1: sums of exp about the maxima (and the KL accumulator), in T within a block, in double across
  for_blocks<T>(xs, xt, ld_s, ld_t, V, r0, r1, [&](const auto& blk) {
    Vec vm_s[U], vm_t[U], sum_s[U], sum_t[U];
    Compensated<T> sum_acc[U];
    load_state(m_s, blk.i0, vm_s);
    load_state(m_t, blk.i0, vm_t);
    for (int64_t u = 0; u < U; ++u) sum_s[u] = sum_t[u] = zero;
    blk.rows([&](T*, T*, Group a, Group b) {
      for (int64_t u = 0; u < U; ++u) {
        const Vec da = a[u] * mult_s - vm_s[u], db = b[u] * mult_t - vm_t[u];
        const Vec ea = da.exp(), eb = db.exp();
        sum_s[u] += ea;
        sum_t[u] += eb;
        if constexpr (KIND <= FORWARD_KL) sum_acc[u].add(kl_term<KIND>(da, db, ea, eb));
      }
    });
    store_state(part_s, blk.i0, sum_s);
    store_state(part_t, blk.i0, sum_t);
    for (int64_t u = 0; u < U; ++u) sum_acc[u].sum.store(&part_a[blk.i0 + u * Vec::size()]);
    add_parts(blk.i0, l_s, l_t, acc);
  });
  for (int64_t i = 0; i < lanes; ++i) {
    const double log_ls = std::log(l_s[i]), log_lt = std::log(l_t[i]);
    kl_finish<KIND>(acc[i], l_s[i], l_t[i], log_ls, log_lt, loss[i], c_s[i], c_t[i]);
    // lq = (s - m_s) - log l_s: the shift by the row maximum is exact (as in the row kernel)
    log_l_s[i] = static_cast<T>(log_ls);
    log_l_t[i] = static_cast<T>(log_lt);
  }

  // ---- pass 2: the other divergences need normalised probabilities
  if constexpr (KIND > FORWARD_KL) {
    for_blocks<T>(xs, xt, ld_s, ld_t, V, r0, r1, [&](const auto& blk) {
      Vec vm_s[U], vm_t[U], vls[U], vlt[U];
      Compensated<T> sum_phi[U], sum_qg[U], sum_ph[U];
      load_state(m_s, blk.i0, vm_s);
      load_state(m_t, blk.i0, vm_t);
      load_state(log_l_s, blk.i0, vls);
      load_state(log_l_t, blk.i0, vlt);
      blk.rows([&](T*, T*, Group a, Group b) {
        for (int64_t u = 0; u < U; ++u) {
          const Vec lq = (a[u] * mult_s - vm_s[u]) - vls[u], lp = (b[u] * mult_t - vm_t[u]) - vlt[u];
          Vec phi, qg, ph;
          terms<T, KIND>(lq, lp, k, phi, qg, ph);
          sum_phi[u].add(phi);
          sum_qg[u].add(qg);
          sum_ph[u].add(ph);
        }
      });
      for (int64_t u = 0; u < U; ++u) {
        sum_phi[u].sum.store(&part_s[blk.i0 + u * Vec::size()]);
        sum_qg[u].sum.store(&part_t[blk.i0 + u * Vec::size()]);
        sum_ph[u].sum.store(&part_a[blk.i0 + u * Vec::size()]);
      }
      add_parts(blk.i0, loss, c_s, c_t);
    });
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r - r0;
    out_loss[r] = static_cast<T>(loss[i]);
    T* st = out_stats + 6 * r;
    st[0] = m_s[i];
    st[1] = log_l_s[i];
    st[2] = m_t[i];
    st[3] = log_l_t[i];
    st[4] = static_cast<T>(c_s[i]);
    st[5] = static_cast<T>(c_t[i]);
    vc_s[i] = static_cast<T>(c_s[i]);
    vc_t[i] = static_cast<T>(c_t[i]);
    if (scale_s) vscale_s[i] = scale_s[r];
    if (scale_t) vscale_t[i] = scale_t[r];
  }
  if (!grad_s && !grad_t) return;

  // ---- pass 3: G = (q*g - q c_s) * row_grad / T_s (likewise p*h - p c_t, T_t), times 1 - tanh^2 under the model's
  // softcap
  for_blocks<T>(xs, xt, ld_s, ld_t, V, r0, r1, [&](const auto& blk) {
    Vec vm_s[U], vm_t[U], vls[U], vlt[U], cs[U], ct[U], sc_s[U], sc_t[U];
    load_state(m_s, blk.i0, vm_s);
    load_state(m_t, blk.i0, vm_t);
    load_state(log_l_s, blk.i0, vls);
    load_state(log_l_t, blk.i0, vlt);
    load_state(vc_s, blk.i0, cs);
    load_state(vc_t, blk.i0, ct);
    load_state(vscale_s, blk.i0, sc_s);
    load_state(vscale_t, blk.i0, sc_t);
    blk.rows([&](T* s, T* t, Group a, Group b) {
      for (int64_t u = 0; u < U; ++u) {
        const Vec lq = (a[u] * mult_s - vm_s[u]) - vls[u], lp = (b[u] * mult_t - vm_t[u]) - vlt[u];
        Vec g_s, g_t;
        grads<T, KIND>(lq, lp, cs[u], ct[u], k, grad_s, grad_t, g_s, g_t);
        if (grad_s) {
          g_s = g_s * sc_s[u];
          if (cap_s) g_s = g_s * (one - a[u] * a[u]);
          blk.store(s, g_s, u);
        }
        if (grad_t) {
          g_t = g_t * sc_t[u];
          if (cap_t) g_t = g_t * (one - b[u] * b[u]);
          blk.store(t, g_t, u);
        }
      }
    });
  });
}

}  // namespace

template <typename T>
void divergence_cols(int64_t kind, T* xs, T* xt, int64_t ld_s, int64_t ld_t, int64_t V, int64_t r0, int64_t r1,
                     const Consts<T>& k, const T* scale_s, const T* scale_t, bool grad_s, bool grad_t, T* out_loss,
                     T* out_stats) {
#define MINILLM_COLS(KIND) \
  return cols<T, KIND>(xs, xt, ld_s, ld_t, V, r0, r1, k, scale_s, scale_t, grad_s, grad_t, out_loss, out_stats)
  switch (kind) {
    case REVERSE_KL: MINILLM_COLS(REVERSE_KL);
    case FORWARD_KL: MINILLM_COLS(FORWARD_KL);
    case JSD: MINILLM_COLS(JSD);
    case TVD: MINILLM_COLS(TVD);
    case SKEW_FORWARD_KL: MINILLM_COLS(SKEW_FORWARD_KL);
    default: MINILLM_COLS(SKEW_REVERSE_KL);
  }
#undef MINILLM_COLS
}

template void divergence_cols<float>(int64_t, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                     const Consts<float>&, const float*, const float*, bool, bool, float*, float*);
template void divergence_cols<double>(int64_t, double*, double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                      const Consts<double>&, const double*, const double*, bool, bool, double*,
                                      double*);

}  // namespace divergence
}  // namespace minillm_fast_native
