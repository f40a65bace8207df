// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the generator of Random123,
// cuRAND and Triton's tl.philox): a counter-based generator, four 32-bit words out of a 128-bit counter and a 64-bit
// key. The output depends only on (key, counter), so a draw is fixed by (seed, row) whatever thread computes it, in
// whatever order. Header-only and free of torch, so that it can be checked against Random123's known-answer vectors
// on its own (tests/test_native_ops.py does, through the extension).
#pragma once

#include <array>
#include <cstdint>

namespace minillm_fast_native {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt(3) - 1)

inline std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0, static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1, static_cast<uint32_t>(p0)};
  }
  return c;
}

// Uniform double in [0, 1) from the top 53 bits of (hi, lo): every value is a multiple of 2^-53.
inline double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// The two uniforms of one row: counter (row low, row high, stream, 0), key = the 64-bit seed.
struct RowUniforms {
  double coin;  // the mixture's component coin
  double u;     // the inverse-CDF position within the chosen component
};

inline RowUniforms row_uniforms(uint64_t seed, uint64_t row, uint32_t stream = 0) {
  const auto r = philox4x32_10({static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), stream, 0u},
                               static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return {uniform53(r[0], r[1]), uniform53(r[2], r[3])};
}

}  // namespace philox
}  // namespace minillm_fast_native
