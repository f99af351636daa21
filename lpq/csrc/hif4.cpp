// HiFloat4 (HiF4) CPU kernels: fake_quant, encode, decode (formats.md §2 with the CUDA-kernel
// semantics of §2.3; lpq/formats/hif4.py is the reference these must match bit for bit, and its
// docstring documents the packed layout and the NaN / Inf conventions).
//
// One 64-block at a time, in a float32 scratch copy (zero-padded past the row end). Every loop
// runs over the 64 elements with no branches so it vectorizes: the group maxima are written
// replicated to each element of their group (max of 4, then of 8), so the micro-exponent tests and
// the element rounding are plain per-element loops. Maxima are taken on |x| bit patterns: for
// non-negative floats unsigned order is float order and a NaN sorts above Inf, so the block
// maximum also tells whether the block holds a NaN. Only the block scale is scalar code.
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
constexpr int64_t kGrainBlocks = 256;
constexpr float kInv7 = 0.142578125f;     // bf16(1/7), the toolkit's constant
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kSignBit = 0x80000000u;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kScaleMinBits = 0x27800000u;  // 2^-48
constexpr uint32_t kScaleMaxBits = 0x47400000u;  // 49152 = 1.5 * 2^15
constexpr uint32_t kEightBits = 0x41000000u;     // 8.0f
constexpr uint8_t kNanCode = 0xFF;

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// 2^e for -126 <= e <= 127, built from the exponent field.
inline float pow2(int32_t e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

// Round a non-NaN float32 to bfloat16 bits, nearest even (a quiet NaN stays a quiet NaN).
inline uint16_t bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_round(float f) { return bits_float(static_cast<uint32_t>(bf16_bits(f)) << 16); }

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

// One block's scale and, for every element, the maxima of its groups (as |x| bit patterns).
struct Block {
  bool nan;
  uint8_t code;
  float S;
  float R;
  alignas(64) uint32_t c4[kBlock];  // max |x| of the element's group of 4 (C_j)
  alignas(64) uint32_t c8[kBlock];  // max |x| of the element's group of 8 (B_g)
};

template <typename T>
inline void load_block(const T* src, int64_t n, float* xs) {
  if (n == kBlock) {
    for (int i = 0; i < kBlock; ++i) xs[i] = static_cast<float>(src[i]);
  } else {
    for (int i = 0; i < kBlock; ++i) xs[i] = i < n ? static_cast<float>(src[i]) : 0.0f;
  }
}

inline uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// formats.md §2.2 steps 1-4 for the block in xs.
inline void block_scale(const float* xs, Block& b) {
  alignas(64) uint32_t ab[kBlock];
  uint32_t* c4 = b.c4;
  uint32_t* c8 = b.c8;
  for (int i = 0; i < kBlock; ++i) ab[i] = float_bits(xs[i]) & kAbsMask;
  for (int j = 0; j < kBlock; j += 4) {
    const uint32_t m = umax(umax(ab[j], ab[j + 1]), umax(ab[j + 2], ab[j + 3]));
    c4[j] = c4[j + 1] = c4[j + 2] = c4[j + 3] = m;
  }
  for (int g = 0; g < kBlock; g += 8) {
    for (int q = 0; q < 4; ++q) c8[g + q] = c8[g + 4 + q] = umax(c4[g + q], c4[g + 4 + q]);
  }
  uint32_t A = 0;
  for (int i = 0; i < kBlock; ++i) A = umax(A, ab[i]);
  b.nan = A > kInfBits;
  if (b.nan) {
    b.code = kNanCode;
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

// Steps 5-6 for element i: E1_8 of its group of 8, E1_16 of its group of 4. The spec's test
// fp32(C * R) / 2^E1_8 >= 2 is written as fp32(C * R) >= 2^(E1_8 + 1): halving is exact for
// normal numbers, and a subnormal product fails both forms.
inline int32_t e1_8_of(const Block& b, int i) { return bits_float(b.c8[i]) * b.R >= 4.0f; }
inline int32_t e1_16_of(const Block& b, int i, int32_t e8) { return bits_float(b.c4[i]) * b.R >= pow2(e8 + 1); }

// Step 7: k = floor(t + 0.5) exactly, saturated to 7. t is clamped to 8 first so Inf gives 7
// (on the bit pattern: t >= 0, and an integer select vectorizes where a float one does not); the
// fraction t - trunc(t) is exact in float32, so comparing it with 0.5 is the exact rounding.
// |x| * 2^-d equals fp32(|x| / 2^d): both are the correctly rounded value of the same number.
inline int32_t element_k(float x, int32_t d, float R) {
  const uint32_t tb = float_bits(((std::fabs(x) * pow2(-d)) * R) * 4.0f);
  const float t = bits_float(tb < kEightBits ? tb : kEightBits);
  int32_t k = static_cast<int32_t>(t);
  k += (t - static_cast<float>(k)) >= 0.5f;
  return k < 7 ? k : 7;
}

// Value of k with micro-exponent d under scale S: (k/4) * 2^d * S, exact in float32.
inline float element_value(int32_t k, int32_t d, float S) {
  return static_cast<float>(k) * (S * pow2(d - 2));
}

template <typename T>
inline void store_block(const float* ys, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(ys[i]);
}

// c10's float -> bfloat16 conversion checks for NaN with a branch; this one is branch-free and
// gives the same bits for every value fake_quant produces (our only NaN is the quiet NaN).
template <>
inline void store_block<c10::BFloat16>(const float* ys, int64_t n, c10::BFloat16* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(bf16_bits(ys[i]), c10::BFloat16::from_bits());
}

template <typename T>
void fake_quant_rows(const T* x, T* y, int64_t rows, int64_t L) {
  const int64_t nblk = (L + kBlock - 1) / kBlock;
  if (nblk == 0) return;
  at::parallel_for(0, rows * nblk, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) float xs[kBlock];
    alignas(64) float ys[kBlock];
    Block b;
    int64_t r = begin / nblk, bi = begin % nblk;  // row and block of blk, stepped without dividing
    for (int64_t blk = begin; blk < end; ++blk, ++bi) {
      if (bi == nblk) {
        bi = 0;
        ++r;
      }
      const int64_t off = bi * kBlock;
      const int64_t n = L - off < kBlock ? L - off : kBlock;
      load_block(x + r * L + off, n, xs);
      block_scale(xs, b);
      if (b.nan) {
        for (int i = 0; i < kBlock; ++i) ys[i] = std::numeric_limits<float>::quiet_NaN();
      } else {
        for (int i = 0; i < kBlock; ++i) {
          const int32_t e8 = e1_8_of(b, i);
          const int32_t d = e8 + e1_16_of(b, i, e8);
          const float v = element_value(element_k(xs[i], d, b.R), d, b.S);
          ys[i] = bits_float(float_bits(v) | (float_bits(xs[i]) & kSignBit));
        }
      }
      store_block(ys, n, y + r * L + off);
    }
  });
}

template <typename T>
void encode_rows(const T* x, uint8_t* codes, uint8_t* scales, int64_t rows, int64_t L) {
  const int64_t nblk = (L + kBlock - 1) / kBlock;
  if (nblk == 0) return;
  at::parallel_for(0, rows * nblk, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) float xs[kBlock];
    alignas(64) uint8_t nib[kBlock];
    alignas(64) int32_t e1_8[kBlock];
    alignas(64) int32_t e1_16[kBlock];
    Block b;
    int64_t r = begin / nblk, bi = begin % nblk;  // row and block of blk, stepped without dividing
    for (int64_t blk = begin; blk < end; ++blk, ++bi) {
      if (bi == nblk) {
        bi = 0;
        ++r;
      }
      const int64_t off = bi * kBlock;
      const int64_t n = L - off < kBlock ? L - off : kBlock;
      load_block(x + r * L + off, n, xs);
      block_scale(xs, b);
      // blk = r * nblk + block index: the block's codes start at blk * 32, its scales at blk * 4.
      uint8_t* c = codes + blk * (kBlock / 2);
      uint8_t* s = scales + blk * 4;
      if (b.nan) {  // canonical NaN block: scale 0xFF, E1 bits and nibbles 0
        std::memset(c, 0, kBlock / 2);
        s[0] = kNanCode;
        s[1] = s[2] = s[3] = 0;
        continue;
      }
      for (int i = 0; i < kBlock; ++i) {
        const int32_t e8 = e1_8_of(b, i);
        e1_8[i] = e8;
        e1_16[i] = e1_16_of(b, i, e8);
        const uint32_t k = static_cast<uint32_t>(element_k(xs[i], e8 + e1_16[i], b.R));
        nib[i] = static_cast<uint8_t>(((float_bits(xs[i]) >> 28) & 8u) | k);
      }
      for (int i = 0; i < kBlock / 2; ++i) c[i] = static_cast<uint8_t>(nib[2 * i] | (nib[2 * i + 1] << 4));
      uint32_t e8 = 0, e16 = 0;
      for (int g = 0; g < 8; ++g) e8 |= static_cast<uint32_t>(e1_8[8 * g]) << g;
      for (int j = 0; j < 16; ++j) e16 |= static_cast<uint32_t>(e1_16[4 * j]) << j;
      s[0] = b.code;
      s[1] = static_cast<uint8_t>(e8);
      s[2] = static_cast<uint8_t>(e16 & 0xFF);
      s[3] = static_cast<uint8_t>(e16 >> 8);
    }
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
  TORCH_CHECK(!tensor_scale.has_value() || !tensor_scale->defined(), "hif4 decode: hif4 has no tensor scale; got one");
  TORCH_CHECK(scales.has_value() && scales->defined(), "hif4 decode: the block scales are required; got None");
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
    alignas(64) int32_t nib[kBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      // blk = r * nblk + block index: codes start at blk * 32, scales at blk * 4, values at blk * 64.
      const uint8_t* s = sp + blk * 4;
      const uint8_t* c = cp + blk * (kBlock / 2);
      float* y = yp + blk * kBlock;
      if (s[0] == kNanCode) {
        for (int i = 0; i < kBlock; ++i) y[i] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float S = kTables.S[s[0]];
      const uint32_t e8 = s[1], e16 = s[2] | (static_cast<uint32_t>(s[3]) << 8);
      for (int i = 0; i < kBlock / 2; ++i) {
        nib[2 * i] = c[i] & 0xF;
        nib[2 * i + 1] = c[i] >> 4;
      }
      for (int i = 0; i < kBlock; ++i) {
        const int32_t d = static_cast<int32_t>(((e8 >> (i >> 3)) & 1u) + ((e16 >> (i >> 2)) & 1u));
        const float v = element_value(nib[i] & 7, d, S);
        y[i] = bits_float(float_bits(v) | (static_cast<uint32_t>(nib[i] & 8) << 28));
      }
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
