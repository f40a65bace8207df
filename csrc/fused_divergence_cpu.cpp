// Native (C++) rows function of the token-chunked fused divergence, for CPU tensors.
//
// Math (docs/design.md section 2, minillm_fast/divergences.py). Per row, with s = softcap_s(z_s) / T_s and
// t = softcap_t(z_t) / T_t (each model its own effective temperature and softcap, minillm_fast/scaling.py; a cap of 0
// is none), lq = s - lse(s), lp = t - lse(t), the loss is L = sum_v phi and the gradients with respect to the raw
// logits are
//
//     dL/dz_s = (q*g - q * c_s) / T_s * (1 - tanh_s^2),   c_s = sum_v q*g   (likewise dL/dz_t with p*h, c_t, T_t)
//
// with the per-entry phi, q*g, p*h of the divergences table (the same formulas as kernels/fused_divergence.py).
//
// One row is one task: at::parallel_for splits the chunk's rows over the intra-op threads, and each row is computed by
// one thread in a fixed order, so results do not depend on the thread count. Per row:
//
//   pass 1  one sweep over the row in blocks of kBlock entries that stay in L1: the block's maxima first (with a
//           model's softcap, tanh(z / cap) is computed once here and stored in place of z; every later pass
//           multiplies it by that model's cap / T), then, against the running maxima, the sums of exp for both
//           models and, for the two KLs, the shifted accumulator  acc = sum e^(a - m_a) ((a - m_a) - (b - m_b)),
//           rebased when a running maximum moves (as `_kl_update` in the Triton kernel). The KLs' loss and c_s, c_t
//           come out of this single pass. The sweep is divergence_math.h's pair_lse (token_stats_cpu.cpp's rollout
//           statistics run it too, with the reverse-KL accumulator).
//   pass 2  (JSD, TVD, skew KLs) phi, q*g, p*h need normalised probabilities: a second sweep once both lse are known.
//   pass 3  when a gradient is wanted: G written in place over z_s / z_t, already multiplied by row_grad / T_s
//           (row_grad / T_t).
//
// Within a block the sums are vector sums of at most kBlock / W terms per lane; blocks are added in double, so the
// summation error does not grow with the vocabulary. Entries past the end of a row are masked (a finite LOG_ZERO
// stand-in for -inf in the maxima and exps, blended zeros in the sums), never read or written.
//
// divergence_rows is registered as the torch.library op torch.ops.minillm_fast_native.divergence_rows (as the other
// row kernels of the extension are: token_stats_cpu.cpp, sampling_cpu.cpp), and so is `capability`. The extension's
// Python module, defined at the end of this file, holds nothing: importing it loads the library, which registers the
// ops (minillm_fast/native.py imports it, from torch's JIT cache or as the package's ahead-of-time build).
//
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) is set by the build (minillm_fast/native.py), together with the matching
// -m flags; at::vec::Vectorized<T> then uses that instruction set and its exp / log / tanh (Sleef, 1 ulp).

#include <torch/extension.h>

#include "divergence_math.h"
#include "native_common.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define MINILLM_STR2(x) #x
#define MINILLM_STR(x) MINILLM_STR2(x)

