// Native (C++) row kernel of the rollout sampler, for CPU tensors (minillm_fast/ops/sampling.py, backend "native"):
// one token per row from the mixture  m = alpha p + (1 - alpha) q  (p = softmax(t) the teacher, q = softmax(s) the
// student; s = softcap_s(z_s) / T_s and t = softcap_t(z_t) / T_t, each model its own scaling, minillm_fast/scaling.py),
// with log q(y) and log p(y) of the drawn token. Without a teacher it samples q (the teacher's scaling is ignored).
//
// Exact and by inverse CDF. A draw from a two-component mixture is "pick the component (the teacher with probability
// alpha), then draw from it"; a draw from softmax(x) is the first token y whose cumulative weight
// sum_{v <= y} e^(x_v - m) exceeds u * sum_v e^(x_v - m), u ~ U[0, 1). Per row:
//
//   1. two uniforms from Philox4x32-10 (philox.h) with key = the op's 64-bit seed and counter (row, 0, 0, 0), row the
//      global row index (the chunk's offset plus its row): `coin` < alpha picks the teacher, `u` places the draw.
//      They depend on (seed, row) only, never on the thread count, the chunk size or the other rows.
//   2. the one-model sweep of common::row_lse for each model (its max and log-sum-exp, for log q(y) and log p(y)); the
//      chosen model's sweep also records, per block b of kBlock entries, the running max m_b its exps were taken
//      against and their sum S_b. With M the row max, the block weights w_b = S_b e^(m_b - M) (double) sum to the
//      row's normaliser, so u * sum_b w_b falls in one block, found without a second sweep over the row;
//   3. that block's exps are recomputed (bit for bit those of the sweep) and scanned in order for the token, with the
//      remaining fraction of the block's weight rescaled to the scan's own sum, so that the draw lands on an entry
//      of positive weight whatever the rounding.
//
// Cost: the sampler adds one block (512 exps) to the statistics sweep; the draw's resolution is 2^-53 and its
// probabilities are those of the float32 (float64) exps, i.e. exact to the rounding of the logits. Padded head rows
// are not in the chunk (the caller's matmul covers the first vocab_size rows only), so they are never drawn. A row
// with NaN logits gives token 0 and NaN log-probs.

#include "native_common.h"
#include "philox.h"

#include <tuple>
#include <vector>

namespace minillm_fast_native {
namespace {

using at::vec::Vectorized;
using namespace common;

constexpr const char* kSample = "mixture_sample_rows";

struct Block {
  int64_t b0, b1;
  double m;  // the running max the block's exps were taken against
  double w;  // their sum S_b, then the block weight S_b e^(m_b - M)
};

// The token of x[0, V) at uniform u, from the blocks recorded by the sweep (row max `row_max`).
template <typename T>
int64_t draw_token(const T* x, const Scale<T>& k, std::vector<Block>& blocks, double row_max, double u) {
  using Vec = Vectorized<T>;
  double total = 0.0;
  for (Block& b : blocks) {
    b.w *= std::exp(b.m - row_max);
    total += b.w;
  }
  if (!(total > 0.0) || !std::isfinite(total)) return 0;  // NaN logits
  const double target = u * total;
  double cum = 0.0;
  const Block* hit = nullptr;  // total > 0: some block has a positive weight
  bool found = false;
  for (const Block& b : blocks) {
    if (b.w <= 0.0) continue;
    hit = &b;
    if (cum + b.w > target) {
      found = true;
      break;
    }
    cum += b.w;
  }
  // the fraction of the hit block's weight below the target, in [0, 1); should u * total round up to total, the
  // draw is the last entry of positive weight
  double frac = found ? (target - cum) / hit->w : 1.0;
  frac = std::min(std::max(frac, 0.0), std::nextafter(1.0, 0.0));

  // the block's exps, as the sweep computed them
  T e[kBlock];
  const Vec mult(k.mult), vm(static_cast<T>(hit->m)), sentinel(static_cast<T>(kLogZero));
  for_vecs<T>(hit->b0, hit->b1, [&](auto tail, int64_t j, int64_t n) {
    using Tail = decltype(tail);
    const Vec d = keep<T, Tail>(load<T, Tail>(x + j, n) * mult, sentinel, n) - vm;
    store<T, Tail>(e + (j - hit->b0), d.exp(), n);
  });
  const int64_t n = hit->b1 - hit->b0;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(e[i]);
  const double local = frac * sum;
  double c = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!(e[i] > T(0))) continue;
    last = i;
    c += static_cast<double>(e[i]);
    if (c > local) return hit->b0 + i;
  }
  return hit->b0 + last;
}

