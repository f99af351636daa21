// MXFP4-family CPU kernels ("mxfp4", "mxfp4-rceil", "mxfp4-toolkit", "nvfp4"): fake_quant, encode,
// decode. lpq/formats/mx.py is the reference these match bit for bit; its docstring is the
// specification of every format, the packed layout and the NaN / Inf / signed-zero conventions.
//
// One block (32, or 16 for nvfp4) at a time: the block is loaded into a float32 scratch array
// (zero-padded past the row end), its max |x| is taken on the bit patterns (for non-negative floats
// unsigned order is float order and NaN sorts above Inf, so one integer max also finds non-finite
// blocks), the scale is decided in scalar code, and the element loops are branch-free.
//
// Elements: for the E8M0 formats q = |x| * 2^-X is exact whenever it is >= 2^-126 (2^-X is a power
// of two), and smaller q round to 0 anyway; for nvfp4 q is the float32 quotient |x| / fp32(b * s)
// the spec prescribes. Rounding q onto E2M1 then only compares q with the decision points: the
// magnitude code is the number of points q has passed. Round-to-nearest-even passes 0.25, 1.25,
// 2.5 and 5 only when strictly above them (the lower neighbour has the even code) and 0.75, 1.75,
// 3.5 when at or above. The toolkit rounds half away from zero, so it passes every point at
// equality; its float32 floor(2q + 0.5) also turns 2q = 0.5 - 2^-25 into 1, so its first point is
// the float just below 0.25. Whole blocks use fixed-length loops (the compiler vectorizes them);
// only a row's last block may be partial.
#include "bits.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t kGrainBlocks = 512;  // decode
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kMantMask = 0x007FFFFFu;
constexpr uint32_t kNearPow2Mant = 0x007FFF00u;  // within 256 ulps below a power of two
constexpr int kNanExp = 128;                     // exponent of the E8M0 NaN byte 0xFF
constexpr uint8_t kE8m0Nan = 0xFF;
constexpr uint8_t kE4m3Nan = 0x7F;
constexpr int kToolkitMaxExp = 125;
constexpr float kToolkitEps = 9.6e-7f;
constexpr float kE4m3Max = 448.0f;
constexpr float kNvTensorDiv = 2688.0f;          // 6 * 448
constexpr float kToolkitFirst = 0.24999998509883881f;  // 0.25 - 2^-26
constexpr float kE2M1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

enum class Fmt { kOcp, kRceil, kToolkit, kNv };

Fmt parse_fmt(const std::string& fmt) {
  if (fmt == "mxfp4") return Fmt::kOcp;
  if (fmt == "mxfp4-rceil") return Fmt::kRceil;
  if (fmt == "mxfp4-toolkit") return Fmt::kToolkit;
  if (fmt == "nvfp4") return Fmt::kNv;
  TORCH_CHECK(false, "mx kernel: unknown format '", fmt,
              "'; valid: mxfp4, mxfp4-rceil, mxfp4-toolkit, nvfp4");
}

inline int block_of(Fmt f) { return f == Fmt::kNv ? 16 : 32; }

// 2^e exactly, for e in [-149, 127] (2^-127 is an fp32 subnormal: pitfall 13).
inline float pow2(int e) {
  return e >= -126 ? bits_float(static_cast<uint32_t>(e + 127) << 23)
                   : bits_float(1u << (e + 149));
}

// --- shared exponents, from max |x| bits (mx.py: _ocp_exponent, _rceil_exponent, ...) ---------

inline int ocp_exponent(uint32_t amax) {
  if (amax >= kInfBits) return kNanExp;
  return std::max(static_cast<int>(amax >> 23) - 129, -127);
}

inline int rceil_exponent(uint32_t amax) {
  if (amax >= kInfBits) return kNanExp;
  const float sixth = 1.0f / 6.0f;  // fp32(1/6), correctly rounded at compile time
  const uint32_t d = float_bits(bits_float(amax) * sixth);
  const int field = static_cast<int>(d >> 23);
  const uint32_t mant = d & kMantMask;
  int e;
  if (field > 0) {
    e = field - 127 + (mant != 0);
  } else {
    e = mant > (1u << 22) ? -126 : -127;  // subnormal d: above 2^-127 or not
  }
  return std::min(std::max(e, -127), 127);
}