namespace minillm_fast_native {
namespace {

using at::vec::Vectorized;

using common::for_vecs;
using common::hsum;
using common::kBlock;
using common::keep;
using common::load;
using common::store;
using namespace divergence;  // Kind, Consts and the per-entry math (divergence_math.h)

// ---------------------------------------------------------------------------------------------------------------------
// one row
// ---------------------------------------------------------------------------------------------------------------------
// xs, xt: [V] raw logits of the row (overwritten: tanh(z / cap) after pass 1 under a softcap, G after pass 3).
// out_loss: the row's loss; out_stats: [6] m_s, log l_s, m_t, log l_t, c_s, c_t (lse = m + log l, kept
// apart). scale_s = row_grad / T_s, scale_t = row_grad / T_t.
template <typename T, int64_t KIND>
void divergence_row(T* xs, T* xt, int64_t V, const Consts<T>& k, T scale_s, T scale_t, bool grad_s, bool grad_t,
                    T* out_loss, T* out_stats) {
  using Vec = Vectorized<T>;
  const Vec mult_s(k.s.mult), mult_t(k.t.mult), zero(T(0)), one(T(1));
  const bool cap_s = k.s.use_cap, cap_t = k.t.use_cap;

  // ---- pass 1: lse of both models (and the KL accumulator), blocks of kBlock entries (divergence_math.h)
  const PairLse<T> st = pair_lse<T, KIND>(xs, xt, V, k.s, k.t);
  const T m_s = st.m_s, m_t = st.m_t;
  const double log_ls = std::log(st.l_s), log_lt = std::log(st.l_t);
  double loss, c_s, c_t;
  kl_finish<KIND>(st.acc, st.l_s, st.l_t, log_ls, log_lt, loss, c_s, c_t);

  // lq = (s - m_s) - log l_s: the shift by the row maximum is exact, so large logits lose no more than small ones.
  const Vec vm_s(m_s), vm_t(m_t), vlog_ls(static_cast<T>(log_ls)), vlog_lt(static_cast<T>(log_lt));
  auto log_probs = [&](auto tail, int64_t j, int64_t n, Vec& lq, Vec& lp) {
    using Tail = decltype(tail);
    lq = (load<T, Tail>(xs + j, n) * mult_s - vm_s) - vlog_ls;
    lp = (load<T, Tail>(xt + j, n) * mult_t - vm_t) - vlog_lt;
  };

  // ---- pass 2: the other divergences need normalised probabilities
  if constexpr (KIND > FORWARD_KL) {
    for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
      const int64_t b1 = std::min(V, b0 + kBlock);
      Vec sum_phi(zero), sum_qg(zero), sum_ph(zero);
      for_vecs<T>(b0, b1, [&](auto tail, int64_t j, int64_t n) {
        using Tail = decltype(tail);
        Vec lq, lp, phi, qg, ph;
        log_probs(tail, j, n, lq, lp);
        terms<T, KIND>(lq, lp, k, phi, qg, ph);
        sum_phi += keep<T, Tail>(phi, zero, n);
        sum_qg += keep<T, Tail>(qg, zero, n);
        sum_ph += keep<T, Tail>(ph, zero, n);
      });
      loss += hsum(sum_phi);
      c_s += hsum(sum_qg);
      c_t += hsum(sum_ph);
    }
  }
  *out_loss = static_cast<T>(loss);
  out_stats[0] = static_cast<T>(m_s);
  out_stats[1] = static_cast<T>(log_ls);
  out_stats[2] = static_cast<T>(m_t);
  out_stats[3] = static_cast<T>(log_lt);
  out_stats[4] = static_cast<T>(c_s);
  out_stats[5] = static_cast<T>(c_t);
  if (!grad_s && !grad_t) return;