// zs: [C, V] raw chunk logits of the student, zt: the teacher's or None (each overwritten under its model's softcap);
// seed: [1] int64 (the Philox key); row_offset: global index of the chunk's first row (the Philox counter);
// temperature_s, softcap_s: the student's effective temperature and softcap (0: none), temperature_t, softcap_t the
// teacher's (ignored, not checked, without a teacher). Returns tokens [C] int64, log q(y) [C] and log p(y) [C] ([0]
// without a teacher) in the logits' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_sample_rows(const at::Tensor& zs,
                                                                   const c10::optional<at::Tensor>& zt,
                                                                   const at::Tensor& seed, int64_t row_offset,
                                                                   double alpha, double temperature_s,
                                                                   double softcap_s, double temperature_t,
                                                                   double softcap_t) {
  check_logits(kSample, "zs", zs);
  const bool teacher = zt.has_value() && zt->defined();
  if (teacher) check_same_logits(kSample, "zt", *zt, zs);
  check_scalars(kSample, "temperature_s", temperature_s, "softcap_s", softcap_s);
  if (teacher) check_scalars(kSample, "temperature_t", temperature_t, "softcap_t", softcap_t);
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, kSample, ": alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(seed.device().is_cpu() && seed.numel() == 1 && seed.scalar_type() == at::kLong, kSample,
              ": seed must be a CPU int64 tensor of one element, got ", seed.scalar_type(), " ", seed.sizes(), " on ",
              seed.device());
  TORCH_CHECK(row_offset >= 0, kSample, ": row_offset must be >= 0, got ", row_offset);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const int64_t C = zs.size(0), V = zs.size(1);
  auto tokens = at::empty({C}, zs.options().dtype(at::kLong));
  auto lq_y = at::empty({C}, zs.options());
  auto lp_y = at::empty({teacher ? C : 0}, zs.options());
  if (C == 0) return {tokens, lq_y, lp_y};

  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "minillm_fast_native::mixture_sample_rows", [&] {
    using T = scalar_t;
    const Scale<T> ks(temperature_s, softcap_s);
    // without a teacher its scaling is never used (and may be anything): a placeholder
    const Scale<T> kt = teacher ? Scale<T>(temperature_t, softcap_t) : ks;
    T* ps = zs.data_ptr<T>();
    T* pt = teacher ? zt->data_ptr<T>() : nullptr;
    const int64_t ld_s = zs.stride(0), ld_t = teacher ? zt->stride(0) : 0;
    int64_t* ptok = tokens.data_ptr<int64_t>();
    T* plq = lq_y.data_ptr<T>();
    T* plp = teacher ? lp_y.data_ptr<T>() : nullptr;
    at::parallel_for(0, C, row_grain(V), [&](int64_t r0, int64_t r1) {
      std::vector<Block> blocks;
      blocks.reserve((V + kBlock - 1) / kBlock);
      auto record = [&](int64_t b0, int64_t b1, double m, double sum) { blocks.push_back({b0, b1, m, sum}); };
      for (int64_t r = r0; r < r1; ++r) {
        // the coin is drawn with or without a teacher: alpha = 0 draws what the student alone draws (as on triton)
        const philox::RowUniforms rnd = philox::row_uniforms(key, static_cast<uint64_t>(row_offset + r));
        const bool use_t = teacher && rnd.coin < alpha;
        T* xs = ps + r * ld_s;
        T* xt = teacher ? pt + r * ld_t : nullptr;
        blocks.clear();
        const RowLse st_s = use_t ? row_lse<T>(xs, V, ks) : row_lse<T, false>(xs, V, ks, record);
        RowLse st_t{0.0, 0.0, 0.0};
        if (teacher) st_t = use_t ? row_lse<T, false>(xt, V, kt, record) : row_lse<T>(xt, V, kt);
        const int64_t y =
            use_t ? draw_token(xt, kt, blocks, st_t.m, rnd.u) : draw_token(xs, ks, blocks, st_s.m, rnd.u);
        ptok[r] = y;
        plq[r] = static_cast<T>((xs[y] * ks.mult - static_cast<T>(st_s.m)) - std::log(st_s.l));
        if (teacher) plp[r] = static_cast<T>((xt[y] * kt.mult - static_cast<T>(st_t.m)) - std::log(st_t.l));
      }
    });
  });
  return {tokens, lq_y, lp_y};
}

// Philox4x32-10 of philox.h on one counter and key, for the known-answer tests.
std::vector<int64_t> philox4x32_10(at::IntArrayRef counter, at::IntArrayRef key) {
  TORCH_CHECK(counter.size() == 4 && key.size() == 2, "philox4x32_10: counter must have 4 words and key 2, got ",
              counter.size(), " and ", key.size());
  for (const int64_t w : counter) {
    TORCH_CHECK(w >= 0 && w <= 0xFFFFFFFFll, "philox4x32_10: counter words are uint32, got ", w);
  }
  for (const int64_t w : key) {
    TORCH_CHECK(w >= 0 && w <= 0xFFFFFFFFll, "philox4x32_10: key words are uint32, got ", w);
  }
  const auto r = philox::philox4x32_10({static_cast<uint32_t>(counter[0]), static_cast<uint32_t>(counter[1]),
                                        static_cast<uint32_t>(counter[2]), static_cast<uint32_t>(counter[3])},
                                       static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace minillm_fast_native

TORCH_LIBRARY_FRAGMENT(minillm_fast_native, m) {
  m.def("mixture_sample_rows(Tensor(a!) zs, Tensor(b!)? zt, Tensor seed, int row_offset, float alpha, "
        "float temperature_s, float softcap_s, float temperature_t, float softcap_t) -> (Tensor, Tensor, Tensor)");
  m.def("philox4x32_10(int[] counter, int[] key) -> int[]", TORCH_FN(minillm_fast_native::philox4x32_10));
}

TORCH_LIBRARY_IMPL(minillm_fast_native, CPU, m) {
  m.impl("mixture_sample_rows", TORCH_FN(minillm_fast_native::mixture_sample_rows));
}
