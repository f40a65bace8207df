// Per-thread pieces of the fused divergence rows kernel (divergence_rows.cu), host-and-device so that
// tests/cuda/host_emulation.cu runs them on the CPU. The formulas are those of csrc/fused_divergence_cpu.cpp, entry
// for entry (which are those of minillm_fast/divergences.py and kernels/fused_divergence.py):
//
//   loss L = sum_v phi,   c_s = sum_v q*g,   c_t = sum_v p*h,
//   dL/dz_s = (q*g - q c_s) * row_grad / T * (1 - tanh^2)     (likewise dL/dz_t with p*h and c_t)
//
// with lq = (s - m_s) - log l_s (never s - lse: the shift by the row maximum is exact, so large logits lose no more
// than small ones). The two KLs get their loss (and c_s, c_t) from the first sweep's shifted accumulator; the other
// four need normalised probabilities, hence a second sweep (`terms_thread`) once both lse are known.
#pragma once

#include "common.cuh"

namespace minillm_fast_cuda {

// Per-op constants of the divergence
template <typename A>
struct DivConsts {
  Scaling<A> k;
  A log_w, log_1mw;  // log of the mixture weight w (beta or skew) and of 1 - w; kLogZero for log 0
  A w, w1;           // exp(log_w), exp(log_1mw)
  A inv_t;           // 1 / T

  MINILLM_HD static DivConsts make(double log_w, double log_1mw, double temperature, double softcap) {
    DivConsts c;
    c.k = Scaling<A>::make(temperature, softcap);
    c.log_w = static_cast<A>(log_w);
    c.log_1mw = static_cast<A>(log_1mw);
    c.w = static_cast<A>(exp(log_w));
    c.w1 = static_cast<A>(exp(log_1mw));
    c.inv_t = static_cast<A>(1.0 / temperature);
    return c;
  }
};

template <int KIND>
struct AccOf {
  static constexpr int value = KIND == REVERSE_KL ? ACC_REVERSE : (KIND == FORWARD_KL ? ACC_FORWARD : ACC_NONE);
};

// A row's statistics: stats = (m_s, log l_s, m_t, log l_t, c_s, c_t), and the loss
struct RowResult {
  double m_s, log_ls, m_t, log_lt, c_s, c_t, loss;
};

// After the first sweep (the block's LseState): log l and, for the KLs, the loss and both constants.
template <int KIND, typename A>
MINILLM_HD RowResult finish_lse(const LseState<A>& st) {
  RowResult r;
  r.m_s = static_cast<double>(st.m_s);
  r.m_t = static_cast<double>(st.m_t);
  r.log_ls = log(st.l_s);
  r.log_lt = log(st.l_t);
  r.loss = r.c_s = r.c_t = 0.0;
  if (KIND == REVERSE_KL) {  // E_q[lq - lp]; c_s = L + 1, c_t = sum(-q) = -1
    r.loss = st.acc / st.l_s - r.log_ls + r.log_lt;
    r.c_s = r.loss + 1.0;
    r.c_t = -1.0;
  } else if (KIND == FORWARD_KL) {  // E_p[lp - lq]; c_s = sum(-p) = -1, c_t = L + 1
    r.loss = st.acc / st.l_t - r.log_lt + r.log_ls;
    r.c_s = -1.0;
    r.c_t = r.loss + 1.0;
  }
  return r;
}

// The row's per-entry log-probabilities, in the math type
template <typename A>
struct LogProbs {
  A m_s, log_ls, m_t, log_lt;

  MINILLM_HD static LogProbs of(const RowResult& r) {
    return LogProbs{static_cast<A>(r.m_s), static_cast<A>(r.log_ls), static_cast<A>(r.m_t),
                    static_cast<A>(r.log_lt)};
  }
  MINILLM_HD A lq(A s) const { return (s - m_s) - log_ls; }
  MINILLM_HD A lp(A t) const { return (t - m_t) - log_lt; }
};

// phi, q*g, p*h of one entry (divergences.py's table) for the divergences that need the second sweep
template <int KIND, typename A>
MINILLM_HD void entry_terms(A lq, A lp, const DivConsts<A>& c, A& phi, A& qg, A& ph) {
  if (KIND == JSD) {  // m = w p + (1 - w) q
    const A q = ex(lq), p = ex(lp);
    const A lm = logaddexp(lp + c.log_w, lq + c.log_1mw);
    qg = c.w1 * q * (lq - lm);
    ph = c.w * p * (lp - lm);
    phi = qg + ph;
  } else if (KIND == TVD) {
    const A q = ex(lq), p = ex(lp);
    const A sgn = sign_diff(q, p);
    phi = A(0.5) * absval(p - q);
    qg = A(0.5) * q * sgn;
    ph = -(A(0.5) * p * sgn);
  } else if (KIND == SKEW_FORWARD_KL) {  // m = w p + (1 - w) q
    const A p = ex(lp);
    const A lm = logaddexp(lp + c.log_w, lq + c.log_1mw);
    const A d = lp - lm;
    phi = p * d;
    qg = -(c.w1 * ex(lp + lq - lm));             // (1 - w) p q / m, finite where m underflows
    ph = p * (d + A(1) - ex(c.log_w + d));       // w p / m <= 1, and 0 at w = 0 where p / m may overflow
  } else if (KIND == SKEW_REVERSE_KL) {  // m = w q + (1 - w) p
    const A q = ex(lq);
    const A lm = logaddexp(lq + c.log_w, lp + c.log_1mw);
    const A d = lq - lm;
    phi = q * d;
    qg = q * (d + A(1) - ex(c.log_w + d));
    ph = -(c.w1 * ex(lp + lq - lm));
  } else {  // the KLs never come here
    phi = qg = ph = A(0);
  }
}

// The second sweep, one thread's share: out = (sum phi, sum q*g, sum p*h), tile sums in A folded into doubles.
template <int KIND, typename S, typename A>
MINILLM_HD void terms_thread(const S* __restrict__ xs, const S* __restrict__ xt, int64_t V, int tid, int nth,
                             const DivConsts<A>& c, const LogProbs<A>& lp_of, double out[3]) {
  out[0] = out[1] = out[2] = 0.0;
  for (int64_t base = 0; base < V; base += static_cast<int64_t>(kUnroll) * nth) {
    A sum_phi = 0, sum_qg = 0, sum_ph = 0;
MINILLM_UNROLL
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t v = base + static_cast<int64_t>(j) * nth + tid;
      if (v < V) {
        A phi, qg, ph;
        entry_terms<KIND>(lp_of.lq(c.k.scaled(xs[v])), lp_of.lp(c.k.scaled(xt[v])), c, phi, qg, ph);
        sum_phi += phi;
        sum_qg += qg;
        sum_ph += ph;
      }
    }
    out[0] += static_cast<double>(sum_phi);
    out[1] += static_cast<double>(sum_qg);
    out[2] += static_cast<double>(sum_ph);
  }
}

