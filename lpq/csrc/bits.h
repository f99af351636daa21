// Bit-level views of float32 shared by the format kernels.
#pragma once

#include <cstdint>
#include <cstring>

// Always inlined: a call left inside an at::parallel_for loop keeps that copy of the loop scalar.
#define LPQ_INLINE inline __attribute__((always_inline))

LPQ_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

LPQ_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
