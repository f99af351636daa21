// HiFloat4 (HiF4) CPU kernels: fake_quant, encode, decode (formats.md §2 with the CUDA-kernel
// semantics of §2.3; lpq/formats/hif4.py is the reference these must match bit for bit, and its
// docstring documents the packed layout and the NaN / Inf conventions).
//
// A 64-block is held as four 16-lane vectors (GCC/Clang vector extensions: one AVX-512 register
// each here; on other targets the compiler splits or scalarizes them, with the same results). The
// group maxima are formed with in-register shuffles and kept replicated on every lane of their
// group, so the micro-exponent tests and the element rounding are plain lane-wise operations.
// Maxima are taken on |x| bit patterns: for non-negative floats unsigned order is float order and
// a NaN sorts above Inf, so the block maximum also tells whether the block holds a NaN. Only the
// block scale is scalar code.
#include "bits.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int kBlock = 64;
constexpr int kLanes = 16;
constexpr int kVecs = kBlock / kLanes;
constexpr int64_t kGrainBlocks = 256;
constexpr int kBatch = 4;
constexpr float kInv7 = 0.142578125f;     // bf16(1/7), the toolkit's constant
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kSignBit = 0x80000000u;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kScaleMinBits = 0x27800000u;  // 2^-48
constexpr uint32_t kScaleMaxBits = 0x47400000u;  // 49152 = 1.5 * 2^15
constexpr uint32_t kSevenBits = 0x40E00000u;     // 7.0f
constexpr uint8_t kNanCode = 0xFF;

// 16 lanes of 32 bits, one per element of a quarter block
typedef float VecF __attribute__((vector_size(64)));
typedef uint32_t VecU __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));      // also the type of comparison masks
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef uint8_t U8x8 __attribute__((vector_size(8)));
typedef uint8_t U8x16 __attribute__((vector_size(16)));

// Round a non-NaN float32 to bfloat16 bits, nearest even (a quiet NaN stays a quiet NaN).
inline uint16_t bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_round(float f) { return bits_float(static_cast<uint32_t>(bf16_bits(f)) << 16); }

// Lane-wise 2^e for -126 <= e <= 127, built from the exponent field (vector casts are bit casts).
inline VecF pow2(VecI e) { return (VecF)((VecU)(e + 127) << 23); }

inline VecU umax(VecU a, VecU b) { return a > b ? a : b; }

template <typename V, typename S>
inline V splat(S v) { return V{} + v; }

// S and R = bf16(fp32(1/S)) for every E6M2 code; code 0xFF is NaN.
struct ScaleTables {
  float S[256];
  float R[256];
  ScaleTables() {
    for (int c = 0; c < 256; ++c) {
      S[c] = std::ldexp(1.0f + static_cast<float>(c & 3) / 4.0f, (c >> 2) - 48);
      R[c] = bf16_round(1.0f / S[c]);
    }
    S[kNanCode] = R[kNanCode] = std::numeric_limits<float>::quiet_NaN();
  }
};

const ScaleTables kTables;

// Per lane of a 16-lane vector: nibble position in its code byte, group of 8 and group of 4.
const VecU kNibbleShift = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
const VecU kGroupOf8 = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
const VecU kGroupOf4 = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};

// One block: its values, the maxima of every element's groups, and its scale.
struct Block {
  VecF x[kVecs];
  VecU c4[kVecs];  // max |x| of the element's group of 4 (C_j), as a bit pattern
  VecU c8[kVecs];  // max |x| of the element's group of 8 (B_g), as a bit pattern
  bool nan;
  uint8_t code;
  float S;
  float R;
};

// Loads the 64 values at src (n < 64: zero-padded past n) as float32.
template <typename T>
inline void load_block(const T* src, int64_t n, Block& b) {
  alignas(64) float buf[kBlock];
  for (int i = 0; i < kBlock; ++i) buf[i] = i < n ? static_cast<float>(src[i]) : 0.0f;
  std::memcpy(b.x, buf, sizeof buf);
}

