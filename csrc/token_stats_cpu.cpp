// Native (C++) row kernels of the token log-probs and of the rollout statistics, for CPU tensors
// (minillm_fast/ops/token_logprobs.py and ops/sampling.py, backend "native").
//
// The Python side walks the rows in chunks of C, computes each chunk's logits [C, V] with one matmul per model (CPU
// BLAS, into a buffer reused across chunks) and calls one of these on the chunk; nothing [N, V] is ever allocated.
// Notation (docs/design.md section 2): s = softcap(z) / T, lq = (s - m) - log l with m the row max and
// l = sum e^(s - m), q = e^lq.
//
// token_logprobs_fwd_rows   one sweep per row (common::row_lse): m, log l and, for the entropy, the shifted
//                           accumulator A = sum e^(s - m) (s - m), rebased when the running max moves; then
//                           lq[y] = (s_y - m) - log l and H = -sum q lq = log l - A / l.
// token_logprobs_bwd_rows   dL/dz = (a (onehot(y) - q) - e q (lq + H)) / T  (x (1 - tanh^2) under a softcap) for
//                           upstream gradients a (log-prob) and e (entropy), written in place over the logits, from
//                           the forward's m and log l: one sweep per row; the caller's matmuls take it from there.
// rollout_statistics_rows   one sweep over both models' rows: both lse and the reverse-KL numerator
//                           sum e^(s - m_s) ((s - m_s) - (t - m_t)) (fused_divergence_cpu.cpp's pass 1: pair_lse of
//                           divergence_math.h), then log q(y), log p(y) and KL(q || p) = A / l_s - log l_s + log l_t.
//                           Each model has its own scaling: s = softcap_s(z_s) / T_s, t = softcap_t(z_t) / T_t
//                           (minillm_fast/scaling.py).
//
// The kernels are registered as torch.library ops of the namespace minillm_fast_native, as all of the extension's
// are (torch.ops.minillm_fast_native.* once the library is loaded). Rows are split over the intra-op threads by
// at::parallel_for; each row is computed by one thread in a fixed order, so results do not depend on the thread count.

#include "divergence_math.h"
#include "native_common.h"

#include <tuple>

namespace minillm_fast_native {
namespace {

using at::vec::Vectorized;
using namespace common;

constexpr const char* kFwd = "token_logprobs_fwd_rows";
constexpr const char* kBwd = "token_logprobs_bwd_rows";
constexpr const char* kRollout = "rollout_statistics_rows";

// ---------------------------------------------------------------------------------------------------------------------
// token log-probs, forward
// ---------------------------------------------------------------------------------------------------------------------
// z: [C, V] raw chunk logits (overwritten with tanh(z / cap) under a softcap); targets: [C] int64 (clamped into
// [0, V): the caller zeroes ignored rows). Returns logprob [C], stats [C, 2] (m, log l) and entropy [C] ([0] unless
// `entropy`), in z's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_rows(const at::Tensor& z, const at::Tensor& targets,
                                                                       double temperature, double softcap,
                                                                       bool entropy) {
  check_logits(kFwd, "z", z);
  check_scalars(kFwd, temperature, softcap);
  const int64_t C = z.size(0), V = z.size(1);
  const at::Tensor y = check_rows(kFwd, "targets", targets, C, at::kLong);
  auto logprob = at::empty({C}, z.options());
  auto stats = at::empty({C, 2}, z.options());
  auto ent = at::empty({entropy ? C : 0}, z.options());
  if (C == 0) return {logprob, stats, ent};

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "minillm_fast_native::token_logprobs_fwd_rows", [&] {
    using T = scalar_t;
    const Scale<T> k(temperature, softcap);
    T* pz = z.data_ptr<T>();
    const int64_t ld = z.stride(0);
    const int64_t* py = y.data_ptr<int64_t>();
    T* plp = logprob.data_ptr<T>();
    T* pst = stats.data_ptr<T>();
    T* pent = entropy ? ent.data_ptr<T>() : nullptr;
    at::parallel_for(0, C, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* x = pz + r * ld;
        const RowLse st = entropy ? row_lse<T, true>(x, V, k, [](int64_t, int64_t, double, double) {})
                                  : row_lse<T>(x, V, k);
        const double log_l = std::log(st.l);
        const T s_y = x[clamp_token(py[r], V)] * k.mult;  // the same product as the sweep's
        plp[r] = static_cast<T>((s_y - static_cast<T>(st.m)) - log_l);
        pst[2 * r] = static_cast<T>(st.m);
        pst[2 * r + 1] = static_cast<T>(log_l);
        if (pent) pent[r] = static_cast<T>(log_l - st.acc / st.l);
      }
    });
  });
  return {logprob, stats, ent};
}