// floor of the correctly rounded float32 log2 of v > 0 (mx.py: toolkit_floor_log2).
inline int toolkit_floor_log2(float v) {
  const uint32_t b = float_bits(v);
  if ((b & kMantMask) >= kNearPow2Mant && b < kInfBits) {
    return static_cast<int>(std::floor(static_cast<float>(std::log2(static_cast<double>(v)))));
  }
  return static_cast<int>(b >> 23) - 127;
}

inline int toolkit_exponent(uint32_t amax) {
  if (amax > kInfBits) return kNanExp;
  return std::min(toolkit_floor_log2(bits_float(amax) + kToolkitEps) - 2, kToolkitMaxExp);
}

// --- element rounding (see the header comment) --------------------------------------------------

// Magnitude code 0..7 of q >= 0.
template <bool kHalfAway>
inline int e2m1_code(float q) {
  if (kHalfAway) {
    return (q >= kToolkitFirst) + (q >= 0.75f) + (q >= 1.25f) + (q >= 1.75f) + (q >= 2.5f) +
           (q >= 3.5f) + (q >= 5.0f);
  }
  return (q > 0.25f) + (q >= 0.75f) + (q > 1.25f) + (q >= 1.75f) + (q > 2.5f) + (q >= 3.5f) +
         (q > 5.0f);
}

// The same decision as a magnitude, written as selects so the loops compile to masked blends.
template <bool kHalfAway>
inline float e2m1_mag(float q) {
  if (kHalfAway) {
    float r = q >= kToolkitFirst ? 0.5f : 0.0f;
    r = q >= 0.75f ? 1.0f : r;
    r = q >= 1.25f ? 1.5f : r;
    r = q >= 1.75f ? 2.0f : r;
    r = q >= 2.5f ? 3.0f : r;
    r = q >= 3.5f ? 4.0f : r;
    return q >= 5.0f ? 6.0f : r;
  }
  float r = q > 0.25f ? 0.5f : 0.0f;
  r = q >= 0.75f ? 1.0f : r;
  r = q > 1.25f ? 1.5f : r;
  r = q >= 1.75f ? 2.0f : r;
  r = q > 2.5f ? 3.0f : r;
  r = q >= 3.5f ? 4.0f : r;
  return q > 5.0f ? 6.0f : r;
}

// Sign bit of the output: x's own for OCP / RCEIL / nvfp4; the toolkit multiplies by
// torch.sign(x), which is +0 for -0.
template <Fmt F>
inline uint32_t out_sign(float x) {
  if (F == Fmt::kToolkit) return x < 0.0f ? kSignMask : 0u;
  return float_bits(x) & kSignMask;
}

// --- nvfp4 scales ------------------------------------------------------------------------------

// s from the tensor's max |x| bits; NaN when that max is not finite.
inline float nv_tensor_scale(uint32_t amax) {
  if (amax >= kInfBits) return std::numeric_limits<float>::quiet_NaN();
  const float s = bits_float(amax) / kNvTensorDiv;
  return s == 0.0f ? 1.0f : s;
}

// v in [0, 448] rounded to nearest even onto the float8_e4m3fn grid: adding 2^(E+20), whose ulp
// is the e4m3 quantum 2^(E-3) of v's binade E (2^-9 below 2^-6, the subnormals), rounds v in the
// float32 add, and subtracting it again is exact. The same as torch's cast (tested); written
// without branches so that the loop over a chunk's blocks vectorizes.
inline float e4m3_round(float v) {
  const uint32_t field = std::max(float_bits(v) >> 23, 127u - 6u);
  const float big = bits_float((field + 20u) << 23);
  return (v + big) - big;
}

