// HiFloat8 (HiF8) CPU kernels: fake_quant, encode, decode (formats.md §1; lpq/formats/hif8.py is
// the reference these must match bit for bit).
//
// Quantization works on the fp32 bit pattern: the exponent field gives e = floor(log2|x|) exactly,
// e gives the mantissa width m, and adding half an ulp at width m to the magnitude bits then
// clearing the dropped bits rounds half away from zero (a carry moves into the exponent field,
// which is the right answer: the next binade's first value). Overflow, underflow and NaN are
// selects, so the loops have no branches and vectorize. bf16 is the top half of fp32 and goes
// through the fp32 path; fp16 is rounded on its own bit pattern the same way.
#include "bits.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kOverflowBits = 0x47200000u;   // 40960 = 1.25 * 2^15: at or above -> Inf
constexpr uint32_t kUnderflowBits = 0x34000000u;  // 2^-23: below -> +0
constexpr uint32_t kMinDenormBits = 0x34800000u;  // 2^-22, the smallest nonzero HiF8 value
constexpr uint8_t kNanCode = 0x80;
constexpr uint8_t kPosInfCode = 0x6F;
constexpr int64_t kGrain = 1 << 15;

// The element helpers must inline into every copy of the loops (at::parallel_for has a serial and an
// OpenMP copy); a call left in a loop keeps that copy scalar.
#define HIF8_INLINE inline __attribute__((always_inline))

// HiF8 value of the fp32 number with bit pattern u, as an fp32 bit pattern.
HIF8_INLINE uint32_t quant_bits(uint32_t u) {
  const uint32_t mag = u & kAbsMask;
  const uint32_t sign = u & kSignMask;
  // [2^-23, 2^-22) all become 2^-22 (the spec's e = -23 -> -22); lifting them to 2^-22 first
  // lets the general rounding produce exactly that. Smaller values are zeroed below.
  const uint32_t lifted = mag > kMinDenormBits ? mag : kMinDenormBits;
  const int32_t e = static_cast<int32_t>(lifted >> 23) - 127;
  const int32_t ae = e < 0 ? -e : e;
  // m = 3, 2, 1, 0 mantissa bits for |e| < 4, < 8, < 16, else (the denormals, |e| <= 22 after the
  // lift; larger e overflow below), so drop = 23 - m. Comparisons, not a count of leading zeros:
  // x86 has no vector lzcnt before AVX-512, and a clz keeps the whole loop scalar (measured 10x).
  const uint32_t drop = 20u + static_cast<uint32_t>(ae >= 4) + static_cast<uint32_t>(ae >= 8) +
                        static_cast<uint32_t>(ae >= 16);
  const uint32_t rounded = (lifted + (1u << (drop - 1))) & (~0u << drop);
  uint32_t res = sign | rounded;
  res = mag < kUnderflowBits ? 0u : res;  // +0 even for negative input: HiF8 has no -0
  res = mag >= kOverflowBits ? (sign | kInfBits) : res;
  res = mag > kInfBits ? u : res;  // NaN passes through
  return res;
}

// Bitwise select: GCC will not if-convert a ?: whose arms hold float operations (they might trap),
// so a loop with such a ?: would not vectorize.
HIF8_INLINE uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

HIF8_INLINE uint32_t f16_to_f32_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t special = (em << 13) | kInfBits;  // Inf, and NaN with its payload
  // subnormals and zero are em * 2^-24; (2^23 + em) - 2^23 turns em into a float exactly
  const uint32_t subnormal = float_bits((bits_float(em | 0x4B000000u) - 0x1p23f) * 0x1p-24f);
  return sign | select(em >= 0x7C00u, special, select(em < 0x400u, subnormal, normal));
}

