// A dense bf16 Linear read from 12 bits per weight instead of 16, losslessly (AVX512-BF16 CPUs).
//
// Why: at decode a dense head is read whole for one row, so its time is its bytes. SmolLM2's tied
// 49152x576 bf16 head is half of what a step reads. A bf16 weight's high byte is its sign and the
// top 7 bits of its exponent; within one row of a trained matrix those 7 bits span only a few values
// (SmolLM2's head: at most 6 per row). So each weight is kept as its low byte, untouched, and a
// 4-bit code: its sign and its high byte's distance below the row's largest (0..6; 7 means zero).
// Decoding gives back the exact bf16 bits (a -0 becomes +0), and VDPBF16PS multiplies them with x
// exactly and adds in fp32, as a bf16 GEMM does; the sum is rounded once to bf16.
//
// Layout (zen_woq_pass/kernels/packed_bf16.py packs it): output rows in blocks of 16, one fp32
// lane each. Per block, per step of 2 inputs k, k+1: 48 bytes, the 32 low bytes (byte 2r + j: row
// r, input k + j) then 16 code bytes (byte r: row r's code for input k in its low nibble, for k + 1
// in its high one). A block is one sequential stream. ``tops`` [N] uint8: each row's largest high
// byte less its sign.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t ROWS = 16;       // output rows per block
constexpr int64_t STEP_BYTES = 48;  // per 2 inputs of a block
constexpr int64_t PREFETCH = 768;   // bytes ahead in a block's stream
constexpr int ZERO = 7;             // the distance code of a zero weight
using bf16 = c10::BFloat16;

// The 16 rows' weights at inputs k, k+1 as bf16 pairs, one 32-bit lane per row.
inline __m512i decode_step(const uint8_t* p, __m512i tops) {
  const __m512i low = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 32)));
  // each code to its own 16-bit half: input k's nibble in bits 0-3, input k+1's in bits 16-19
  const __m512i codes = _mm512_and_si512(_mm512_or_si512(bytes, _mm512_slli_epi32(bytes, 12)), _mm512_set1_epi32(0x000F000F));
  const __m512i sign = _mm512_slli_epi16(codes, 15);
  const __m512i distance = _mm512_srli_epi16(codes, 1);
  const __mmask32 zero = _mm512_cmpeq_epi16_mask(distance, _mm512_set1_epi16(ZERO));
  const __m512i high = _mm512_slli_epi16(_mm512_sub_epi16(tops, distance), 8);
  return _mm512_maskz_mov_epi16(~zero, _mm512_or_si512(_mm512_or_si512(sign, high), low));
}

inline __m512i pair_of(const bf16* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}

// One block times MB rows of x (from m0): out[m * 16 + r], fp32.
template <int MB>
void dot_block(const uint8_t* block, __m512i tops, const bf16* x, int64_t m0, int64_t K, float* out) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 4) {
    const uint8_t* p = block + k / 2 * STEP_BYTES;
    _mm_prefetch((const char*)(p + PREFETCH), _MM_HINT_T0);
    _mm_prefetch((const char*)(p + PREFETCH + 64), _MM_HINT_T0);
    const __m512i w0 = decode_step(p, tops), w1 = decode_step(p + STEP_BYTES, tops);
    for (int m = 0; m < MB; ++m) {
      const bf16* row = x + (m0 + m) * K + k;
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)w0, (__m512bh)pair_of(row));
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)w1, (__m512bh)pair_of(row + 2));
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * ROWS, _mm512_add_ps(acc[m][0], acc[m][1]));
}

// The row's top, for both bf16 halves of its lane.
inline __m512i block_tops(const uint8_t* tops) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)tops));
}

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& tops, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "zen_woq packed_bf16_linear: x must be contiguous bf16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == STEP_BYTES && packed.is_contiguous(),
              "zen_woq packed_bf16_linear: packed must be contiguous uint8 [N / 16, K / 2, 48]");
  const int64_t N = packed.size(0) * ROWS, K = packed.size(1) * 2, M = x.size(0);
  TORCH_CHECK(x.size(1) == K && K % 4 == 0, "zen_woq packed_bf16_linear: x has ", x.size(1), " inputs, the weight ", K,
              " (a multiple of 4)");
  TORCH_CHECK(tops.scalar_type() == at::kByte && tops.numel() == N && tops.is_contiguous(),
              "zen_woq packed_bf16_linear: tops must be contiguous uint8 [N]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous()),
              "zen_woq packed_bf16_linear: bias must be contiguous bf16 [N]");
  at::Tensor out = at::empty({M, N}, x.options());
  const bf16* xp = x.const_data_ptr<bf16>();
  const uint8_t* wp = packed.const_data_ptr<uint8_t>();
  const uint8_t* tp = tops.const_data_ptr<uint8_t>();
  const bf16* bp = bias.has_value() ? bias->const_data_ptr<bf16>() : nullptr;
  bf16* op = out.mutable_data_ptr<bf16>();
  if (K == 0) {  // no inputs: F.linear's zeros, plus the bias
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) op[m * N + n] = bp ? bp[n] : bf16(0.f);
    return out;
  }
  const int64_t block_bytes = K / 2 * STEP_BYTES;
  const int64_t grain = std::max<int64_t>(1, 65536 / block_bytes);
  at::parallel_for(0, N / ROWS, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float dots[4 * ROWS];
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * block_bytes;
      // tops of rows 16b..16b+15, each twice: lane 2r and 2r+1 of 32 16-bit lanes
      alignas(32) uint8_t twice[2 * ROWS];
      for (int r = 0; r < ROWS; ++r) twice[2 * r] = twice[2 * r + 1] = tp[b * ROWS + r];
      const __m512i t = block_tops(twice);
      const __m512 add = bp ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bp + b * ROWS))), 16))
                            : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < M;) {
        const int rows = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
        if (rows == 4) dot_block<4>(block, t, xp, m0, K, dots);
        else if (rows == 2) dot_block<2>(block, t, xp, m0, K, dots);
        else dot_block<1>(block, t, xp, m0, K, dots);
        for (int m = 0; m < rows; ++m) {
          const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(dots + m * ROWS), add));
          _mm256_storeu_si256((__m256i*)(op + (m0 + m) * N + b * ROWS), (__m256i)y);
        }
        m0 += rows;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zen_woq_native, m) {
  m.def("packed_bf16_linear(Tensor x, Tensor packed, Tensor tops, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(zen_woq_native, CPU, m) {
  m.impl("packed_bf16_linear", &linear_op);
}
