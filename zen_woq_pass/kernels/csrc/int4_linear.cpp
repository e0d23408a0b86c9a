// zen_woq's own 4-bit (and 8-bit) x bf16 matmul for CPUs with AVX512-VNNI and AVX512-BF16 (Zen 4
// and later, Intel Sapphire Rapids and later).
//
// Why: a decode step is one row, and PyTorch's int4 CPU kernel reads its weights far below the
// memory bandwidth there (README). Integer dot products are the cheapest way through 4-bit codes:
// one VPDPBUSD multiplies 64 codes, as they sit in memory after one AND, with 64 bytes of x.
//
// Numerics. Per row of x and per weight group, x is written as 15-bit integers times a power of
// two: xq = x * 2^(14 - e), with 2^e above the group's largest |x|. For bf16 inputs every element
// within 2^7 of the group's largest is exact; smaller ones are rounded to a multiple of 2^-14 of
// the group's scale 2^e. Each xq is split as 128 * hi + lo (hi signed, lo in 0..127), two int8
// vectors for VPDPBUSD, whose int32 sums are exact. Per group,
//   sum(w * x) = scale * 2^(e - 14) * (128 * sum(c * hi) + sum(c * lo) - zero * sum(xq)),
// summed over groups in fp32 and rounded once to bf16. 4-bit codes c are q + 8 (0..15), zero is
// zp + 8; 8-bit codes (int8_linear, the opt-in int8 lm_head) are q + 128, zero zp + 128.
//
// Outliers. LLMs have a few "massive activations", 10^3-10^4 times the median: at such an
// element's scale the rest of its group would keep about 4 bits (a channel at 12000 with weight 0
// put the error at 3x the bf16 bound). So where a group's top tier (its elements within 2^TIER of
// its largest) holds at most one in OUTLIERS_PER of them (2 in groups of 16) and something nonzero
// lies below it, the tier is taken out, again for the rest while that holds, and the rest is
// written at its own scale; each element taken out is added exactly, (code - zero) * x with fp32
// sums, from its weight column in the block (outlier_sums). The common group costs a few mask
// operations more per 16 elements of x, and a call without outliers runs the same loop as before.
//
// Layout (zen_woq_pass/kernels/avx512_int4.py packs it). Output rows come in blocks of 16, one
// int32 lane each. Per block, per step of 8 inputs from k: 4-bit, 64 bytes, byte 4r + j holding the
// code of row r at input k + j in its low nibble and at k + 4 + j in its high one; 8-bit, 128
// bytes, byte 4r + j of the first 64 holding input k + j and of the second k + 4 + j. A block is
// one sequential stream. Scales and zeros are [N, G] tensors whose bytes are [N / 16][G][16]: per
// block, per group, its 16 rows.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t ROWS = 16;      // output rows per block
constexpr int64_t STEP = 8;       // inputs per 64 bytes of a block
constexpr int64_t PREFETCH = 512; // bytes ahead in a block's stream
constexpr int64_t OUTLIERS_PER = 8; // a group's elements per one it may take out of the integer path
constexpr int TIER = 7;             // binades below a group's largest that bf16 elements stay exact
using bf16 = c10::BFloat16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 codes16(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
// acc += a (unsigned bytes) . b (signed bytes), in place: through the intrinsic GCC 12 copied every
// accumulator out and back each step (8 register moves a step of 4 products).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

struct Shape {
  int64_t N, K, G, group, bits;
  int64_t step_bytes() const { return 8 * bits * ROWS / 8; }  // bytes of a block per step of 8 inputs
  int64_t block_bytes() const { return K / STEP * step_bytes(); }
};

// A step's codes as two vectors of 64 bytes: inputs k..k+3 and k+4..k+7 of the 16 rows.
template <int BITS>
inline void step_codes(const uint8_t* p, __m512i& first, __m512i& second) {
  if constexpr (BITS == 4) {
    const __m512i bytes = _mm512_loadu_si512(p), nibble = _mm512_set1_epi8(0x0F);
    first = _mm512_and_si512(bytes, nibble), second = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
  } else {
    first = _mm512_loadu_si512(p), second = _mm512_loadu_si512(p + 64);
  }
}

// An element x of row m of x, group g, taken out of the integer path. In a block's stream its 16
// rows' codes lie in the 64 bytes at ``offset`` from the group's first step, one a 32-bit lane, at
// the lane's top after a left shift by ``shift``.
struct Outlier {
  int32_t m, g, offset, shift;
  float x;
};

// The exponent e of 2^e above |a| (frexp's), kept where 2^(14 - e) and 2^(e - 14) are normal floats.
inline int scale_exponent(float a) {
  int e = 0;
  std::frexp(a, &e);  // 0 for a == 0
  return std::max(e, -100);
}

// x as 15-bit integers per group: hi and lo [M, K] int8; scale 2^(e - 14) and scale * sum(xq) [M, G];
// the elements taken out, in order of row and group.
struct QuantizedX {
  std::vector<int8_t> hi, lo;
  std::vector<float> scale, scaled_sum;
  std::vector<Outlier> outliers;

  QuantizedX(const bf16* x, int64_t M, const Shape& S) : hi(M * S.K), lo(M * S.K), scale(M * S.G), scaled_sum(M * S.G) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < S.G; ++g) quantize_group(x, m * S.K + g * S.group, S, m * S.G + g);
  }

  void quantize_group(const bf16* x, int64_t at, const Shape& S, int64_t slot) {
    const int64_t n = S.group;
    __m512 largest = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: NaN if any x is inf or NaN
    for (int64_t k = 0; k < n; k += 16) {
      const __m512 v = load16(x + at + k);
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    const float amax = _mm512_reduce_max_ps(largest);
    if (!std::isfinite(_mm512_reduce_add_ps(poison))) {  // inf or NaN in x: every output of the call becomes NaN, as in a GEMM
      std::fill_n(hi.data() + at, n, 0), std::fill_n(lo.data() + at, n, 0);
      scale[slot] = scaled_sum[slot] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const int e = scale_exponent(amax);
    const int64_t top = write(x, at, n, slot, e, std::numeric_limits<float>::infinity());
    if (0 < top && top <= std::max<int64_t>(2, n / OUTLIERS_PER)) take_out_outliers(x, at, S, slot, e, top);
  }

  // The group's elements below ``limit`` as xq at scale 2^(e - 14), the others as 0; returns how
  // many of those below ``limit`` lie in the top tier, at or above 2^(e - TIER).
  int64_t write(const bf16* x, int64_t at, int64_t n, int64_t slot, int e, float limit) {
    const __m512 up = _mm512_set1_ps(std::ldexp(1.f, 14 - e)), below = _mm512_set1_ps(limit);
    const __m512 tier = _mm512_set1_ps(std::ldexp(1.f, e - TIER));
    __m512i total = _mm512_setzero_si512();
    int64_t top = 0;
    for (int64_t k = 0; k < n; k += 16) {
      const __m512 f = load16(x + at + k), a = _mm512_abs_ps(f);
      const __mmask16 kept = _mm512_cmp_ps_mask(a, below, _CMP_LT_OQ);
      top += __builtin_popcount(_mm512_mask_cmp_ps_mask(kept, a, tier, _CMP_GE_OQ));
      const __m512i v = _mm512_cvtps_epi32(_mm512_maskz_mul_ps(kept, f, up));  // |v| < 2^14
      total = _mm512_add_epi32(total, v);
      _mm_storeu_si128((__m128i*)(hi.data() + at + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(v, 7)));
      _mm_storeu_si128((__m128i*)(lo.data() + at + k), _mm512_cvtepi32_epi8(_mm512_and_si512(v, _mm512_set1_epi32(127))));
    }
    scale[slot] = std::ldexp(1.f, e - 14);
    scaled_sum[slot] = float(_mm512_reduce_add_epi32(total)) * scale[slot];
    return top;
  }

  // The group's top tier holds ``top`` elements, few: while each tier is few and something nonzero
  // lies below it, take it out; then write the rest at its own scale and note each taken element.
  // (Rare: scalar loops.)
  void take_out_outliers(const bf16* x, int64_t at, const Shape& S, int64_t slot, int e, int64_t top) {
    const int64_t n = S.group, most = std::max<int64_t>(2, n / OUTLIERS_PER);
    float limit = std::numeric_limits<float>::infinity();
    int64_t taken = 0;
    for (;;) {
      int64_t nonzero = 0;
      for (int64_t k = 0; k < n; ++k) {
        const float a = std::fabs(float(x[at + k]));
        nonzero += a < limit && a > 0.f;
      }
      if (taken + top > most || nonzero == top) break;
      limit = std::ldexp(1.f, e - TIER), taken += top;
      float rest = 0.f;  // the largest element left
      for (int64_t k = 0; k < n; ++k) {
        const float a = std::fabs(float(x[at + k]));
        if (a < limit) rest = std::max(rest, a);
      }
      e = scale_exponent(rest);
      const float tier = std::ldexp(1.f, e - TIER);
      top = 0;
      for (int64_t k = 0; k < n; ++k) {
        const float a = std::fabs(float(x[at + k]));
        top += a < limit && a >= tier;
      }
    }
    if (taken == 0) return;
    write(x, at, n, slot, e, limit);
    for (int64_t k = 0; k < n; ++k) {
      const float v = float(x[at + k]);
      if (!(std::fabs(v) >= limit)) continue;
      // byte 4r + j % 4 of the step's 64 bytes: 4-bit, its low nibble for j < 4, else its high one;
      // 8-bit, of the first 64 bytes for j < 4, else of the second
      const int64_t step = k / STEP, j = k % STEP;
      const int32_t m = int32_t(slot / S.G), g = int32_t(slot % S.G);
      if (S.bits == 4) outliers.push_back({m, g, int32_t(step * S.step_bytes()), int32_t(28 - 8 * (j % 4) - 4 * (j / 4)), v});
      else outliers.push_back({m, g, int32_t(step * S.step_bytes() + 64 * (j / 4)), int32_t(24 - 8 * (j % 4)), v});
    }
  }
};

// One block of 16 weight rows times MB rows of x (from m0): out[m * 16 + r], fp32.
// Per row of x, four int32 accumulators (hi/lo x low/high nibbles) are independent chains.
template <int BITS, int MB, typename Scale>
__attribute__((always_inline)) inline void dot_block(const uint8_t* block, const Scale* scales, const uint8_t* zeros, const QuantizedX& q, int64_t m0,
               const Shape& S, float* out) {
  // x's rows and the block's stream as plain pointers, advanced by the loop: read through ``q`` and
  // indexed by k / STEP, GCC reloaded them and divided every step (12 scalar ops of 33).
  const int8_t* his[MB];
  const int8_t* los[MB];
  for (int m = 0; m < MB; ++m) his[m] = q.hi.data() + (m0 + m) * S.K, los[m] = q.lo.data() + (m0 + m) * S.K;
  const int64_t step_bytes = S.step_bytes();
  const uint8_t* p = block;
  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < S.G; ++g) {
    __m512i acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_si512();
    const int64_t end = (g + 1) * S.group;
    for (int64_t k = g * S.group; k < end; k += STEP, p += step_bytes) {
      _mm_prefetch((const char*)(p + PREFETCH), _MM_HINT_T0);
      __m512i low, high;
      step_codes<BITS>(p, low, high);
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = dpbusd(acc[m][0], low, broadcast4(his[m] + k));
        acc[m][1] = dpbusd(acc[m][1], high, broadcast4(his[m] + k + 4));
        acc[m][2] = dpbusd(acc[m][2], low, broadcast4(los[m] + k));
        acc[m][3] = dpbusd(acc[m][3], high, broadcast4(los[m] + k + 4));
      }
    }
    const __m512 scale = load16(scales + g * ROWS), zero = codes16(zeros + g * ROWS);
    for (int m = 0; m < MB; ++m) {
      const int64_t slot = (m0 + m) * S.G + g;
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[m][0], acc[m][1]));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[m][2], acc[m][3]));
      const float xs = q.scale[slot];
      __m512 sum = _mm512_fmadd_ps(hi, _mm512_set1_ps(128.f * xs), _mm512_mul_ps(lo, _mm512_set1_ps(xs)));
      sum = _mm512_fnmadd_ps(zero, _mm512_set1_ps(q.scaled_sum[slot]), sum);
      total[m] = _mm512_fmadd_ps(sum, scale, total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ROWS, total[m]);
}