// HiF8 value of the fp16 number with bit pattern h, as an fp16 bit pattern: quant_bits done on the
// fp16 pattern, which saves two conversions. Every HiF8 value is an fp16 value (subnormal below
// 2^-14), and fp16 patterns stay ordered and evenly spaced across the subnormal boundary, so adding
// half an ulp and masking works there too; a subnormal's ulp is set by the position of its leading 1.
HIF8_INLINE uint16_t quant_f16_bits(uint16_t h) {
  const uint32_t em = h & 0x7FFFu;
  const uint32_t sign = h & 0x8000u;
  const uint32_t lifted = em > 4u ? em : 4u;  // [2^-23, 2^-22) = patterns 2, 3 become 2^-22 = 4
  const uint32_t field = lifted >> 10;
  const uint32_t lead = 31u - static_cast<uint32_t>(__builtin_clz(lifted));  // leading 1 of a subnormal
  const uint32_t fraction_bits = field != 0 ? 10u : lead;  // bits below the leading 1
  const int32_t e = static_cast<int32_t>(field != 0 ? field + 9u : lead) - 24;
  const int32_t ae = e < 0 ? -e : e;
  // as in quant_bits: drop = fraction_bits - m
  const uint32_t drop =
      fraction_bits - 4u + (31u - static_cast<uint32_t>(__builtin_clz(static_cast<uint32_t>(ae) | 3u)));
  const uint32_t rounded = (lifted + (1u << (drop - 1))) & (~0u << drop);
  uint32_t res = sign | rounded;
  res = em < 2u ? 0u : res;                              // below 2^-23: +0
  res = em >= 0x7900u ? (sign | 0x7C00u) : res;          // 40960 and above: Inf
  res = em > 0x7C00u ? static_cast<uint32_t>(h) : res;   // NaN passes through
  return static_cast<uint16_t>(res);
}

// One code read with the bit rules of formats.md §1.1: S | dot | exponent | mantissa.
struct CodeFields {
  bool negative;
  bool denormal;  // dot = 0000
  int exponent;   // normal: e; denormal: M - 23 (M = mantissa field)
  int mbits;      // fraction bits of a normal code (0 in denormal mode)
  int mant;       // the mantissa field
};

CodeFields read_code(uint8_t code) {
  CodeFields f{};
  f.negative = code >> 7;
  const int rest = code & 0x7F;
  const int dot_bits = rest >= 0x20 ? 2 : (rest >= 0x10 ? 3 : 4);
  const int prefix = rest >> (7 - dot_bits);
  // 11 -> 4, 10 -> 3, 01 -> 2 exponent bits; 001 -> 1; 0001 -> 0; 0000 -> denormal
  const int D = dot_bits == 2 ? prefix + 1 : (dot_bits == 3 ? 1 : 0);
  f.denormal = dot_bits == 4 && prefix == 0;
  const int field_bits = 7 - dot_bits - D;
  f.mant = rest & ((1 << field_bits) - 1);
  if (f.denormal) {
    f.exponent = f.mant - 23;
    f.mbits = 0;
    return f;
  }
  f.mbits = field_bits;
  const int exp_field = (rest >> field_bits) & ((1 << D) - 1);
  if (D == 0) {
    f.exponent = 0;
  } else {  // sign-magnitude with an implicit leading 1
    const int mag = (1 << (D - 1)) + (exp_field & ((1 << (D - 1)) - 1));
    f.exponent = (exp_field >> (D - 1)) ? -mag : mag;
  }
  return f;
}

float code_value(uint8_t code) {
  const CodeFields f = read_code(code);
  const float s = f.negative ? -1.0f : 1.0f;
  if (f.denormal) {
    if (f.mant == 0) return f.negative ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    return s * std::ldexp(1.0f, f.exponent);
  }
  if (f.exponent == 15 && f.mant == 1) return s * std::numeric_limits<float>::infinity();
  return s * std::ldexp(1.0f + static_cast<float>(f.mant) / static_cast<float>(1 << f.mbits), f.exponent);
}

const std::array<float, 256>& decode_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = code_value(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}

// Indexed by the fp32 exponent field of a HiF8 value: the positive code with mantissa field 0
// and how far to shift the fp32 mantissa to get the code's mantissa field. Built by inverting
// read_code, so encode and decode share one reading of the bit rules.
struct EncodeTables {
  std::array<uint8_t, 256> base{};
  std::array<uint8_t, 256> shift{};
};

const EncodeTables& encode_tables() {
  static const EncodeTables tables = [] {
    EncodeTables t;
    t.shift.fill(23);  // zero (field 0) and Inf (field 255): no mantissa bits
    for (int c = 1; c < 0x80; ++c) {
      const CodeFields f = read_code(static_cast<uint8_t>(c));
      if (f.denormal || f.mant == 0) {
        const int field = f.exponent + 127;
        t.base[field] = static_cast<uint8_t>(c);
        t.shift[field] = static_cast<uint8_t>(23 - f.mbits);
      }
    }
    t.base[255] = kPosInfCode;
    return t;
  }();
  return tables;
}