// float8_e4m3fn bit pattern of a value on that grid, in [0, 448].
inline uint8_t e4m3_bits(float r) {
  const uint32_t u = float_bits(r);
  const uint32_t field = u >> 23;
  return static_cast<uint8_t>(field < 127u - 6u ? static_cast<uint32_t>(r * 512.0f)
                                                : ((field - 120u) << 3) | ((u >> 20) & 7u));
}

// --- per-block decisions ------------------------------------------------------------------------

// Rows are processed in chunks of kChunk elements converted into a float32 scratch buffer: first
// every block's scale (independent work the CPU overlaps), then the element loops.
constexpr int64_t kChunk = 1024;
constexpr int64_t kGrainChunks = 32;

// The block parameters of one chunk, as arrays so that the nvfp4 loop over blocks vectorizes.
// E8M0 formats: q = |x| * mul, value = m * a, with mul = 2^-X and a = 2^X (exact). nvfp4:
// q = |x| / div, value = (m * a) * s, with a = b and div = fp32(b * s) -- the float32 operations
// of the spec; where b * s is 0, div = 1 and keep = 0 make every element a signed zero.
struct ChunkScales {
  static constexpr int64_t kMax = kChunk / 16;
  bool nan[kMax];
  uint8_t byte[kMax];  // E8M0 byte or e4m3fn bits
  float mul[kMax], div[kMax], a[kMax], keep[kMax];
};

template <int B>
inline uint32_t block_amax(const float* xs) {
  uint32_t m = 0;
  for (int i = 0; i < B; ++i) m = std::max(m, float_bits(xs[i]) & kAbsMask);
  return m;
}

template <Fmt F, int B>
void chunk_scales(const float* xs, int64_t nb, float s, ChunkScales& cs) {
  if constexpr (F == Fmt::kNv) {
    float amax[ChunkScales::kMax];
    for (int64_t b = 0; b < nb; ++b) amax[b] = bits_float(block_amax<B>(xs + b * B));
    for (int64_t b = 0; b < nb; ++b) {
      const float r = e4m3_round(std::min((amax[b] / 6.0f) / s, kE4m3Max));
      const float prod = r * s;
      cs.nan[b] = false;
      cs.byte[b] = e4m3_bits(r);
      cs.mul[b] = 1.0f;
      cs.a[b] = r;
      cs.div[b] = prod == 0.0f ? 1.0f : prod;
      cs.keep[b] = prod == 0.0f ? 0.0f : 1.0f;
    }
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const uint32_t amax = block_amax<B>(xs + b * B);
      const int exp = F == Fmt::kOcp     ? ocp_exponent(amax)
                      : F == Fmt::kRceil ? rceil_exponent(amax)
                                         : toolkit_exponent(amax);
      const bool nan = exp == kNanExp;
      cs.nan[b] = nan;
      cs.byte[b] = nan ? kE8m0Nan : static_cast<uint8_t>(exp + 127);
      cs.mul[b] = nan ? 1.0f : pow2(-exp);
      cs.a[b] = nan ? 1.0f : pow2(exp);
      cs.div[b] = 1.0f;
      cs.keep[b] = 1.0f;
    }
  }
}