// The elements taken out of x times the weights, plus the bias: sums [M, N] fp32, to be added to
// the integer path's. Per block and group, scale * sum((code - zero) * x), exact products and fp32
// sums. Apart from the hot loop: in dot_block's epilogue, or called between its blocks, this cost
// that loop register moves or a spill per step (GCC 12).
template <int BITS, typename Scale>
void outlier_sums(const uint8_t* wp, const Scale* sp, const uint8_t* zp, const bf16* bp, const QuantizedX& q, int64_t M,
                  const Shape& S, float* sums) {
  const std::vector<Outlier>& outliers = q.outliers;
  at::parallel_for(0, S.N / ROWS, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const __m512 add = bp ? load16(bp + b * ROWS) : _mm512_setzero_ps();
      for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(sums + m * S.N + b * ROWS, add);
      const uint8_t* block = wp + b * S.block_bytes();
      for (size_t i = 0; i < outliers.size();) {
        const int32_t m = outliers[i].m, g = outliers[i].g;
        const uint8_t* group = block + g * (S.group / STEP) * S.step_bytes();
        const __m512 zero = codes16(zp + (b * S.G + g) * ROWS);
        __m512 sum = _mm512_setzero_ps();
        for (; i < outliers.size() && outliers[i].m == m && outliers[i].g == g; ++i) {
          const Outlier& o = outliers[i];  // its code at the lane's top, then down: shifts, no mask
          const __m512i lanes = _mm512_sll_epi32(_mm512_loadu_si512(group + o.offset), _mm_cvtsi32_si128(o.shift));
          const __m512 codes = _mm512_cvtepi32_ps(_mm512_srli_epi32(lanes, 32 - BITS));
          sum = _mm512_fmadd_ps(_mm512_sub_ps(codes, zero), _mm512_set1_ps(o.x), sum);
        }
        float* out = sums + m * S.N + b * ROWS;
        _mm512_storeu_ps(out, _mm512_fmadd_ps(sum, load16(sp + (b * S.G + g) * ROWS), _mm512_loadu_ps(out)));
      }
    }
  });
}