HIF8_INLINE uint8_t code_of_bits(uint32_t y, const EncodeTables& t) {
  const uint32_t field = (y >> 23) & 0xFFu;
  const uint32_t mant = (y & 0x7FFFFFu) >> t.shift[field];
  const uint8_t code = static_cast<uint8_t>(((y >> 24) & 0x80u) | t.base[field] | mant);
  return (y & kAbsMask) > kInfBits ? kNanCode : code;
}

void check_fmt(const std::string& fmt) {
  TORCH_CHECK(fmt == "hif8", "hif8 kernel: unknown format '", fmt, "' (this kernel implements only 'hif8')");
}

void check_input(const torch::Tensor& x, const char* fn) {
  TORCH_CHECK(x.device().is_cpu(), "hif8 ", fn, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "hif8 ", fn, ": expected a 2-D (rows, L) tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "hif8 ", fn, ": expected float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "hif8 ", fn, ": expected a contiguous tensor");
}

// Input dtypes: the storage type, its fp32 bit pattern, and its HiF8 value in the same type.
struct F32 {
  using T = uint32_t;
  static HIF8_INLINE uint32_t load(T v) { return v; }
  static HIF8_INLINE T quant(T v) { return quant_bits(v); }
};
struct BF16 {
  using T = uint16_t;
  static HIF8_INLINE uint32_t load(T v) { return static_cast<uint32_t>(v) << 16; }
  // every HiF8 value (and Inf, and a NaN that came in as bf16) is a bf16 value: truncation is exact
  static HIF8_INLINE T quant(T v) { return static_cast<T>(quant_bits(load(v)) >> 16); }
};
struct F16 {
  using T = uint16_t;
  static HIF8_INLINE uint32_t load(T v) { return f16_to_f32_bits(v); }
  static HIF8_INLINE T quant(T v) { return quant_f16_bits(v); }
};

template <typename Fn>
void with_dtype(at::ScalarType t, Fn fn) {
  if (t == at::kFloat) {
    fn(F32{});
  } else if (t == at::kBFloat16) {
    fn(BF16{});
  } else {
    fn(F16{});
  }
}

// Block size 1: rows and the tail need no special handling, the data is one flat run.
template <typename D>
void fake_quant_range(const typename D::T* __restrict in, typename D::T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = D::quant(in[i]);
}

template <typename D>
void encode_range(const typename D::T* __restrict in, uint8_t* __restrict out, int64_t n, const EncodeTables& t) {
  for (int64_t i = 0; i < n; ++i) out[i] = code_of_bits(quant_bits(D::load(in[i])), t);
}

torch::Tensor fake_quant(torch::Tensor x, std::string fmt, torch::Tensor out) {
  check_fmt(fmt);
  check_input(x, "fake_quant");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.device().is_cpu(),
              "hif8 fake_quant: out must be a contiguous CPU tensor with x's shape and dtype");
  with_dtype(x.scalar_type(), [&](auto d) {
    using D = decltype(d);
    const auto* in = static_cast<const typename D::T*>(x.const_data_ptr());
    auto* o = static_cast<typename D::T*>(out.mutable_data_ptr());
    at::parallel_for(0, x.numel(), kGrain, [=](int64_t b, int64_t e) { fake_quant_range<D>(in + b, o + b, e - b); });
  });
  return out;
}

std::vector<torch::Tensor> encode(torch::Tensor x, std::string fmt) {
  check_fmt(fmt);
  check_input(x, "encode");
  torch::Tensor codes = torch::empty(x.sizes(), torch::dtype(torch::kUInt8));
  uint8_t* o = codes.data_ptr<uint8_t>();
  const EncodeTables& t = encode_tables();
  with_dtype(x.scalar_type(), [&](auto d) {
    using D = decltype(d);
    const auto* in = static_cast<const typename D::T*>(x.const_data_ptr());
    at::parallel_for(0, x.numel(), kGrain, [=, &t](int64_t b, int64_t e) { encode_range<D>(in + b, o + b, e - b, t); });
  });
  return {codes, torch::Tensor(), torch::Tensor()};  // hif8 has no scales: Python gets None
}