template <Fmt F, int B>
inline void fq_block(const float* xs, float* ys, const ChunkScales& cs, int64_t b, float s) {
  if (cs.nan[b]) {
    for (int i = 0; i < B; ++i) ys[i] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float mul = cs.mul[b], div = cs.div[b], a = cs.a[b], keep = cs.keep[b];
  for (int i = 0; i < B; ++i) {
    float v;
    if constexpr (F == Fmt::kNv) {
      v = ((e2m1_mag<false>(std::fabs(xs[i]) / div) * keep) * a) * s;
    } else {
      v = e2m1_mag<F == Fmt::kToolkit>(std::fabs(xs[i]) * mul) * a;
    }
    ys[i] = bits_float(float_bits(v) | out_sign<F>(xs[i]));
  }
}

template <Fmt F, int B>
inline void encode_block(const float* xs, uint8_t* out, const ChunkScales& cs, int64_t b) {
  if (cs.nan[b]) {
    std::memset(out, 0, B / 2);
    return;
  }
  const float mul = cs.mul[b], div = cs.div[b];
  const int keep = cs.keep[b] != 0.0f;
  alignas(64) uint8_t nib[B];
  for (int i = 0; i < B; ++i) {
    const float q = F == Fmt::kNv ? std::fabs(xs[i]) / div : std::fabs(xs[i]) * mul;
    const int code = e2m1_code<F == Fmt::kToolkit>(q) * keep;
    nib[i] = static_cast<uint8_t>(code | (out_sign<F>(xs[i]) >> 28));
  }
  for (int i = 0; i < B / 2; ++i) out[i] = static_cast<uint8_t>(nib[2 * i] | (nib[2 * i + 1] << 4));
}

// --- loading and storing, and the walk over the tensor ------------------------------------------

// T -> float32 (exact) and float32 -> T (round to nearest even). For bfloat16 both are c10's
// conversions written as plain bit operations (NaN -> 0x7FC0), so that the loops using them
// vectorize.
template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 v) {
  return bits_float(static_cast<uint32_t>(v.x) << 16);
}

template <typename T>
inline T to_out(float v) {
  return static_cast<T>(v);
}

template <>
inline c10::BFloat16 to_out<c10::BFloat16>(float v) {
  const uint32_t u = float_bits(v);
  const uint32_t rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t h = static_cast<uint16_t>((u & kAbsMask) > kInfBits ? 0x7FC0u : rne);
  return c10::BFloat16(h, c10::BFloat16::from_bits());
}

// Calls fn(row, start, n) for every chunk [start, start + n) of every row, in parallel.
template <typename Fn>
void for_each_chunk(int64_t rows, int64_t L, const Fn& fn) {
  const int64_t per_row = (L + kChunk - 1) / kChunk;
  at::parallel_for(0, rows * per_row, kGrainChunks, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = k / per_row, start = (k % per_row) * kChunk;
      fn(r, start, std::min(kChunk, L - start));
    }
  });
}

// xs[0:n] = src[0:n] as float32, xs[n:padded] = 0 (the zero padding of the last block).
template <typename T>
inline void load_chunk(const T* src, int64_t n, int64_t padded, float* xs) {
  for (int64_t i = 0; i < n; ++i) xs[i] = to_float(src[i]);
  for (int64_t i = n; i < padded; ++i) xs[i] = 0.0f;
}

template <typename T>
uint32_t tensor_amax(const T* x, int64_t n) {
  return at::parallel_reduce(
      0, n, 1 << 16, uint32_t{0},
      [&](int64_t begin, int64_t end, uint32_t acc) {
        for (int64_t i = begin; i < end; ++i) {
          acc = std::max(acc, float_bits(to_float(x[i])) & kAbsMask);
        }
        return acc;
      },
      [](uint32_t a, uint32_t b) { return std::max(a, b); });
}

template <Fmt F>
constexpr int kBlock = F == Fmt::kNv ? 16 : 32;

template <Fmt F, typename T>
void fake_quant_impl(const T* x, T* y, int64_t rows, int64_t L) {
  constexpr int B = kBlock<F>;
  const float s = F == Fmt::kNv ? nv_tensor_scale(tensor_amax(x, rows * L)) : 1.0f;
  if (std::isnan(s)) {  // nvfp4: a non-finite tensor amax makes the whole tensor NaN
    const T nan = to_out<T>(std::numeric_limits<float>::quiet_NaN());
    at::parallel_for(0, rows * L, 1 << 16, [&](int64_t begin, int64_t end) {
      std::fill(y + begin, y + end, nan);
    });
    return;
  }
  for_each_chunk(rows, L, [&](int64_t r, int64_t start, int64_t n) {
    alignas(64) float xs[kChunk];
    alignas(64) float ys[kChunk];
    ChunkScales cs;
    const int64_t nb = (n + B - 1) / B;
    load_chunk(x + r * L + start, n, nb * B, xs);
    chunk_scales<F, B>(xs, nb, s, cs);
    for (int64_t b = 0; b < nb; ++b) fq_block<F, B>(xs + b * B, ys + b * B, cs, b, s);
    T* dst = y + r * L + start;
    for (int64_t i = 0; i < n; ++i) dst[i] = to_out<T>(ys[i]);
  });
}