// y = the integer path's sums + bias, or + extra where x has elements taken out ([M, N], theirs and
// the bias): two instantiations, so that the common one is the plain loop.
template <int BITS, typename Scale, bool EXTRA>
void blocks(const QuantizedX& q, const uint8_t* wp, const Scale* sp, const uint8_t* zp, const bf16* bp, const float* ep,
            bf16* op, int64_t M, const Shape& S) {
  const int64_t grain = std::max<int64_t>(1, 32768 / S.block_bytes());  // blocks per task: at least 32 KB
  at::parallel_for(0, S.N / ROWS, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float dots[4 * ROWS];
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * S.block_bytes();
      const Scale* s = sp + b * S.G * ROWS;
      const uint8_t* z = zp + b * S.G * ROWS;
      for (int64_t m0 = 0; m0 < M;) {
        const int rows = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;  // of x, sharing each decoded step
        if (rows == 4) dot_block<BITS, 4>(block, s, z, q, m0, S, dots);
        else if (rows == 2) dot_block<BITS, 2>(block, s, z, q, m0, S, dots);
        else dot_block<BITS, 1>(block, s, z, q, m0, S, dots);
        for (int m = 0; m < rows; ++m) {  // the bias loaded here, not held in a register through dot_block
          __m512 plus;
          if constexpr (EXTRA) plus = _mm512_loadu_ps(ep + (m0 + m) * S.N + b * ROWS);
          else plus = bp ? load16(bp + b * ROWS) : _mm512_setzero_ps();
          const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(dots + m * ROWS), plus));
          _mm256_storeu_si256((__m256i*)(op + (m0 + m) * S.N + b * ROWS), (__m256i)y);
        }
        m0 += rows;
      }
    }
  });
}