torch::Tensor decode(torch::Tensor codes, c10::optional<torch::Tensor> scales,
                     c10::optional<torch::Tensor> tensor_scale, std::string fmt, int64_t Lp) {
  check_fmt(fmt);
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "hif8 decode: codes must be a contiguous 2-D uint8 CPU tensor, got ", codes.scalar_type(), " with ",
              codes.dim(), " dims");
  TORCH_CHECK(codes.size(1) == Lp, "hif8 decode: codes have ", codes.size(1), " columns, expected Lp = ", Lp);
  TORCH_CHECK(!(scales.has_value() && scales->defined()) && !(tensor_scale.has_value() && tensor_scale->defined()),
              "hif8 decode: hif8 has no scales; scales and tensor_scale must be None");
  torch::Tensor out = torch::empty(codes.sizes(), torch::dtype(torch::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const float* table = decode_table().data();
  at::parallel_for(0, codes.numel(), kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = table[c[i]];
  });
  return out;
}

// float32 -> bfloat16, round to nearest even: the rounding of Tensor.to(torch.bfloat16). NaN becomes
// the quiet NaN 0x7FC0 (PyTorch's own NaN bits differ between its scalar and vector paths).
HIF8_INLINE uint16_t f32_to_bf16_bits(uint32_t u) {
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & kAbsMask) > kInfBits ? 0x7FC0u : rounded);
}

// Input dtypes of the scaled entry points: widen to fp32 bits, narrow an fp32 result back.
struct ScaledF32 {
  using T = uint32_t;
  static HIF8_INLINE uint32_t load(T v) { return v; }
  static HIF8_INLINE T store(uint32_t u) { return u; }
};
struct ScaledBF16 {
  using T = uint16_t;
  static HIF8_INLINE uint32_t load(T v) { return static_cast<uint32_t>(v) << 16; }
  static HIF8_INLINE T store(uint32_t u) { return f32_to_bf16_bits(u); }
};

// The scale s must be a power of two with a normal reciprocal: then 1/s is exact and y * (1/s) is
// the correctly rounded y / s, the unfused path's division.
float checked_inverse(double scale, const char* fn) {
  const float s = static_cast<float>(scale);
  int exp = 0;
  const float mant = std::frexp(s, &exp);
  TORCH_CHECK(static_cast<double>(s) == scale && mant == 0.5f && exp >= -125 && exp <= 127, "hif8 ", fn,
              ": scale must be a power of two in [2^-126, 2^126], got ", scale);
  return 1.0f / s;
}

void check_scaled(const torch::Tensor& x, const torch::Tensor& out, const char* fn) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "hif8 ", fn, ": expected a contiguous float32 or bfloat16 CPU tensor, got ", x.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.device().is_cpu(),
              "hif8 ", fn, ": out must be a contiguous CPU tensor with x's shape and dtype");
}

template <typename Fn>
void with_scaled_dtype(at::ScalarType t, Fn fn) {
  if (t == at::kFloat) {
    fn(ScaledF32{});
  } else {
    fn(ScaledBF16{});
  }
}

template <typename D>
void fake_quant_scaled_range(const typename D::T* __restrict in, typename D::T* __restrict out, int64_t n, float s,
                             float inv) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t xs = float_bits(bits_float(D::load(in[i])) * s);
    out[i] = D::store(float_bits(bits_float(quant_bits(xs)) * inv));
  }
}

// (fp32(x) * s -> HiF8 -> / s) rounded to x's dtype, in one pass: the same float32 operations as
// `(fake_quant(x.float() * s) / s).to(x.dtype)`, so the result is identical bit for bit.
torch::Tensor fake_quant_scaled(torch::Tensor x, std::string fmt, double scale, torch::Tensor out) {
  check_fmt(fmt);
  check_scaled(x, out, "fake_quant_scaled");
  const float inv = checked_inverse(scale, "fake_quant_scaled");
  const float s = static_cast<float>(scale);
  with_scaled_dtype(x.scalar_type(), [&](auto d) {
    using D = decltype(d);
    const auto* in = static_cast<const typename D::T*>(x.const_data_ptr());
    auto* o = static_cast<typename D::T*>(out.mutable_data_ptr());
    at::parallel_for(0, x.numel(), kGrain,
                     [=](int64_t b, int64_t e) { fake_quant_scaled_range<D>(in + b, o + b, e - b, s, inv); });
  });
  return out;
}

