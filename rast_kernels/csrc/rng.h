// Counter-based randomness, bit-identical to rast_kernels/rng.py (the shared spec): the Gumbel noise of
// token i depends only on (seed, offset, i), so a row draws the same token at any position in any batch.
#pragma once

#include <cmath>
#include <cstdint>

namespace rast {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t row_key(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  uint32_t k = mix32(static_cast<uint32_t>(s) ^ 0x9E3779B9u);
  k = mix32(k ^ static_cast<uint32_t>(s >> 32));
  k = mix32(k ^ static_cast<uint32_t>(o));
  return mix32(k ^ static_cast<uint32_t>(o >> 32));
}

// Same float32 recipe as rng.py: 23 bits plus the half step are exact in float32, so u is in (0, 1).
inline float token_uniform(uint32_t key, uint32_t i) {
  const uint32_t bits = mix32(mix32(i ^ key) + key);
  return (static_cast<float>(bits >> 9) + 0.5f) * 0x1p-23f;
}

inline float token_gumbel(uint32_t key, uint32_t i) { return -std::log(-std::log(token_uniform(key, i))); }

// Bounds on every token_gumbel value: u runs from 2^-24 to 1 - 2^-24, so g = -log(-log u) lies in about
// [-2.812, 16.636]; used to skip tokens that cannot win the Gumbel-max race without evaluating two
// logarithms for them (a bound below the true maximum skipped tokens the spec could draw).
constexpr float kGumbelLow = -3.0f;
constexpr float kGumbelHighFinite = 17.0f;

}  // namespace rast