// dL/ds and dL/dt of one entry before the row scale (csrc/fused_divergence_cpu.cpp, pass 3)
template <int KIND, typename A>
MINILLM_HD void entry_grads(A lq, A lp, const DivConsts<A>& c, A c_s, A c_t, bool grad_s, bool grad_t, A& g_s,
                            A& g_t) {
  g_s = g_t = A(0);
  if (KIND == REVERSE_KL) {  // q*g = q (lq - lp + 1), p*h = -q
    const A q = ex(lq);
    if (grad_s) g_s = q * ((lq - lp) + (A(1) - c_s));
    if (grad_t) g_t = -q - ex(lp) * c_t;
  } else if (KIND == FORWARD_KL) {  // q*g = -p, p*h = p (lp - lq + 1)
    const A p = ex(lp);
    if (grad_s) g_s = -p - ex(lq) * c_s;
    if (grad_t) g_t = p * ((lp - lq) + (A(1) - c_t));
  } else if (KIND == JSD) {
    const A q = ex(lq), p = ex(lp);
    const A lm = logaddexp(lp + c.log_w, lq + c.log_1mw);
    if (grad_s) g_s = q * (c.w1 * (lq - lm) - c_s);
    if (grad_t) g_t = p * (c.w * (lp - lm) - c_t);
  } else if (KIND == TVD) {
    const A q = ex(lq), p = ex(lp);
    const A sgn = sign_diff(q, p);
    if (grad_s) g_s = q * (A(0.5) * sgn - c_s);
    if (grad_t) g_t = -(p * (A(0.5) * sgn + c_t));
  } else if (KIND == SKEW_FORWARD_KL) {
    const A lm = logaddexp(lp + c.log_w, lq + c.log_1mw);
    const A d = lp - lm;
    if (grad_s) g_s = -(c.w1 * ex(lp + lq - lm)) - ex(lq) * c_s;
    if (grad_t) g_t = ex(lp) * (d + A(1) - ex(c.log_w + d) - c_t);
  } else {  // SKEW_REVERSE_KL
    const A lm = logaddexp(lq + c.log_w, lp + c.log_1mw);
    const A d = lq - lm;
    if (grad_s) g_s = ex(lq) * (d + A(1) - ex(c.log_w + d) - c_s);
    if (grad_t) g_t = -(c.w1 * ex(lp + lq - lm)) - ex(lp) * c_t;
  }
}

// The gradient sweep, one thread's share: G = dL/dz written in place over the row's logits (only where asked).
// scale = row_grad / T; under a softcap G is multiplied by 1 - tanh(z / cap)^2, tanh recomputed from z.
template <int KIND, typename S, typename A>
MINILLM_HD void grads_thread(S* __restrict__ xs, S* __restrict__ xt, int64_t V, int tid, int nth,
                             const DivConsts<A>& c, const LogProbs<A>& lp_of, A c_s, A c_t, A scale, bool grad_s,
                             bool grad_t) {
  for (int64_t base = 0; base < V; base += static_cast<int64_t>(kUnroll) * nth) {
MINILLM_UNROLL
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t v = base + static_cast<int64_t>(j) * nth + tid;
      if (v < V) {
        const A cs = c.k.capped(to_math(xs[v])), ct = c.k.capped(to_math(xt[v]));
        A g_s, g_t;
        entry_grads<KIND>(lp_of.lq(cs * c.k.mult), lp_of.lp(ct * c.k.mult), c, c_s, c_t, grad_s, grad_t, g_s, g_t);
        if (grad_s) {
          g_s = g_s * scale;
          if (c.k.use_cap) g_s = g_s * (A(1) - cs * cs);
          xs[v] = from_math<S>(g_s);
        }
        if (grad_t) {
          g_t = g_t * scale;
          if (c.k.use_cap) g_t = g_t * (A(1) - ct * ct);
          xt[v] = from_math<S>(g_t);
        }
      }
    }
  }
}

}  // namespace minillm_fast_cuda