// What one pass over a tensor measures for per-tensor scaling (lpq.formats.api.fake_quant_stats):
// max |x| as magnitude bits (an integer max: exact, order-free, vectorizes; NaN bits sort above
// Inf, so a NaN makes amax NaN as in the reference), the sum of x^2 in double, and, over
// xs = float32(x) * s and its HiF8 value, the counts of values that overflowed to Inf, were flushed
// to zero, or sit in the 1-mantissa-bit range (finite |xs| >= 2^8).
struct PassStats {
  uint32_t amax_bits = 0;
  double sumsq = 0.0;
  int64_t overflow = 0;
  int64_t flushed = 0;
  int64_t coarse = 0;
};

constexpr uint32_t kCoarseBits = 0x43800000u;  // 2^8
constexpr int kLanes = 8;                      // independent partial sums: vectorizable, fixed order
constexpr int64_t kChunk = 256;                // elements per inner block (a multiple of kLanes)

// One grain of the fused pass: quantize x * s, divide by s, store in the output type, and measure.
// Each kChunk block runs one branch-free loop (the quantization, the integer max and counts, and |x|
// into a small buffer), then adds the squares into kLanes partial sums in a fixed order, so the
// result does not depend on the number of threads.
template <typename Load, typename Store, bool kQuant, bool kCounts>
PassStats scaled_stats_range(const typename Load::T* __restrict in, typename Store::T* __restrict out, int64_t n,
                             float s, float inv) {
  PassStats st;
  double lanes[kLanes] = {};
  float mags[kChunk];
  uint32_t amax = 0;
  int64_t overflow = 0, flushed = 0, coarse = 0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = n - c < kChunk ? n - c : kChunk;
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t u = Load::load(in[c + i]);
      const uint32_t mag = u & kAbsMask;
      amax = mag > amax ? mag : amax;
      mags[i] = bits_float(mag);
      if constexpr (kQuant) {
        const uint32_t xs = float_bits(bits_float(u) * s);
        const uint32_t q = quant_bits(xs);
        out[c + i] = Store::store(float_bits(bits_float(q) * inv));
        if constexpr (kCounts) {
          const uint32_t xmag = xs & kAbsMask;
          const uint32_t qmag = q & kAbsMask;
          overflow += static_cast<int64_t>((qmag == kInfBits) & (xmag < kInfBits));
          flushed += static_cast<int64_t>((qmag == 0u) & (xmag != 0u));
          coarse += static_cast<int64_t>((xmag >= kCoarseBits) & (xmag < kInfBits));
        }
      }
    }
    // The squares in double (exact: a float's 24-bit significand squared fits in 53 bits), in a
    // second loop over the chunk so the first keeps one 32-bit lane width and vectorizes fully.
    for (int64_t i = m; i < (m + kLanes - 1) / kLanes * kLanes; ++i) mags[i] = 0.0f;
    for (int64_t i0 = 0; i0 < m; i0 += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const double v = static_cast<double>(mags[i0 + j]);
        lanes[j] += v * v;
      }
    }
  }
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  st.amax_bits = amax;
  st.sumsq = total;
  st.overflow = overflow;
  st.flushed = flushed;
  st.coarse = coarse;
  return st;
}

// Grains of kGrain elements measured in parallel, combined in grain order (deterministic).
template <typename Load, typename Store, bool kQuant, bool kCounts>
torch::Tensor scaled_stats(const typename Load::T* in, typename Store::T* out, int64_t n, float s, float inv) {
  const int64_t grains = (n + kGrain - 1) / kGrain;
  std::vector<PassStats> parts(static_cast<size_t>(grains));
  at::parallel_for(0, grains, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const int64_t lo = g * kGrain;
      const int64_t len = n - lo < kGrain ? n - lo : kGrain;
      parts[static_cast<size_t>(g)] =
          scaled_stats_range<Load, Store, kQuant, kCounts>(in + lo, out == nullptr ? nullptr : out + lo, len, s, inv);
    }
  });
  PassStats all;
  for (const PassStats& p : parts) {
    all.amax_bits = p.amax_bits > all.amax_bits ? p.amax_bits : all.amax_bits;
    all.sumsq += p.sumsq;
    all.overflow += p.overflow;
    all.flushed += p.flushed;
    all.coarse += p.coarse;
  }
  torch::Tensor res = torch::empty({5}, torch::dtype(torch::kDouble));
  double* r = res.data_ptr<double>();
  // A NaN's magnitude bits are not a float32 value to report: the reference's amax is NaN.
  r[0] = all.amax_bits > kInfBits ? std::numeric_limits<double>::quiet_NaN()
                                  : static_cast<double>(bits_float(all.amax_bits));
  r[1] = all.sumsq;
  r[2] = static_cast<double>(all.overflow);
  r[3] = static_cast<double>(all.flushed);
  r[4] = static_cast<double>(all.coarse);
  return res;
}

