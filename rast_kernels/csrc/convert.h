// Widening of bf16 / fp16 / fp32 rows to float32. Exact (every bf16 and fp16 value is a float32 value),
// branchless so the loops vectorise, and independent of F16C so the library runs on any x86-64 or ARM.
#pragma once

#include <cstdint>
#include <cstring>

#include "rast_native.h"

namespace rast {

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// fp16 -> fp32: shifting the exponent+mantissa into place and multiplying by 2^112 rebiases the exponent
// (15 -> 127) and turns fp16 subnormals into exact float32 normals; inf/NaN keep an all-ones exponent.
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t finite = float_to_bits(bits_to_float(em << 13) * 0x1p112f);
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7c00u);  // all-ones mask, no branch
  return bits_to_float(((finite & ~is_special) | (special & is_special)) | sign);
}

// dst[0:n] = float32(src[0:n]); src points at the first element of the chunk.
inline void widen(const void* src, int32_t dtype, int64_t n, float* __restrict dst) {
  if (dtype == RAST_F32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else if (dtype == RAST_BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(s[i]);
  }
}

inline int64_t dtype_size(int32_t dtype) { return dtype == RAST_F32 ? 4 : 2; }

}  // namespace rast