// ---------------------------------------------------------------------------------------------------------------------
// token log-probs, backward
// ---------------------------------------------------------------------------------------------------------------------
// z: [C, V] raw chunk logits, overwritten with dL/dz; stats: [C, 2] the forward's (m, log l); g_lp: [C] upstream
// gradient of the log-probs (0 on ignored rows); ent, g_ent: [C] the forward's entropy and its upstream gradient,
// together or not at all.
void token_logprobs_bwd_rows(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& stats,
                             const c10::optional<at::Tensor>& ent, const at::Tensor& g_lp,
                             const c10::optional<at::Tensor>& g_ent, double temperature, double softcap) {
  check_logits(kBwd, "z", z);
  check_scalars(kBwd, temperature, softcap);
  const int64_t C = z.size(0), V = z.size(1);
  const auto dtype = z.scalar_type();
  const at::Tensor y = check_rows(kBwd, "targets", targets, C, at::kLong);
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && stats.size(0) == C && stats.size(1) == 2, kBwd,
              ": stats must be the forward's [", C, ", 2] CPU tensor (row max, log sum-exp), got ", stats.sizes(),
              " on ", stats.device());
  TORCH_CHECK(stats.scalar_type() == dtype, kBwd, ": stats must have the dtype of z (", dtype, "), got ",
              stats.scalar_type());
  const at::Tensor st = stats.contiguous();
  const at::Tensor a = check_rows(kBwd, "g_lp", g_lp, C, dtype);
  const bool has_ent = g_ent.has_value() && g_ent->defined();
  TORCH_CHECK(has_ent == (ent.has_value() && ent->defined()), kBwd,
              ": ent and g_ent must be given together (the entropy and its upstream gradient) or both be None");
  at::Tensor h, e;
  if (has_ent) {
    h = check_rows(kBwd, "ent", *ent, C, dtype);
    e = check_rows(kBwd, "g_ent", *g_ent, C, dtype);
  }
  if (C == 0) return;

  AT_DISPATCH_FLOATING_TYPES(dtype, "minillm_fast_native::token_logprobs_bwd_rows", [&] {
    using T = scalar_t;
    using Vec = Vectorized<T>;
    const Scale<T> k(temperature, softcap);
    T* pz = z.data_ptr<T>();
    const int64_t ld = z.stride(0);
    const int64_t* py = y.data_ptr<int64_t>();
    const T* pst = st.data_ptr<T>();
    const T* pa = a.data_ptr<T>();
    const T* ph = has_ent ? h.data_ptr<T>() : nullptr;
    const T* pe = has_ent ? e.data_ptr<T>() : nullptr;
    const Vec mult(k.mult), inv_cap(k.inv_cap), inv_t(k.inv_t), one(T(1));
    at::parallel_for(0, C, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* x = pz + r * ld;
        const int64_t yr = clamp_token(py[r], V);
        const T z_y = x[yr];
        const Vec vm(pst[2 * r]), vlog_l(pst[2 * r + 1]), minus_a(-pa[r]);
        const Vec vh(ph ? ph[r] : T(0)), ve(pe ? pe[r] : T(0));
        for_vecs<T>(0, V, [&](auto tail, int64_t j, int64_t n) {
          using Tail = decltype(tail);
          const Vec raw = load<T, Tail>(x + j, n);
          const Vec c = k.use_cap ? (raw * inv_cap).tanh() : raw;
          const Vec lq = (c * mult - vm) - vlog_l;
          const Vec q = lq.exp();
          Vec g = q * minus_a;
          if (pe) g = g - q * (lq + vh) * ve;
          g = g * inv_t;
          if (k.use_cap) g = g * (one - c * c);
          store<T, Tail>(x + j, g, n);
        });
        // the one-hot term a / T (times the softcap's derivative at the target); a negative target has none (the
        // gradient of -a log sum e^s alone, which minillm_fast/ops/sparse_divergence.py asks for)
        if (py[r] < 0) continue;
        T d = pa[r] * k.inv_t;
        if (k.use_cap) {
          const T c = std::tanh(z_y * k.inv_cap);
          d *= T(1) - c * c;
        }
        x[yr] += d;
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// rollout statistics
// ---------------------------------------------------------------------------------------------------------------------
// zs, zt: [C, V] raw chunk logits of the student and the teacher (each overwritten under its model's softcap);
// tokens: [C] int64; temperature_s, softcap_s: the student's effective temperature and softcap (0: none),
// temperature_t, softcap_t the teacher's. Returns log q(y), log p(y), KL(q || p), each [C] in the logits' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rollout_statistics_rows(const at::Tensor& zs, const at::Tensor& zt,
                                                                       const at::Tensor& tokens, double temperature_s,
                                                                       double softcap_s, double temperature_t,
                                                                       double softcap_t) {
  check_logits(kRollout, "zs", zs);
  check_same_logits(kRollout, "zt", zt, zs);
  check_scalars(kRollout, "temperature_s", temperature_s, "softcap_s", softcap_s);
  check_scalars(kRollout, "temperature_t", temperature_t, "softcap_t", softcap_t);
  const int64_t C = zs.size(0), V = zs.size(1);
  const at::Tensor y = check_rows(kRollout, "tokens", tokens, C, at::kLong);
  auto lq_y = at::empty({C}, zs.options());
  auto lp_y = at::empty({C}, zs.options());
  auto rkl = at::empty({C}, zs.options());
  if (C == 0) return {lq_y, lp_y, rkl};

  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "minillm_fast_native::rollout_statistics_rows", [&] {
    using T = scalar_t;
    const Scale<T> ks(temperature_s, softcap_s), kt(temperature_t, softcap_t);
    T* ps = zs.data_ptr<T>();
    T* pt = zt.data_ptr<T>();
    const int64_t ld_s = zs.stride(0), ld_t = zt.stride(0);
    const int64_t* py = y.data_ptr<int64_t>();
    T* plq = lq_y.data_ptr<T>();
    T* plp = lp_y.data_ptr<T>();
    T* pkl = rkl.data_ptr<T>();
    at::parallel_for(0, C, row_grain(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* xs = ps + r * ld_s;
        T* xt = pt + r * ld_t;
        // one sweep over both rows (the fused divergence's pass 1, divergence_math.h): both lse and the reverse-KL
        // numerator
        const auto st = divergence::pair_lse<T, divergence::REVERSE_KL>(xs, xt, V, ks, kt);
        const double log_ls = std::log(st.l_s), log_lt = std::log(st.l_t);
        const int64_t yr = clamp_token(py[r], V);
        plq[r] = static_cast<T>((xs[yr] * ks.mult - st.m_s) - log_ls);
        plp[r] = static_cast<T>((xt[yr] * kt.mult - st.m_t) - log_lt);
        pkl[r] = static_cast<T>(st.acc / st.l_s - log_ls + log_lt);
      }
    });
  });
  return {lq_y, lp_y, rkl};
}

}  // namespace
}  // namespace minillm_fast_native

TORCH_LIBRARY_FRAGMENT(minillm_fast_native, m) {
  m.def("token_logprobs_fwd_rows(Tensor(a!) z, Tensor targets, float temperature, float softcap, bool entropy) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("token_logprobs_bwd_rows(Tensor(a!) z, Tensor targets, Tensor stats, Tensor? ent, Tensor g_lp, "
        "Tensor? g_ent, float temperature, float softcap) -> ()");
  m.def("rollout_statistics_rows(Tensor(a!) zs, Tensor(b!) zt, Tensor tokens, float temperature_s, float softcap_s, "
        "float temperature_t, float softcap_t) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(minillm_fast_native, CPU, m) {
  m.impl("token_logprobs_fwd_rows", TORCH_FN(minillm_fast_native::token_logprobs_fwd_rows));
  m.impl("token_logprobs_bwd_rows", TORCH_FN(minillm_fast_native::token_logprobs_bwd_rows));
  m.impl("rollout_statistics_rows", TORCH_FN(minillm_fast_native::rollout_statistics_rows));
}