template <int BITS, typename Scale>
void linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros,
            const std::optional<at::Tensor>& bias, at::Tensor& out, const Shape& S) {
  const int64_t M = x.size(0);
  const QuantizedX q(x.const_data_ptr<bf16>(), M, S);
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  const Scale* sp = scales.const_data_ptr<Scale>();
  const uint8_t* zp = zeros.const_data_ptr<uint8_t>();
  const bf16* bp = bias.has_value() ? bias->const_data_ptr<bf16>() : nullptr;
  bf16* op = out.mutable_data_ptr<bf16>();
  if (q.outliers.empty()) return blocks<BITS, Scale, false>(q, wp, sp, zp, bp, nullptr, op, M, S);
  std::vector<float> extra(M * S.N);
  outlier_sums<BITS>(wp, sp, zp, bp, q, M, S, extra.data());
  blocks<BITS, Scale, true>(q, wp, sp, zp, bp, extra.data(), op, M, S);
}

// The layer's weights in bf16, [N, K]: (code - zero) * scale rounded once, as compressed-tensors'
// dequantization gives them (for many rows, a bf16 GEMM on these beats the kernel).
// A step's two vectors interleaved by 32-bit lanes put each row's 8 codes side by side: 128-bit
// lane L of the low interleave holds rows 4L and 4L + 1, of the high one 4L + 2 and 4L + 3; each
// pair of rows becomes 16 bf16 and two 16-byte stores.
template <int L, typename Store>
inline void dequantize_lane(__m512i low, __m512i high, const __m512* scale, const __m512* zero, Store store) {
  for (int h = 0; h < 2; ++h) {
    const __m128i codes = _mm512_extracti32x4_epi32(h ? high : low, L);
    const __m512 values = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), zero[2 * L + h]), scale[2 * L + h]);
    store(4 * L + 2 * h, (__m256i)_mm512_cvtneps_pbh(values));
  }
}

