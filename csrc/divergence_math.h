// The per-entry math of the fused divergence, shared by its two native CPU kernels:
//
//   * the row kernel (fused_divergence_cpu.cpp): chunk logits [C, V] with contiguous rows, one row per task, a row's
//     vocabulary entries in the vector lanes;
//   * the column kernel (divergence_cols_cpu.cpp): vocabulary-major chunks (entry (r, v) at x[v * ld + r], what a
//     `W h^T` matmul writes), a group of rows in the lanes, swept down the vocabulary together.
//
// Everything here is elementwise on Vectorized<T> or scalar per row, so it does not care what the lanes hold. Math:
// docs/design.md section 2 and minillm_fast/divergences.py; the formulas are those of kernels/fused_divergence.py.
#pragma once

#include "native_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace minillm_fast_native {
namespace divergence {

using at::vec::Vectorized;

enum Kind : int64_t { REVERSE_KL = 0, FORWARD_KL, JSD, TVD, SKEW_FORWARD_KL, SKEW_REVERSE_KL };

// The op's constants: each model's scaling (s = x * k.s.mult for the student, t = x * k.t.mult for the teacher, x
// the buffer value: z, or tanh(z / cap) after pass 1 under that model's softcap; gradients scaled by its own 1 / T
// and tanh derivative) and the divergence's mixture weight.
template <typename T>
struct Consts {
  common::Scale<T> s, t;  // student, teacher (minillm_fast/scaling.py: each model its own temperature and softcap)
  T log_w, log_1mw;  // log of the mixture weight w (beta or skew) and of 1 - w; LOG_ZERO for log 0
  T w, w1;           // exp(log_w), exp(log_1mw)

