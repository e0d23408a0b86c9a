// zen_woq's own 4-bit x bf16 matmul for CPUs with AVX512-BF16 (Zen 4 and later, Intel Sapphire
// Rapids and later).
//
// Why: a decode step is one row, and PyTorch's int4 CPU kernel reads its weights far below the
// memory bandwidth there. Measured on an Intel Xeon, this one is faster with its weights in L2 and
// no faster in a real decode (README): opt-in until a CPU shows otherwise.
//
// Each 4-bit code c becomes the bf16 number 128 + c exactly (the exponent of 128 with c as the low
// mantissa bits: one byte interleave), and VDPBF16PS multiplies 32 of them with x per instruction,
// in fp32. Per group, sum(w * x) = scale * (sum((128 + c) * x) - (128 + zero) * sum(x)): exact
// products, fp32 sums, one rounding to bf16 at the end.
//
// Layout (zen_woq_pass/kernels/avx512_int4.py packs it): rows in blocks of 8. Per block, per chunk
// of 128 inputs, each row's 64 bytes: byte 16i + 8h + j holds the code of input 32h + 8i + j in its
// low nibble and of input 64 + 32h + 8i + j in its high one (what the byte interleave undoes). If
// in_features % 128 == 64, each row of the block ends with 32 bytes: byte j holds inputs j (low)
// and 32 + j (high). A block's bytes are one sequential stream, prefetched ahead.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t BLOCK = 8;       // rows per block of the layout
constexpr int64_t CHUNK = 128;     // inputs per 64 bytes of a row
constexpr int64_t HALF = 64;       // inputs per 32 bytes: groups are multiples of it
constexpr int64_t PREFETCH = 4;    // chunks ahead (8, 16 and 32 measured no faster)
using bf16 = c10::BFloat16;

inline __m512 load_scales(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_scales(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
inline __m512bh load_x(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

struct Layout {
  int64_t K, G, group, chunks;
  bool tail;
  int64_t block_bytes() const { return BLOCK * K / 2; }
  // the 64 bytes of row r (of its block) in chunk c; the 32 tail bytes for c == chunks
  int64_t offset(int64_t c, int64_t r) const { return c * BLOCK * 64 + r * (c < chunks ? 64 : 32); }
};

// Per row of x, per group: a vector whose lanes sum to the group's sum of x.
void group_sums(const bf16* x, const Layout& L, __m512* sums) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
  for (int64_t g = 0; g < L.G; ++g) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = g * L.group; k < (g + 1) * L.group; k += 32) s = _mm512_dpbf16_ps(s, ones, load_x(x + k));
    sums[g] = s;
  }
}

// A chunk's codes: low nibbles (inputs k0 + 0..63) or high ones (64..127), one byte each.
inline __m512i low_codes(const uint8_t* p) { return _mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(0x0F)); }
inline __m512i high_codes(const uint8_t* p) {
  return _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(p), 4), _mm512_set1_epi8(0x0F));
}

// 64 codes as two vectors of bf16 128 + code (inputs +0..31 and +32..63): each code byte gets the
// exponent byte 0x43 above it.
inline void widen(__m512i codes, __m512bh v[2]) {
  const __m512i exponent = _mm512_set1_epi8(0x43);
  v[0] = (__m512bh)_mm512_unpacklo_epi8(codes, exponent);
  v[1] = (__m512bh)_mm512_unpackhi_epi8(codes, exponent);
}

// A row's 32 tail bytes as the two vectors of its 64 inputs.
inline void widen_tail(const uint8_t* p, __m512bh v[2]) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  const __m512i nibble = _mm512_set1_epi16(0x000F), exponent = _mm512_set1_epi16(0x4300);
  v[0] = (__m512bh)_mm512_ternarylogic_epi32(words, nibble, exponent, 0xEA);  // (a & b) | c
  v[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, exponent, 0xEA);
}