template <Fmt F, typename T>
void encode_impl(const T* x, int64_t rows, int64_t L, uint8_t* codes, uint8_t* scales,
                 float* tensor_scale) {
  constexpr int B = kBlock<F>;
  const int64_t nblk = (L + B - 1) / B;
  const float s = F == Fmt::kNv ? nv_tensor_scale(tensor_amax(x, rows * L)) : 1.0f;
  if (F == Fmt::kNv) *tensor_scale = s;
  if (std::isnan(s)) {  // nvfp4 NaN tensor: NaN block scales, zero nibbles
    std::memset(scales, kE4m3Nan, rows * nblk);
    std::memset(codes, 0, rows * nblk * (B / 2));
    return;
  }
  for_each_chunk(rows, L, [&](int64_t r, int64_t start, int64_t n) {
    alignas(64) float xs[kChunk];
    ChunkScales cs;
    const int64_t nb = (n + B - 1) / B;
    const int64_t first = r * nblk + start / B;  // index of the chunk's first block
    load_chunk(x + r * L + start, n, nb * B, xs);
    chunk_scales<F, B>(xs, nb, s, cs);
    for (int64_t b = 0; b < nb; ++b) {
      scales[first + b] = cs.byte[b];
      encode_block<F, B>(xs + b * B, codes + (first + b) * (B / 2), cs, b);
    }
  });
}

template <typename Fn>
void with_fmt(Fmt f, const Fn& fn) {
  switch (f) {
    case Fmt::kOcp: fn(std::integral_constant<Fmt, Fmt::kOcp>{}); break;
    case Fmt::kRceil: fn(std::integral_constant<Fmt, Fmt::kRceil>{}); break;
    case Fmt::kToolkit: fn(std::integral_constant<Fmt, Fmt::kToolkit>{}); break;
    case Fmt::kNv: fn(std::integral_constant<Fmt, Fmt::kNv>{}); break;
  }
}

// Calls fn(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename Fn>
void with_dtype(at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "mx kernel: unsupported dtype ", t);
  }
}

// --- entry points -------------------------------------------------------------------------------

void check_input(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, what, ": expected a 2-D (rows, L) tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(), what, ": expected a contiguous tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, what,
              ": expected float32, bfloat16 or float16, got ", t);
}

torch::Tensor fake_quant(torch::Tensor x, std::string fmt, torch::Tensor out) {
  const Fmt f = parse_fmt(fmt);
  check_input(x, "mx fake_quant");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.sizes() == x.sizes() &&
                  out.scalar_type() == x.scalar_type(),
              "mx fake_quant: out must be a contiguous CPU tensor with x's shape and dtype");
  const int64_t rows = x.size(0), L = x.size(1);
  if (x.numel() == 0) return out;
  with_dtype(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    with_fmt(f, [&](auto F) {
      fake_quant_impl<decltype(F)::value>(x.data_ptr<T>(), out.data_ptr<T>(), rows, L);
    });
  });
  return out;
}

std::vector<torch::Tensor> encode(torch::Tensor x, std::string fmt) {
  const Fmt f = parse_fmt(fmt);
  check_input(x, "mx encode");
  const int block = block_of(f);
  const int64_t rows = x.size(0), L = x.size(1);
  const int64_t nblk = (L + block - 1) / block;
  auto u8 = torch::TensorOptions().dtype(torch::kUInt8);
  torch::Tensor codes = torch::empty({rows, nblk * block / 2}, u8);
  torch::Tensor scales = torch::empty({rows, nblk}, u8);
  torch::Tensor tscale;
  if (f == Fmt::kNv) tscale = torch::ones({}, torch::TensorOptions().dtype(torch::kFloat));
  if (codes.numel() > 0) {
    with_dtype(x.scalar_type(), [&](auto t) {
      using T = decltype(t);
      with_fmt(f, [&](auto F) {
        encode_impl<decltype(F)::value>(x.data_ptr<T>(), rows, L, codes.data_ptr<uint8_t>(),
                                        scales.data_ptr<uint8_t>(),
                                        tscale.defined() ? tscale.data_ptr<float>() : nullptr);
      });
    });
  }
  return {codes, scales, tscale};
}