  Consts(double temperature_s, double softcap_s, double temperature_t, double softcap_t, double log_w_,
         double log_1mw_)
      : s(temperature_s, softcap_s),
        t(temperature_t, softcap_t),
        log_w(static_cast<T>(log_w_)),
        log_1mw(static_cast<T>(log_1mw_)),
        w(static_cast<T>(std::exp(log_w_))),
        w1(static_cast<T>(std::exp(log_1mw_))) {}
};

// log(e^a + e^b), stable: max + log1p(e^(min - max)).
template <typename T>
inline Vectorized<T> logaddexp(const Vectorized<T>& a, const Vectorized<T>& b) {
  const auto hi = at::vec::maximum(a, b);
  const auto lo = at::vec::minimum(a, b);
  return hi + (lo - hi).exp().log1p();
}

// sign(q - p) in {-1, 0, 1}
template <typename T>
inline Vectorized<T> sign_diff(const Vectorized<T>& q, const Vectorized<T>& p) {
  const Vectorized<T> zero(T(0)), one(T(1)), minus_one(T(-1));
  return Vectorized<T>::blendv(Vectorized<T>::blendv(zero, minus_one, q < p), one, q > p);
}

// Pass 1 of a row, when a block moved its running maxima from (m_s, m_t) to (ms_new, mt_new): the sums of exp (l_s,
// l_t, in double) and the shifted KL accumulator are rebased; each old KL term's bracket grows by
// (m_b' - m_b) - (m_a' - m_a). acc = sum e^(a - m_a) ((a - m_a) - (b - m_b)) with a = s for the reverse KL, t for
// the forward KL (as `_kl_update` in the Triton kernel).
template <int64_t KIND, typename T>
inline void rebase(T& m_s, T& m_t, T ms_new, T mt_new, double& l_s, double& l_t, double& acc) {
  const double fs = std::exp(static_cast<double>(m_s) - ms_new), ft = std::exp(static_cast<double>(m_t) - mt_new);
  const double dms = static_cast<double>(ms_new) - m_s, dmt = static_cast<double>(mt_new) - m_t;
  if constexpr (KIND == REVERSE_KL) acc = (acc + (dmt - dms) * l_s) * fs;
  if constexpr (KIND == FORWARD_KL) acc = (acc + (dms - dmt) * l_t) * ft;
  l_s *= fs;
  l_t *= ft;
  m_s = ms_new;
  m_t = mt_new;
}

// An entry's term of the KL accumulator, given da = s - m_s, db = t - m_t and their exps (the other divergences have
// none: zero).
template <int64_t KIND, typename T>
inline Vectorized<T> kl_term(const Vectorized<T>& da, const Vectorized<T>& db, const Vectorized<T>& ea,
                             const Vectorized<T>& eb) {
  if constexpr (KIND == REVERSE_KL) return ea * (da - db);
  else if constexpr (KIND == FORWARD_KL) return eb * (db - da);
  else return Vectorized<T>(T(0));
}

template <int64_t KIND, typename T>
inline void kl_accumulate(Vectorized<T>& sum_acc, const Vectorized<T>& da, const Vectorized<T>& db,
                          const Vectorized<T>& ea, const Vectorized<T>& eb) {
  if constexpr (KIND <= FORWARD_KL) sum_acc += kl_term<KIND>(da, db, ea, eb);
}

// Pass 1 of a two-model row: both models' softmax statistics after one sweep (lse_s = m_s + log l_s, likewise t;
// kept apart, and the maxima in T, as the later passes subtract them) and, for the KLs, the shifted accumulator acc
// of `rebase` (0 for the other divergences).
template <typename T>
struct PairLse {
  T m_s, m_t;
  double l_s, l_t, acc;
};

// The sweep of pass 1 over the rows xs, xt [0, V) (the row kernel's, fused_divergence_cpu.cpp, and with REVERSE_KL
// the rollout statistics', token_stats_cpu.cpp), in blocks of kBlock entries that stay in L1: the block's maxima
// first (under a model's softcap, tanh(z / cap) is computed once here and stored in place of z; every later pass
// multiplies it by that model's cap / T), then, against the running maxima, the sums of exp of both models and the
// KL accumulator, rebased when a running maximum moves. Within a block the sums are vector sums of at most
// kBlock / W terms per lane, blocks are added in double; entries past the end of a row are masked (kLogZero in the
// maxima and exps, so they add exact zeros).
template <typename T, int64_t KIND>
inline PairLse<T> pair_lse(T* xs, T* xt, int64_t V, const common::Scale<T>& ks, const common::Scale<T>& kt) {
  using common::for_vecs;
  using common::hmax;
  using common::hsum;
  using common::keep;
  using common::kLogZero;
  using common::load;
  using common::nan_max;
  using common::store;
  using Vec = Vectorized<T>;
  const Vec mult_s(ks.mult), mult_t(kt.mult), inv_cap_s(ks.inv_cap), inv_cap_t(kt.inv_cap), zero(T(0)),
      sentinel(static_cast<T>(kLogZero));
  const bool cap_s = ks.use_cap, cap_t = kt.use_cap;
  PairLse<T> st{static_cast<T>(kLogZero), static_cast<T>(kLogZero), 0.0, 0.0, 0.0};
  for (int64_t b0 = 0; b0 < V; b0 += common::kBlock) {
    const int64_t b1 = std::min(V, b0 + common::kBlock);
    Vec max_s(sentinel), max_t(sentinel);
    for_vecs<T>(b0, b1, [&](auto tail, int64_t j, int64_t n) {
      using Tail = decltype(tail);
      Vec a = load<T, Tail>(xs + j, n), b = load<T, Tail>(xt + j, n);
      if (cap_s) {
        a = (a * inv_cap_s).tanh();
        store<T, Tail>(xs + j, a, n);
      }
      if (cap_t) {
        b = (b * inv_cap_t).tanh();
        store<T, Tail>(xt + j, b, n);
      }
      max_s = at::vec::maximum(max_s, keep<T, Tail>(a * mult_s, sentinel, n));
      max_t = at::vec::maximum(max_t, keep<T, Tail>(b * mult_t, sentinel, n));
    });
    const T ms_new = nan_max(st.m_s, hmax(max_s)), mt_new = nan_max(st.m_t, hmax(max_t));
    if (!(ms_new == st.m_s && mt_new == st.m_t)) rebase<KIND>(st.m_s, st.m_t, ms_new, mt_new, st.l_s, st.l_t, st.acc);
    const Vec vm_s(st.m_s), vm_t(st.m_t);
    Vec sum_s(zero), sum_t(zero), sum_acc(zero);
    for_vecs<T>(b0, b1, [&](auto tail, int64_t j, int64_t n) {
      using Tail = decltype(tail);
      const Vec da = keep<T, Tail>(load<T, Tail>(xs + j, n) * mult_s, sentinel, n) - vm_s;
      const Vec db = keep<T, Tail>(load<T, Tail>(xt + j, n) * mult_t, sentinel, n) - vm_t;
      const Vec ea = da.exp(), eb = db.exp();
      sum_s += ea;
      sum_t += eb;
      kl_accumulate<KIND>(sum_acc, da, db, ea, eb);  // masked lanes: e = 0
    });
    st.l_s += hsum(sum_s);
    st.l_t += hsum(sum_t);
    if constexpr (KIND <= FORWARD_KL) st.acc += hsum(sum_acc);
  }
  return st;
}

// After pass 1: the KLs' loss and c_s = sum q*g, c_t = sum p*h in closed form (0 for the other divergences, whose
// pass 2 adds them up).
template <int64_t KIND>
inline void kl_finish(double acc, double l_s, double l_t, double log_ls, double log_lt, double& loss, double& c_s,
                      double& c_t) {
  loss = c_s = c_t = 0.0;
  if constexpr (KIND == REVERSE_KL) {  // E_q[lq - lp]; c_s = L + 1, c_t = sum(-q) = -1
    loss = acc / l_s - log_ls + log_lt;
    c_s = loss + 1.0;
    c_t = -1.0;
  } else if constexpr (KIND == FORWARD_KL) {  // E_p[lp - lq]; c_s = sum(-p) = -1, c_t = L + 1
    loss = acc / l_t - log_lt + log_ls;
    c_s = -1.0;
    c_t = loss + 1.0;
  }
}

// Pass 2 (JSD, TVD, skew KLs): the entry's phi, q*g, p*h from its log-probabilities lq, lp.
template <typename T, int64_t KIND>
inline void terms(const Vectorized<T>& lq, const Vectorized<T>& lp, const Consts<T>& k, Vectorized<T>& phi,
                  Vectorized<T>& qg, Vectorized<T>& ph) {
  using Vec = Vectorized<T>;
  const Vec log_w(k.log_w), log_1mw(k.log_1mw), w(k.w), w1(k.w1), zero(T(0)), one(T(1)), half(T(0.5));
  if constexpr (KIND == JSD) {  // m = w p + (1 - w) q
    const Vec q = lq.exp(), p = lp.exp();
    const Vec lm = logaddexp(lp + log_w, lq + log_1mw);
    qg = w1 * q * (lq - lm);
    ph = w * p * (lp - lm);
    phi = qg + ph;
  } else if constexpr (KIND == TVD) {
    const Vec q = lq.exp(), p = lp.exp();
    const Vec sgn = sign_diff(q, p);
    phi = half * (p - q).abs();
    qg = half * q * sgn;
    ph = zero - half * p * sgn;
  } else if constexpr (KIND == SKEW_FORWARD_KL) {  // m = w p + (1 - w) q
    const Vec p = lp.exp();
    const Vec lm = logaddexp(lp + log_w, lq + log_1mw);
    const Vec d = lp - lm;
    phi = p * d;
    qg = zero - w1 * (lp + lq - lm).exp();  // (1 - w) p q / m, finite where m underflows
    ph = p * (d + one - (log_w + d).exp());  // w p / m <= 1, and 0 at w = 0 where p / m may overflow
  } else {  // SKEW_REVERSE_KL, m = w q + (1 - w) p
    const Vec q = lq.exp();
    const Vec lm = logaddexp(lq + log_w, lp + log_1mw);
    const Vec d = lq - lm;
    phi = q * d;
    qg = q * (d + one - (log_w + d).exp());
    ph = zero - w1 * (lp + lq - lm).exp();
  }
}

// Pass 3: the entry's gradients before the row scale, g_s = q*g - q c_s and g_t = p*h - p c_t (where asked).
template <typename T, int64_t KIND>
inline void grads(const Vectorized<T>& lq, const Vectorized<T>& lp, const Vectorized<T>& c_s,
                  const Vectorized<T>& c_t, const Consts<T>& k, bool grad_s, bool grad_t, Vectorized<T>& g_s,
                  Vectorized<T>& g_t) {
  using Vec = Vectorized<T>;
  const Vec log_w(k.log_w), log_1mw(k.log_1mw), w(k.w), w1(k.w1), zero(T(0)), one(T(1)), half(T(0.5));
  if constexpr (KIND == REVERSE_KL) {  // q*g = q (lq - lp + 1), p*h = -q
    const Vec q = lq.exp();
    if (grad_s) g_s = q * ((lq - lp) + (one - c_s));
    if (grad_t) g_t = zero - q - lp.exp() * c_t;
  } else if constexpr (KIND == FORWARD_KL) {  // q*g = -p, p*h = p (lp - lq + 1)
    const Vec p = lp.exp();
    if (grad_s) g_s = zero - p - lq.exp() * c_s;
    if (grad_t) g_t = p * ((lp - lq) + (one - c_t));
  } else if constexpr (KIND == JSD) {
    const Vec q = lq.exp(), p = lp.exp();
    const Vec lm = logaddexp(lp + log_w, lq + log_1mw);
    if (grad_s) g_s = q * (w1 * (lq - lm) - c_s);
    if (grad_t) g_t = p * (w * (lp - lm) - c_t);
  } else if constexpr (KIND == TVD) {
    const Vec q = lq.exp(), p = lp.exp();
    const Vec sgn = sign_diff(q, p);
    if (grad_s) g_s = q * (half * sgn - c_s);
    if (grad_t) g_t = zero - p * (half * sgn + c_t);
  } else if constexpr (KIND == SKEW_FORWARD_KL) {
    const Vec lm = logaddexp(lp + log_w, lq + log_1mw);
    const Vec d = lp - lm;
    if (grad_s) g_s = zero - w1 * (lp + lq - lm).exp() - lq.exp() * c_s;
    if (grad_t) g_t = lp.exp() * (d + one - (log_w + d).exp() - c_t);
  } else {  // SKEW_REVERSE_KL
    const Vec lm = logaddexp(lq + log_w, lp + log_1mw);
    const Vec d = lq - lm;
    if (grad_s) g_s = lq.exp() * (d + one - (log_w + d).exp() - c_s);
    if (grad_t) g_t = zero - w1 * (lp + lq - lm).exp() - lp.exp() * c_t;
  }
}

// The column kernel's entry (divergence_cols_cpu.cpp): rows [r0, r1) of a vocabulary-major chunk. xs, xt: entry
// (r, v) at x[v * ld + r]; scale_s, scale_t [C]: row_grad / T_s and row_grad / T_t per row (null when no gradient
// is wanted); out_loss [C], out_stats [C, 6] as the row kernel's. Defined for T = float, double.
template <typename T>
void divergence_cols(int64_t kind, T* xs, T* xt, int64_t ld_s, int64_t ld_t, int64_t V, int64_t r0, int64_t r1,
                     const Consts<T>& k, const T* scale_s, const T* scale_t, bool grad_s, bool grad_t, T* out_loss,
                     T* out_stats);

}  // namespace divergence
}  // namespace minillm_fast_native