template <>
inline void load_block<float>(const float* src, int64_t n, Block& b) {
  if (n < kBlock) {
    std::memset(b.x, 0, sizeof b.x);
    std::memcpy(b.x, src, n * sizeof(float));
  } else {
    std::memcpy(b.x, src, sizeof b.x);
  }
}

template <>
inline void load_block<c10::BFloat16>(const c10::BFloat16* src, int64_t n, Block& b) {
  alignas(64) uint16_t buf[kBlock];
  const void* from = src;
  if (n < kBlock) {
    std::memset(buf, 0, sizeof buf);
    std::memcpy(buf, src, n * sizeof(uint16_t));
    from = buf;
  }
  for (int q = 0; q < kVecs; ++q) {
    U16x16 h;
    std::memcpy(&h, static_cast<const uint16_t*>(from) + q * kLanes, sizeof h);
    b.x[q] = (VecF)(__builtin_convertvector(h, VecU) << 16);
  }
}

// formats.md §2.2 steps 1-4 for the block in b.x.
inline void block_scale(Block& b) {
  VecU all = {};
  for (int q = 0; q < kVecs; ++q) {
    const VecU a = (VecU)b.x[q] & kAbsMask;
    VecU m = umax(a, __builtin_shufflevector(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    m = umax(m, __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    b.c4[q] = m;
    b.c8[q] = umax(m, __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    all = umax(all, b.c8[q]);
  }
  const uint32_t A = all[0] > all[8] ? all[0] : all[8];
  b.nan = A > kInfBits;
  if (b.nan) {
    b.code = kNanCode;
    b.S = b.R = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  // S0 = bf16(fp32(A * c)) clamped to [2^-48, 49152]; on bit patterns since it is positive.
  uint32_t s0 = float_bits(bf16_round(bits_float(A) * kInv7));
  s0 = s0 < kScaleMinBits ? kScaleMinBits : (s0 > kScaleMaxBits ? kScaleMaxBits : s0);
  // E6M2: keep 2 mantissa bits, round half to even; a carry moves into the exponent field.
  s0 = (s0 + 0xFFFFFu + ((s0 >> 21) & 1u)) & ~0x1FFFFFu;
  const int E = static_cast<int>(s0 >> 23) - 127;
  b.code = static_cast<uint8_t>(((E + 48) << 2) | ((s0 >> 21) & 3u));
  b.S = kTables.S[b.code];
  b.R = kTables.R[b.code];
}

// Steps 5-7 for the 16 lanes of vector q: E1_8 and E1_16 of each lane's groups (as 0/1) and k.
//
// * The spec's test fp32(C * R) / 2^E1_8 >= 2 is written fp32(C * R) >= 2^(E1_8 + 1): halving
//   is exact for normal numbers, and a subnormal product fails both forms.
// * |x| * 2^-d equals fp32(|x| / 2^d): both are the correctly rounded value of the same number.
// * k = min(floor(t + 0.5), 7), exactly. Clamping t to 7 first (on its bit pattern: t >= 0, and
//   Inf clamps too) gives the saturation. Below 0.5 the answer is 0. From 0.5 up, the float32 sum
//   t + 0.5 is exact while it stays in t's binade (both terms are multiples of ulp(t)); when it
//   moves up into [2^e, 2^e + 0.5), 2^e >= 1 an integer, it is rounded by at most ulp(t) <= 2^-21,
//   which can neither reach 2^e + 1 nor drop below 2^e. So truncating it is exact, and only
//   t < 0.5 needs the select (the fp32 trap: t = 0.5 - 2^-25 would round up to 1).
inline VecI quantize_lanes(const Block& b, int q, VecI& e8, VecI& e16) {
  e8 = -((VecF)b.c8[q] * b.R >= 4.0f);  // comparisons give -1 / 0
  e16 = -((VecF)b.c4[q] * b.R >= pow2(e8 + 1));
  const VecI d = e8 + e16;
  const VecU tb = (VecU)((((VecF)((VecU)b.x[q] & kAbsMask) * pow2(-d)) * b.R) * 4.0f);
  const VecF t = (VecF)(tb < kSevenBits ? tb : splat<VecU>(kSevenBits));
  const VecI k = __builtin_convertvector(t + 0.5f, VecI);
  return t < 0.5f ? VecI{} : k;
}

// (k/4) * 2^d * S with the sign of x: exact in float32.
inline VecF element_value(VecI k, VecI d, float S, VecF x) {
  const VecF v = __builtin_convertvector(k, VecF) * (S * pow2(d - 2));
  return (VecF)((VecU)v | ((VecU)x & kSignBit));
}

template <typename T>
inline void store_block(const VecF* y, int64_t n, T* dst) {
  alignas(64) float buf[kBlock];
  std::memcpy(buf, y, sizeof buf);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
}

template <>
inline void store_block<float>(const VecF* y, int64_t n, float* dst) {
  if (n == kBlock) {
    std::memcpy(dst, y, kBlock * sizeof(float));  // a constant size: inlined as vector stores
  } else {
    std::memcpy(dst, y, n * sizeof(float));
  }
}

// Round to nearest even on the bit pattern; fake_quant's only NaN is the quiet NaN, which this
// keeps quiet, so the bits equal c10's conversion.
template <>
inline void store_block<c10::BFloat16>(const VecF* y, int64_t n, c10::BFloat16* dst) {
  alignas(64) uint16_t buf[kBlock];
  for (int q = 0; q < kVecs; ++q) {
    const VecU u = (VecU)y[q];
    const U16x16 h = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, U16x16);
    std::memcpy(buf + q * kLanes, &h, sizeof h);
  }
  if (n == kBlock) {
    std::memcpy(dst, buf, sizeof buf);
  } else {
    std::memcpy(dst, buf, n * sizeof(uint16_t));
  }
}

// Calls f(block, blk, pos, n) for the blocks [begin, end) of a (rows, L) tensor x split into
// nblk blocks per row: blk = row * nblk + block index, pos = offset of the block in x, n = its
// valid length (< 64 for a row's tail). The blocks are loaded and scaled in batches first: their
// scales are independent scalar dependency chains that the CPU overlaps, where one block at a
// time would wait for each chain in turn.
template <typename T, typename F>
inline void for_scaled_blocks(const T* x, int64_t L, int64_t nblk, int64_t begin, int64_t end, F f) {
  Block b[kBatch];
  int64_t blks[kBatch], pos[kBatch], len[kBatch];
  int cnt = 0;
  int64_t r = begin / nblk, bi = begin % nblk;  // stepped, not divided, per block
  for (int64_t blk = begin; blk < end; ++blk, ++bi) {
    if (bi == nblk) {
      bi = 0;
      ++r;
    }
    const int64_t off = bi * kBlock;
    blks[cnt] = blk;
    pos[cnt] = r * L + off;
    len[cnt] = L - off < kBlock ? L - off : kBlock;
    load_block(x + pos[cnt], len[cnt], b[cnt]);
    block_scale(b[cnt]);
    if (++cnt == kBatch || blk + 1 == end) {
      for (int j = 0; j < cnt; ++j) f(b[j], blks[j], pos[j], len[j]);
      cnt = 0;
    }
  }
}

template <typename T>
void fake_quant_rows(const T* x, T* y, int64_t rows, int64_t L) {
  const int64_t nblk = (L + kBlock - 1) / kBlock;
  if (nblk == 0) return;
  at::parallel_for(0, rows * nblk, kGrainBlocks, [&](int64_t begin, int64_t end) {
    for_scaled_blocks(x, L, nblk, begin, end, [&](const Block& b, int64_t, int64_t pos, int64_t n) {
      VecF out[kVecs];
      for (int q = 0; q < kVecs; ++q) {
        if (b.nan) {
          out[q] = splat<VecF>(std::numeric_limits<float>::quiet_NaN());
        } else {
          VecI e8, e16;
          const VecI k = quantize_lanes(b, q, e8, e16);
          out[q] = element_value(k, e8 + e16, b.S, b.x[q]);
        }
      }
      store_block(out, n, y + pos);
    });
  });
}

template <typename T>
void encode_rows(const T* x, uint8_t* codes, uint8_t* scales, int64_t rows, int64_t L) {
  const int64_t nblk = (L + kBlock - 1) / kBlock;
  if (nblk == 0) return;
  at::parallel_for(0, rows * nblk, kGrainBlocks, [&](int64_t begin, int64_t end) {
    for_scaled_blocks(x, L, nblk, begin, end, [&](const Block& b, int64_t blk, int64_t, int64_t) {
      uint8_t* c = codes + blk * (kBlock / 2);
      uint8_t* s = scales + blk * 4;
      if (b.nan) {  // canonical NaN block: scale 0xFF, E1 bits and nibbles 0
        std::memset(c, 0, kBlock / 2);
        s[0] = kNanCode;
        s[1] = s[2] = s[3] = 0;
        return;
      }
      uint32_t e1_8 = 0, e1_16 = 0;
      for (int q = 0; q < kVecs; ++q) {
        VecI e8, e16;
        const VecU nib = (VecU)quantize_lanes(b, q, e8, e16) | (((VecU)b.x[q] >> 28) & 8u);
        // element 2i in the low nibble, 2i + 1 in the high nibble
        const U32x8 lo = __builtin_shufflevector(nib, nib, 0, 2, 4, 6, 8, 10, 12, 14);
        const U32x8 hi = __builtin_shufflevector(nib, nib, 1, 3, 5, 7, 9, 11, 13, 15);
        const U8x8 packed = __builtin_convertvector(lo | (hi << 4), U8x8);
        std::memcpy(c + q * kLanes / 2, &packed, sizeof packed);
        // lane 0 / 8 of vector q is in group of 8 number 2q / 2q + 1; lanes 0, 4, 8, 12 likewise
        e1_8 |= static_cast<uint32_t>(e8[0] | (e8[8] << 1)) << (2 * q);
        e1_16 |= static_cast<uint32_t>(e16[0] | (e16[4] << 1) | (e16[8] << 2) | (e16[12] << 3)) << (4 * q);
      }
      s[0] = b.code;
      s[1] = static_cast<uint8_t>(e1_8);
      s[2] = static_cast<uint8_t>(e1_16 & 0xFF);
      s[3] = static_cast<uint8_t>(e1_16 >> 8);
    });
  });
}

void check_fmt(const std::string& fmt) {
  TORCH_CHECK(fmt == "hif4", "hif4 kernel got format '", fmt, "'; it implements only 'hif4'");
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "hif4 kernel: expected a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "hif4 kernel: expected a 2-D (rows, L) tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(), "hif4 kernel: expected a contiguous tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "hif4 kernel: expected float32, bfloat16 or float16, got ", dt);
}

}  // namespace

torch::Tensor fake_quant(torch::Tensor x, std::string fmt, torch::Tensor out) {
  check_fmt(fmt);
  check_input(x);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.device().is_cpu(),
              "hif4 fake_quant: out must be a contiguous CPU tensor with x's shape and dtype");
  const int64_t rows = x.size(0), L = x.size(1);
  switch (x.scalar_type()) {
    case at::kFloat:
      fake_quant_rows(x.data_ptr<float>(), out.data_ptr<float>(), rows, L);
      break;
    case at::kBFloat16:
      fake_quant_rows(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, L);
      break;
    default:
      fake_quant_rows(x.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, L);
  }
  return out;
}

std::vector<torch::Tensor> encode(torch::Tensor x, std::string fmt) {
  check_fmt(fmt);
  check_input(x);
  const int64_t rows = x.size(0), L = x.size(1);
  const int64_t nblk = (L + kBlock - 1) / kBlock;
  auto u8 = torch::TensorOptions().dtype(torch::kUInt8);
  torch::Tensor codes = torch::empty({rows, nblk * kBlock / 2}, u8);
  torch::Tensor scales = torch::empty({rows, nblk, 4}, u8);
  uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* s = scales.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case at::kFloat:
      encode_rows(x.data_ptr<float>(), c, s, rows, L);
      break;
    case at::kBFloat16:
      encode_rows(x.data_ptr<c10::BFloat16>(), c, s, rows, L);
      break;
    default:
      encode_rows(x.data_ptr<c10::Half>(), c, s, rows, L);
  }
  return {codes, scales, torch::Tensor()};
}

torch::Tensor decode(torch::Tensor codes, c10::optional<torch::Tensor> scales,
                     c10::optional<torch::Tensor> tensor_scale, std::string fmt, int64_t Lp) {
  check_fmt(fmt);
  TORCH_CHECK(!tensor_scale.has_value() || !tensor_scale->defined(),
              "hif4 decode: hif4 has no tensor scale; got one");
  TORCH_CHECK(scales.has_value() && scales->defined(),
              "hif4 decode: the block scales are required; got None");
  TORCH_CHECK(codes.device().is_cpu() && scales->device().is_cpu(), "hif4 decode: expected CPU tensors");
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales->scalar_type() == at::kByte,
              "hif4 decode: codes and scales must be uint8, got ", codes.scalar_type(), " and ",
              scales->scalar_type());
  TORCH_CHECK(Lp >= 0 && Lp % kBlock == 0, "hif4 decode: Lp=", Lp, " is not a multiple of ", kBlock);
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == Lp / 2, "hif4 decode: codes must be (rows, ", Lp / 2,
              ") for Lp=", Lp, ", got ", codes.sizes());
  const int64_t rows = codes.size(0), nblk = Lp / kBlock;
  TORCH_CHECK(scales->dim() == 3 && scales->size(0) == rows && scales->size(1) == nblk && scales->size(2) == 4,
              "hif4 decode: scales must be (", rows, ", ", nblk, ", 4), got ", scales->sizes());
  const torch::Tensor cc = codes.contiguous(), sc = scales->contiguous();
  torch::Tensor out = torch::empty({rows, Lp}, torch::TensorOptions().dtype(torch::kFloat));
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, rows * nblk, kGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      // blk = r * nblk + block index: codes start at blk * 32, scales at blk * 4, values at blk * 64.
      const uint8_t* s = sp + blk * 4;
      const uint8_t* c = cp + blk * (kBlock / 2);
      const float S = kTables.S[s[0]];  // NaN for 0xFF: the whole block decodes to NaN
      const uint32_t e1_8 = s[1], e1_16 = s[2] | (static_cast<uint32_t>(s[3]) << 8);
      VecF out[kVecs];
      for (int q = 0; q < kVecs; ++q) {
        // lane i of vector q is element 16q + i: byte 8q + i/2, low nibble for even i
        U8x8 bytes;
        std::memcpy(&bytes, c + q * kLanes / 2, sizeof bytes);
        const U8x16 dup = __builtin_shufflevector(bytes, bytes, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        const VecU nib = (__builtin_convertvector(dup, VecU) >> kNibbleShift) & 0xFu;
        const VecU g8 = kGroupOf8 + static_cast<uint32_t>(2 * q), g4 = kGroupOf4 + static_cast<uint32_t>(4 * q);
        const VecU d = ((splat<VecU>(e1_8) >> g8) & 1u) + ((splat<VecU>(e1_16) >> g4) & 1u);
        const VecF v = __builtin_convertvector(nib & 7u, VecF) * (S * pow2((VecI)d - 2));
        out[q] = (VecF)((VecU)v | ((nib & 8u) << 28));
      }
      std::memcpy(yp + blk * kBlock, out, sizeof out);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quant", &fake_quant, "HiF4 quantize-dequantize of a (rows, L) tensor along L",
        py::arg("x"), py::arg("fmt"), py::arg("out"));
  m.def("encode", &encode, "HiF4 codes, scales and tensor scale (None) of a (rows, L) tensor",
        py::arg("x"), py::arg("fmt"));
  m.def("decode", &decode, "float32 (rows, Lp) values of packed HiF4 data", py::arg("codes"),
        py::arg("scales"), py::arg("tensor_scale"), py::arg("fmt"), py::arg("Lp"));
}