torch::Tensor decode(torch::Tensor codes, c10::optional<torch::Tensor> scales,
                     c10::optional<torch::Tensor> tensor_scale, std::string fmt, int64_t Lp) {
  const Fmt f = parse_fmt(fmt);
  const int block = block_of(f);
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 2,
              "mx decode: codes must be a 2-D uint8 CPU tensor");
  TORCH_CHECK(Lp >= 0 && Lp % block == 0 && codes.size(1) * 2 == Lp, "mx decode (", fmt, "): Lp=",
              Lp, " must be a multiple of ", block, " and equal 2 * codes.size(1) = ",
              codes.size(1) * 2);
  const int64_t rows = codes.size(0), nblk = Lp / block;
  TORCH_CHECK(scales.has_value() && scales->defined(), "mx decode (", fmt, "): scales are required");
  TORCH_CHECK(scales->device().is_cpu() && scales->scalar_type() == at::kByte && scales->dim() == 2 &&
                  scales->size(0) == rows && scales->size(1) == nblk,
              "mx decode (", fmt, "): scales must be a uint8 CPU tensor of shape (", rows, ", ", nblk,
              ")");
  const bool has_ts = tensor_scale.has_value() && tensor_scale->defined();
  float s = 1.0f;
  if (f == Fmt::kNv) {
    TORCH_CHECK(has_ts && tensor_scale->scalar_type() == at::kFloat && tensor_scale->numel() == 1,
                "mx decode (nvfp4): tensor_scale must be a float32 tensor with one element");
    s = tensor_scale->cpu().item<float>();
  } else {
    TORCH_CHECK(!has_ts, "mx decode (", fmt, "): tensor_scale must be None");
  }
  const torch::Tensor c = codes.contiguous();
  const torch::Tensor sc = scales->contiguous();
  torch::Tensor out = torch::empty({rows, Lp}, torch::TensorOptions().dtype(torch::kFloat));
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * nblk, kGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const uint8_t* in = cp + k * (block / 2);
      float* o = op + k * block;
      float scale;
      if (f == Fmt::kNv) {
        scale = static_cast<float>(c10::Float8_e4m3fn(sp[k], c10::Float8_e4m3fn::from_bits()));
      } else {
        scale = sp[k] == kE8m0Nan ? std::numeric_limits<float>::quiet_NaN() : pow2(sp[k] - 127);
      }
      for (int i = 0; i < block; ++i) {
        const uint8_t nibble = (in[i / 2] >> ((i & 1) * 4)) & 0xF;
        const float e = kE2M1[nibble & 7];
        const float v = f == Fmt::kNv ? (e * scale) * s : e * scale;
        o[i] = std::isnan(v) ? std::numeric_limits<float>::quiet_NaN()
                             : bits_float(float_bits(v) | (nibble & 8 ? kSignMask : 0u));
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quant", &fake_quant, "MXFP4-family quantize-dequantize of a (rows, L) tensor along L",
        py::arg("x"), py::arg("fmt"), py::arg("out"));
  m.def("encode", &encode, "MXFP4-family [codes, scales, tensor_scale or None] of a (rows, L) tensor",
        py::arg("x"), py::arg("fmt"));
  m.def("decode", &decode, "float32 (rows, Lp) values of packed MXFP4-family data", py::arg("codes"),
        py::arg("scales"), py::arg("tensor_scale"), py::arg("fmt"), py::arg("Lp"));
}