template <int BITS, typename Scale>
void dequantize(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros, at::Tensor& out, const Shape& S) {
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  const Scale* sp = scales.const_data_ptr<Scale>();
  const uint8_t* zp = zeros.const_data_ptr<uint8_t>();
  bf16* op = out.mutable_data_ptr<bf16>();
  __m512i pick[8];  // lane l: row 4L + 2h + l / 8, for pair 2L + h
  for (int i = 0; i < 8; ++i) {
    alignas(64) int32_t idx[16];
    for (int l = 0; l < 16; ++l) idx[l] = 2 * i + l / 8;
    pick[i] = _mm512_load_si512(idx);
  }
  at::parallel_for(0, S.N / ROWS, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* p = wp + b * S.block_bytes();
      bf16* rows = op + b * ROWS * S.K;
      for (int64_t g = 0; g < S.G; ++g) {
        const __m512 scale16 = load16(sp + (b * S.G + g) * ROWS), zero16 = codes16(zp + (b * S.G + g) * ROWS);
        __m512 scale[8], zero[8];
        for (int i = 0; i < 8; ++i) scale[i] = _mm512_permutexvar_ps(pick[i], scale16), zero[i] = _mm512_permutexvar_ps(pick[i], zero16);
        for (int64_t k = g * S.group; k < (g + 1) * S.group; k += STEP, p += S.step_bytes()) {
          __m512i first, second;
          step_codes<BITS>(p, first, second);
          const __m512i low = _mm512_unpacklo_epi32(first, second), high = _mm512_unpackhi_epi32(first, second);
          auto store = [&](int row, __m256i pair) {  // rows row and row + 1, inputs k..k+7
            _mm_storeu_si128((__m128i*)(rows + row * S.K + k), _mm256_castsi256_si128(pair));
            _mm_storeu_si128((__m128i*)(rows + (row + 1) * S.K + k), _mm256_extracti128_si256(pair, 1));
          };
          dequantize_lane<0>(low, high, scale, zero, store);
          dequantize_lane<1>(low, high, scale, zero, store);
          dequantize_lane<2>(low, high, scale, zero, store);
          dequantize_lane<3>(low, high, scale, zero, store);
        }
      }
    }
  });
}