// R rows of the block (from row r0) times MB rows of x: out[m * ldo + r]. R * MB independent
// accumulator chains hide VDPBF16PS's latency.
template <int R, int MB, typename Scale>
void dot_rows(const uint8_t* block, int64_t r0, const Scale* scales, const uint8_t* zeros, const bf16* x,
              const __m512* xsums, const Layout& L, float* scratch, float* out, int64_t ldo) {
  const int64_t G = L.G;
  float* scale = scratch;           // [R][G]
  float* offset = scratch + R * G;  // [R][G]: scale * (128 + zero)
  for (int64_t i = 0; i < R * G; i += 16) {
    const __mmask16 mask = first(R * G - i);
    const __m512 s = load_scales(scales + r0 * G + i, mask);
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zeros + r0 * G + i)));
    _mm512_mask_storeu_ps(scale + i, mask, s);
    _mm512_mask_storeu_ps(offset + i, mask, _mm512_mul_ps(s, _mm512_add_ps(z, _mm512_set1_ps(128.f))));
  }
  __m512 total[R][MB], acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) total[r][m] = acc[r][m] = _mm512_setzero_ps();
  const int64_t halves_per_group = L.group / HALF;
  int64_t g = 0, left = halves_per_group;
  auto half_done = [&]() {  // at a group's end: its sums, scaled, into the totals
    if (--left) return;
    left = halves_per_group;
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        total[r][m] = _mm512_fmadd_ps(acc[r][m], _mm512_set1_ps(scale[r * G + g]), total[r][m]);
        total[r][m] = _mm512_fnmadd_ps(xsums[m * G + g], _mm512_set1_ps(offset[r * G + g]), total[r][m]);
        acc[r][m] = _mm512_setzero_ps();
      }
    ++g;
  };
  __m512bh xs[MB][2];  // the 64 inputs of x being summed
  auto load_inputs = [&](int64_t k) {
    for (int m = 0; m < MB; ++m) xs[m][0] = load_x(x + m * L.K + k), xs[m][1] = load_x(x + m * L.K + k + 32);
  };
  auto dot = [&](int r, const __m512bh v[2]) {  // one weight row's 64 codes
    for (int m = 0; m < MB; ++m) {
      acc[r][m] = _mm512_dpbf16_ps(acc[r][m], v[0], xs[m][0]);
      acc[r][m] = _mm512_dpbf16_ps(acc[r][m], v[1], xs[m][1]);
    }
  };
  __m512bh v[2];
  for (int64_t c = 0; c < L.chunks; ++c) {
    load_inputs(c * CHUNK);
    for (int r = 0; r < R; ++r) {
      widen(low_codes(block + L.offset(c, r0 + r)), v);
      _mm_prefetch((const char*)(block + L.offset(std::min(c + PREFETCH, L.chunks - 1), r0 + r)), _MM_HINT_T0);
      dot(r, v);
    }
    half_done();
    load_inputs(c * CHUNK + HALF);
    for (int r = 0; r < R; ++r) {
      widen(high_codes(block + L.offset(c, r0 + r)), v);  // the same bytes, again from L1
      dot(r, v);
    }
    half_done();
  }
  if (L.tail) {
    load_inputs(L.chunks * CHUNK);
    for (int r = 0; r < R; ++r) {
      widen_tail(block + L.offset(L.chunks, r0 + r), v);
      dot(r, v);
    }
    half_done();
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * ldo + r] = _mm512_reduce_add_ps(total[r][m]);
}

template <typename Scale>
void linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros,
            const std::optional<at::Tensor>& bias, at::Tensor& out, const Layout& L) {
  const int64_t M = x.size(0), N = weight.size(0), G = L.G;
  const bf16* xp = x.const_data_ptr<bf16>();
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  const Scale* sp = scales.const_data_ptr<Scale>();
  const uint8_t* zp = zeros.const_data_ptr<uint8_t>();
  const bf16* bp = bias.has_value() ? bias->const_data_ptr<bf16>() : nullptr;
  bf16* op = out.mutable_data_ptr<bf16>();
  std::vector<__m512> xsums(M * G);
  for (int64_t m = 0; m < M; ++m) group_sums(xp + m * L.K, L, xsums.data() + m * G);
  const int64_t grain = std::max<int64_t>(1, 512 / L.K);
  at::parallel_for(0, N / BLOCK, grain, [&](int64_t begin, int64_t end) {
    std::vector<__m512> scratch((2 * BLOCK * G + 15) / 16);  // 64-byte aligned
    float dots[4 * BLOCK];
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * L.block_bytes();
      const Scale* s = sp + b * BLOCK * G;
      const uint8_t* z = zp + b * BLOCK * G;
      for (int64_t m0 = 0; m0 < M;) {
        const bf16* xm = xp + m0 * L.K;
        const __m512* sm = xsums.data() + m0 * G;
        int rows;  // of x in this pass: 8 weight rows x 1, 4 x 2 (twice), 2 x 4 (4 times)
        if (M - m0 >= 4) {
          rows = 4;
          for (int64_t r0 = 0; r0 < BLOCK; r0 += 2) dot_rows<2, 4>(block, r0, s, z, xm, sm, L, (float*)scratch.data(), dots + r0, BLOCK);
        } else if (M - m0 >= 2) {
          rows = 2;
          for (int64_t r0 = 0; r0 < BLOCK; r0 += 4) dot_rows<4, 2>(block, r0, s, z, xm, sm, L, (float*)scratch.data(), dots + r0, BLOCK);
        } else {
          rows = 1;
          dot_rows<8, 1>(block, 0, s, z, xm, sm, L, (float*)scratch.data(), dots, BLOCK);
        }
        for (int m = 0; m < rows; ++m)
          for (int64_t r = 0; r < BLOCK; ++r) {
            const int64_t n = b * BLOCK + r;
            op[(m0 + m) * N + n] = bf16(dots[m * BLOCK + r] + (bp ? float(bp[n]) : 0.f));
          }
        m0 += rows;
      }
    }
  });
}