void check_stats_input(const torch::Tensor& x, const char* fn) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "hif8 ", fn, ": expected a contiguous float32 or bfloat16 CPU tensor, got ", x.scalar_type());
}

// float64 [amax, sum of x^2, overflow, flushed, coarse] of (fp32(x) * s -> HiF8 -> / s), written into
// `out` (x's dtype, or bfloat16 for a float32 x: every HiF8 value divided by a power of two is exact
// in bfloat16, so this equals the float32 result cast to bfloat16). The counts are 0 unless `counts`.
torch::Tensor fake_quant_scaled_stats(torch::Tensor x, std::string fmt, double scale, torch::Tensor out, bool counts) {
  check_fmt(fmt);
  check_stats_input(x, "fake_quant_scaled_stats");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() && out.device().is_cpu() &&
                  (out.scalar_type() == x.scalar_type() || out.scalar_type() == at::kBFloat16),
              "hif8 fake_quant_scaled_stats: out must be a contiguous CPU tensor with x's shape and x's dtype "
              "or bfloat16");
  const float inv = checked_inverse(scale, "fake_quant_scaled_stats");
  const float s = static_cast<float>(scale);
  const int64_t n = x.numel();
  const bool narrow = out.scalar_type() == at::kBFloat16;
  auto run = [&](auto load, auto store) {
    using L = decltype(load);
    using S = decltype(store);
    const auto* in = static_cast<const typename L::T*>(x.const_data_ptr());
    auto* o = static_cast<typename S::T*>(out.mutable_data_ptr());
    return counts ? scaled_stats<L, S, true, true>(in, o, n, s, inv) : scaled_stats<L, S, true, false>(in, o, n, s, inv);
  };
  if (x.scalar_type() == at::kFloat) return narrow ? run(ScaledF32{}, ScaledBF16{}) : run(ScaledF32{}, ScaledF32{});
  return run(ScaledBF16{}, ScaledBF16{});
}

// float64 [amax, sum of x^2] of a float32 or bfloat16 tensor in one read (the statistics of
// fake_quant_scaled_stats without the quantization).
torch::Tensor moments(torch::Tensor x) {
  check_stats_input(x, "moments");
  const int64_t n = x.numel();
  torch::Tensor res = x.scalar_type() == at::kFloat
      ? scaled_stats<ScaledF32, ScaledF32, false, false>(static_cast<const uint32_t*>(x.const_data_ptr()), nullptr, n,
                                                         1.0f, 1.0f)
      : scaled_stats<ScaledBF16, ScaledBF16, false, false>(static_cast<const uint16_t*>(x.const_data_ptr()), nullptr,
                                                           n, 1.0f, 1.0f);
  return res.slice(0, 0, 2);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quant", &fake_quant, "HiF8 quantize-dequantize of a (rows, L) tensor into out",
        py::arg("x"), py::arg("fmt"), py::arg("out"));
  m.def("encode", &encode, "HiF8 codes of a (rows, L) tensor: [codes uint8, None, None]",
        py::arg("x"), py::arg("fmt"));
  m.def("decode", &decode, "float32 values of HiF8 codes (rows, Lp)", py::arg("codes"), py::arg("scales"),
        py::arg("tensor_scale"), py::arg("fmt"), py::arg("Lp"));
  m.def("fake_quant_scaled", &fake_quant_scaled,
        "HiF8 quantize-dequantize of x * scale, divided by scale, into out (float32 or bfloat16 x; "
        "scale a power of two)", py::arg("x"), py::arg("fmt"), py::arg("scale"), py::arg("out"));
  m.def("fake_quant_scaled_stats", &fake_quant_scaled_stats,
        "fake_quant_scaled into out (x's dtype, or bfloat16) and, from the same pass, float64 [amax, sum of "
        "squares, overflow, flushed, coarse] (counts 0 unless counts)", py::arg("x"), py::arg("fmt"),
        py::arg("scale"), py::arg("out"), py::arg("counts"));
  m.def("moments", &moments, "float64 [max |x|, sum of x^2] of a float32 or bfloat16 tensor in one read",
        py::arg("x"));
}