Shape check(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros, int64_t K, int64_t bits) {
  const int64_t N = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.size(1) * 8 == K * bits && weight.is_contiguous(),
              "zen_woq int", bits, "_linear: weight must be contiguous uint8 [N, K * ", bits, " / 8] for K = ", K);
  TORCH_CHECK(N % ROWS == 0, "zen_woq int", bits, "_linear: out_features ", N, " is not a multiple of ", ROWS);
  const int64_t G = scales.dim() == 2 ? scales.size(1) : 0;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && (K == 0 || (G > 0 && K % G == 0 && (K / G) % 16 == 0)) &&
                  scales.is_contiguous(),
              "zen_woq int", bits, "_linear: scales must be contiguous [N, G] with groups a multiple of 16");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kFloat,
              "zen_woq int", bits, "_linear: scales must be bf16 or float32");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.sizes() == scales.sizes() && zeros.is_contiguous(),
              "zen_woq int", bits, "_linear: zeros must be contiguous uint8 shaped like scales");
  return Shape{N, K, G, G ? K / G : 0, bits};
}

template <int BITS>
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "zen_woq int", BITS, "_linear: x must be contiguous bf16 [M, K]");
  const Shape S = check(weight, scales, zeros, x.size(1), BITS);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == S.N && bias->is_contiguous()),
              "zen_woq int", BITS, "_linear: bias must be contiguous bf16 [N]");
  at::Tensor out = at::empty({x.size(0), S.N}, x.options());
  if (S.K == 0) {  // no inputs: F.linear's zeros, plus the bias
    const bf16* bp = bias.has_value() ? bias->const_data_ptr<bf16>() : nullptr;
    bf16* op = out.mutable_data_ptr<bf16>();
    for (int64_t m = 0; m < x.size(0); ++m)
      for (int64_t n = 0; n < S.N; ++n) op[m * S.N + n] = bp ? bp[n] : bf16(0.f);
    return out;
  }
  if (scales.scalar_type() == at::kBFloat16) linear<BITS, bf16>(x, weight, scales, zeros, bias, out, S);
  else linear<BITS, float>(x, weight, scales, zeros, bias, out, S);
  return out;
}

template <int BITS>
at::Tensor dequantize_op(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros) {
  const Shape S = check(weight, scales, zeros, weight.size(1) * 8 / BITS, BITS);
  at::Tensor out = at::empty({S.N, S.K}, weight.options().dtype(at::kBFloat16));
  if (scales.scalar_type() == at::kBFloat16) dequantize<BITS, bf16>(weight, scales, zeros, out, S);
  else dequantize<BITS, float>(weight, scales, zeros, out, S);
  return out;
}

}  // namespace

TORCH_LIBRARY(zen_woq_native, m) {
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales, Tensor zeros, Tensor? bias) -> Tensor");
  m.def("int4_dequantize(Tensor weight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor zeros, Tensor? bias) -> Tensor");
  m.def("int8_dequantize(Tensor weight, Tensor scales, Tensor zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(zen_woq_native, CPU, m) {
  m.impl("int4_linear", &linear_op<4>);
  m.impl("int4_dequantize", &dequantize_op<4>);
  m.impl("int8_linear", &linear_op<8>);
  m.impl("int8_dequantize", &dequantize_op<8>);
}