// The layer's weights in bf16, [N, K]: (code - zero) * scale rounded once, as compressed-tensors'
// dequantization gives them (for many rows, a bf16 GEMM on these beats the one-row kernel).
template <typename Scale>
void dequantize(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros, at::Tensor& out, const Layout& L) {
  const int64_t N = weight.size(0), K = L.K, G = L.G;
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  const Scale* sp = scales.const_data_ptr<Scale>();
  const uint8_t* zp = zeros.const_data_ptr<uint8_t>();
  bf16* op = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, N / BLOCK, 1, [&](int64_t begin, int64_t end) {
    __m512bh v[2];
    auto store = [&](int64_t n, int64_t k) {  // 64 inputs from k: (code - zero) * scale, rounded once
      for (int i = 0; i < 2; ++i)
        for (int h = 0; h < 2; ++h) {
          const int64_t at = k + 32 * i + 16 * h, g = n * G + at / L.group;
          const __m256i half = h ? _mm512_extracti64x4_epi64((__m512i)v[i], 1) : _mm512_castsi512_si256((__m512i)v[i]);
          const __m512 codes = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
          const __m512 values = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(128.f + zp[g])), _mm512_set1_ps(float(sp[g])));
          _mm256_storeu_si256((__m256i*)(op + n * K + at), (__m256i)_mm512_cvtneps_pbh(values));
        }
    };
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = 0; r < BLOCK; ++r) {
        const int64_t n = b * BLOCK + r;
        const uint8_t* block = wp + b * L.block_bytes();
        for (int64_t c = 0; c < L.chunks; ++c) {
          widen(low_codes(block + L.offset(c, r)), v);
          store(n, c * CHUNK);
          widen(high_codes(block + L.offset(c, r)), v);
          store(n, c * CHUNK + HALF);
        }
        if (L.tail) {
          widen_tail(block + L.offset(L.chunks, r), v);
          store(n, L.chunks * CHUNK);
        }
      }
  });
}

Layout check(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros, int64_t K) {
  const int64_t N = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.size(1) * 2 == K && weight.is_contiguous(),
              "zen_woq int4_linear: weight must be contiguous uint8 [N, K/2] for K = ", K);
  TORCH_CHECK(N % BLOCK == 0, "zen_woq int4_linear: out_features ", N, " is not a multiple of ", BLOCK);
  TORCH_CHECK(K % HALF == 0, "zen_woq int4_linear: in_features ", K, " is not a multiple of ", HALF);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) > 0 && K % scales.size(1) == 0 &&
                  (K / scales.size(1)) % HALF == 0 && scales.is_contiguous(),
              "zen_woq int4_linear: scales must be contiguous [N, G] with groups a multiple of ", HALF);
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kFloat,
              "zen_woq int4_linear: scales must be bf16 or float32");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.sizes() == scales.sizes() && zeros.is_contiguous(),
              "zen_woq int4_linear: zeros must be contiguous uint8 shaped like scales");
  const int64_t G = scales.size(1);
  return Layout{K, G, K / G, K / CHUNK, K % CHUNK != 0};
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "zen_woq int4_linear: x must be contiguous bf16 [M, K]");
  const Layout L = check(weight, scales, zeros, x.size(1));
  const int64_t N = weight.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous()),
              "zen_woq int4_linear: bias must be contiguous bf16 [N]");
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (scales.scalar_type() == at::kBFloat16) linear<bf16>(x, weight, scales, zeros, bias, out, L);
  else linear<float>(x, weight, scales, zeros, bias, out, L);
  return out;
}

at::Tensor int4_dequantize(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& zeros) {
  const Layout L = check(weight, scales, zeros, weight.size(1) * 2);
  at::Tensor out = at::empty({weight.size(0), L.K}, weight.options().dtype(at::kBFloat16));
  if (scales.scalar_type() == at::kBFloat16) dequantize<bf16>(weight, scales, zeros, out, L);
  else dequantize<float>(weight, scales, zeros, out, L);
  return out;
}

}  // namespace

TORCH_LIBRARY(zen_woq_native, m) {
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scales, Tensor zeros, Tensor? bias) -> Tensor");
  m.def("int4_dequantize(Tensor weight, Tensor scales, Tensor zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(zen_woq_native, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_dequantize", &int4_dequantize);
}