  // ---- pass 3: G = (q*g - q c_s) * row_grad / T_s (likewise p*h - p c_t, T_t), times 1 - tanh^2 under the model's
  // softcap
  const Vec vc_s(static_cast<T>(c_s)), vc_t(static_cast<T>(c_t)), vscale_s(scale_s), vscale_t(scale_t);
  // one model's G at [j, j + n): g * row_grad / T, times 1 - tanh^2 (x holds tanh) under its softcap
  auto put_grad = [&](auto tail, T* x, int64_t j, int64_t n, const Vec& g, const Vec& scale, bool cap) {
    using Tail = decltype(tail);
    Vec G = g * scale;
    if (cap) {
      const Vec c = load<T, Tail>(x + j, n);
      G = G * (one - c * c);
    }
    store<T, Tail>(x + j, G, n);
  };
  for_vecs<T>(0, V, [&](auto tail, int64_t j, int64_t n) {
    Vec lq, lp, g_s, g_t;
    log_probs(tail, j, n, lq, lp);
    grads<T, KIND>(lq, lp, vc_s, vc_t, k, grad_s, grad_t, g_s, g_t);
    if (grad_s) put_grad(tail, xs, j, n, g_s, vscale_s, cap_s);
    if (grad_t) put_grad(tail, xt, j, n, g_t, vscale_t, cap_t);
  });
}

template <typename T>
using RowFn = void (*)(T*, T*, int64_t, const Consts<T>&, T, T, bool, bool, T*, T*);

template <typename T>
RowFn<T> row_fn(int64_t kind) {
  switch (kind) {
    case REVERSE_KL: return &divergence_row<T, REVERSE_KL>;
    case FORWARD_KL: return &divergence_row<T, FORWARD_KL>;
    case JSD: return &divergence_row<T, JSD>;
    case TVD: return &divergence_row<T, TVD>;
    case SKEW_FORWARD_KL: return &divergence_row<T, SKEW_FORWARD_KL>;
    default: return &divergence_row<T, SKEW_REVERSE_KL>;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// entry point
// ---------------------------------------------------------------------------------------------------------------------
// How a chunk's entries lie in memory: rows contiguous (the row kernel) or columns contiguous, i.e. vocabulary-major
// as a `W h^T` matmul writes it (the column kernel).
enum class Layout { kRows, kColumns };

Layout check_logits(const char* name, const at::Tensor& z) {
  TORCH_CHECK(z.device().is_cpu(), "divergence_rows: ", name, " must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "divergence_rows: ", name,
              " must be float32 or float64 chunk logits [C, V], got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2, "divergence_rows: ", name, " must be 2-D [C, V], got shape ", z.sizes());
  TORCH_CHECK(z.size(1) >= 1, "divergence_rows: ", name, " must have at least one vocabulary entry, got shape ",
              z.sizes());
  if (z.stride(1) == 1 && (z.size(0) <= 1 || z.stride(0) >= z.size(1))) return Layout::kRows;
  TORCH_CHECK(z.stride(0) == 1 && z.stride(1) >= z.size(0), "divergence_rows: ", name,
              " must have contiguous rows (stride(1) == 1) or contiguous columns (stride(0) == 1, the transpose "
              "of a row-major [V, C]), not overlapping; got shape ", z.sizes(), " and strides ", z.strides(),
              " (it is overwritten in place, so it is not copied: pass z.contiguous())");
  return Layout::kColumns;
}

}  // namespace

// zs, zt: [C, V] float32/float64 raw chunk logits (student, teacher), contiguous rows or contiguous columns (both the
// same; columns: the vocabulary-major chunk a `W h^T` matmul writes, which is how the chunked strategy computes them
// on CPU, see minillm_fast/chunked.py); overwritten in place (with G
// when grad_s / grad_t, else with scratch values under a softcap). row_grad: [C] upstream gradient of each row's loss,
// required when a gradient is wanted. kind: 0..5 (divergences.py). temperature_s, softcap_s: the student's effective
// temperature and softcap (0: none), temperature_t, softcap_t the teacher's (DivergenceConfig.kernel_args,
// minillm_fast/scaling.py). Returns loss [C] and stats [C, 6] (lse_s, lse_t, c_s, c_t) in the logits' dtype.
std::tuple<at::Tensor, at::Tensor> divergence_rows(const at::Tensor& zs, const at::Tensor& zt,
                                                   const c10::optional<at::Tensor>& row_grad, int64_t kind,
                                                   double log_w, double log_1mw, double temperature_s,
                                                   double softcap_s, double temperature_t, double softcap_t,
                                                   bool grad_s, bool grad_t) {
  const Layout layout = check_logits("zs", zs);
  TORCH_CHECK(check_logits("zt", zt) == layout, "divergence_rows: zt must have the memory layout of zs (strides ",
              zs.strides(), "), got strides ", zt.strides());
  TORCH_CHECK(zt.sizes() == zs.sizes(), "divergence_rows: zt must have the shape of zs ", zs.sizes(), ", got ",
              zt.sizes());
  TORCH_CHECK(zt.scalar_type() == zs.scalar_type(), "divergence_rows: zt must have the dtype of zs (",
              zs.scalar_type(), "), got ", zt.scalar_type());
  TORCH_CHECK(zs.numel() == 0 || zs.data_ptr() != zt.data_ptr(),
              "divergence_rows: zs and zt must be distinct buffers (both are overwritten in place)");
  TORCH_CHECK(kind >= REVERSE_KL && kind <= SKEW_REVERSE_KL, "divergence_rows: kind must be in [0, 5] ",
              "(reverse_kl, forward_kl, jsd, tvd, skew_forward_kl, skew_reverse_kl), got ", kind);
  common::check_scalars("divergence_rows", "temperature_s", temperature_s, "softcap_s", softcap_s);
  common::check_scalars("divergence_rows", "temperature_t", temperature_t, "softcap_t", softcap_t);
  TORCH_CHECK(!std::isnan(log_w) && log_w <= 0 && !std::isnan(log_1mw) && log_1mw <= 0,
              "divergence_rows: log_w and log_1mw must be logs of weights in [0, 1] (LOG_ZERO for 0), got ", log_w,
              " and ", log_1mw);
  const int64_t C = zs.size(0), V = zs.size(1);
  at::Tensor rg;
  if (grad_s || grad_t) {
    TORCH_CHECK(row_grad.has_value() && row_grad->defined(),
                "divergence_rows: row_grad [C] is required when grad_s or grad_t is set");
    TORCH_CHECK(row_grad->dim() == 1 && row_grad->size(0) == C, "divergence_rows: row_grad must have shape [",
                C, "] (one entry per row of zs), got ", row_grad->sizes());
    TORCH_CHECK(row_grad->device().is_cpu() && at::isFloatingType(row_grad->scalar_type()),
                "divergence_rows: row_grad must be a floating-point CPU tensor, got ", row_grad->scalar_type(),
                " on ", row_grad->device());
    rg = row_grad->to(zs.scalar_type()).contiguous();
  }
  auto loss = at::empty({C}, zs.options());
  auto stats = at::empty({C, 6}, zs.options());
  if (C == 0) return {loss, stats};

  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "minillm_fast_native::divergence_rows", [&] {
    using T = scalar_t;
    const Consts<T> k(temperature_s, softcap_s, temperature_t, softcap_t, log_w, log_1mw);
    T* ps = zs.data_ptr<T>();
    T* pt = zt.data_ptr<T>();
    const T* prg = rg.defined() ? rg.data_ptr<T>() : nullptr;
    T* pl = loss.data_ptr<T>();
    T* pst = stats.data_ptr<T>();
    const T inv_t_s = k.s.inv_t, inv_t_t = k.t.inv_t;  // each model's gradient scale row_grad / T
    if (layout == Layout::kColumns) {
      // Groups of W rows (the vector width) are the unit of work; a task gets at least ~32k entries.
      constexpr int64_t W = Vectorized<T>::size();
      std::vector<T> scale_s, scale_t;
      if (prg) {
        scale_s.resize(C);
        scale_t.resize(C);
        for (int64_t r = 0; r < C; ++r) {
          scale_s[r] = prg[r] * inv_t_s;
          scale_t[r] = prg[r] * inv_t_t;
        }
      }
      const int64_t groups = (C + W - 1) / W;
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (W * V));
      at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
        divergence_cols<T>(kind, ps, pt, zs.stride(1), zt.stride(1), V, g0 * W, std::min(C, g1 * W), k,
                           prg ? scale_s.data() : nullptr, prg ? scale_t.data() : nullptr, grad_s, grad_t, pl,
                           pst);
      });
      return;
    }
    const RowFn<T> fn = row_fn<T>(kind);
    const int64_t ld_s = zs.stride(0), ld_t = zt.stride(0);
    // A row is ~10 ns per entry; rows are the unit of work, a task gets at least ~32k entries.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / V);
    at::parallel_for(0, C, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T scale_s = prg ? prg[r] * inv_t_s : T(0), scale_t = prg ? prg[r] * inv_t_t : T(0);
        fn(ps + r * ld_s, pt + r * ld_t, V, k, scale_s, scale_t, grad_s, grad_t, pl + r, pst + 6 * r);
      }
    });
  });
  return {loss, stats};
}

// The instruction set the extension was compiled for (DEFAULT, AVX2, AVX512).
std::string capability() { return MINILLM_STR(CPU_CAPABILITY); }

}  // namespace minillm_fast_native

TORCH_LIBRARY_FRAGMENT(minillm_fast_native, m) {
  m.def("divergence_rows(Tensor(a!) zs, Tensor(b!) zt, Tensor? row_grad, int kind, float log_w, float log_1mw, "
        "float temperature_s, float softcap_s, float temperature_t, float softcap_t, bool grad_s, bool grad_t) "
        "-> (Tensor, Tensor)");
  m.def("capability() -> str", &minillm_fast_native::capability);  // no tensor: one kernel for every backend
}

TORCH_LIBRARY_IMPL(minillm_fast_native, CPU, m) {
  m.impl("divergence_rows", TORCH_FN(minillm_fast_native::divergence_rows));
}

// The extension's Python module: only for loading (every kernel is a torch.library op, see the top of this file).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minillm-fast native (C++) CPU kernels: importing this module registers them as "
            "torch.ops.minillm_fast_native.* (see csrc/fused_divergence_cpu.cpp)";
}
