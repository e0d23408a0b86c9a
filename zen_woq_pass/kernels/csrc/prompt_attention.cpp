// A prompt's attention in bf16 on AVX512-BF16 CPUs: flash attention (online softmax) that skips the
// keys a query cannot see.
//
// Why: ATen's CPU flash attention takes keys in blocks of 512 and computes a block whole before
// masking it, so for a causal prompt of up to 512 tokens it does all the work of a full one; and it
// ran at 120 GFLOP/s where a bf16 GEMM of the same core ran 360 (SmolLM2's 9 heads of 64, 512
// tokens, a Zen 4 with 2 threads: 4.3 ms a layer, 129 ms of a 512-token prompt's 500). Here each
// block of 32 queries reads only the keys up to its last visible one, and both products are
// VDPBF16PS on operands laid out for it: bf16 products exact, sums in fp32, as a bf16 GEMM; the
// softmax in fp32; its weights rounded to bf16 for the second product, as ATen's kernel does.
//
// Layout: per batch and kv head, keys packed [blocks of 64][D / 2][64][2] (one vector holds 16 keys'
// pairs of dimensions) and values [keys / 2][D][2] (16 dimensions' pairs of keys). Which key a
// query sees: ``causal`` (key j <= query i, top-left, as SDPA's is_causal) and/or a boolean mask
// [1 or B, 1, q, keys] (true: attends). A query that sees no key gives zeros. Only keys up to the
// last one some query sees are packed and read: a static cache's mask spans all its slots.
//
// NaN as SDPA: a NaN score a query sees (a NaN in its row or in a key it sees) makes its output NaN;
// a key it does not see is never read, NaN or not (SDPA with is_causal agrees; with a boolean mask
// it adds -inf to the NaN and gives NaN, an artefact of how it masks, not a weight).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t QB = 32;  // queries per task
constexpr int64_t KB = 64;  // keys per block: 4 vectors of 16
constexpr int RB = 4;       // query rows per register tile

// e^x for x <= 0 (fp32, ~1 ulp): 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2]; NaN stays NaN.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // MAXPS returns its second operand if either is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh pair(const bf16* p) {  // two bf16 broadcast to every lane
  int32_t bits;
  std::memcpy(&bits, p, 4);
  return (__m512bh)_mm512_set1_epi32(bits);
}

struct Shape {
  int64_t B, H, Hkv, Lq, Lk, D, keys;  // keys: those any query may see, padded to blocks in packing
};

// Keys of one (batch, kv head) as the score product reads them: [Lk / KB][D / 2][KB][2], zero past
// the last key.
void pack_keys(const bf16* k, int64_t stride_l, const Shape& S, bf16* out) {
  const int64_t blocks = (S.keys + KB - 1) / KB;
  std::memset((void*)out, 0, blocks * KB * S.D * sizeof(bf16));
  for (int64_t j = 0; j < S.keys; ++j) {
    const bf16* row = k + j * stride_l;
    bf16* block = out + (j / KB) * KB * S.D + (j % KB) * 2;
    for (int64_t d = 0; d < S.D; ++d) block[(d / 2) * KB * 2 + (d % 2)] = row[d];
  }
}

// Values of one (batch, kv head) as the weighted sum reads them: [Lk / 2][D][2], zero past the last.
void pack_values(const bf16* v, int64_t stride_l, const Shape& S, bf16* out) {
  const int64_t padded = (S.keys + KB - 1) / KB * KB;
  std::memset((void*)out, 0, padded * S.D * sizeof(bf16));
  for (int64_t j = 0; j < S.keys; ++j) {
    const bf16* row = v + j * stride_l;
    bf16* dst = out + (j / 2) * S.D * 2 + (j % 2);
    for (int64_t d = 0; d < S.D; ++d) dst[d * 2] = row[d];
  }
}

// scores[r][0..KB) = q_r . key, for RB query rows and one block of keys.
inline void score_tile(const bf16* const* q, const bf16* keys, int64_t D, float* scores) {
  __m512 acc[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < D / 2; ++d2) {
    const bf16* kp = keys + d2 * KB * 2;
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp), k1 = (__m512bh)_mm512_loadu_si512(kp + 32);
    const __m512bh k2 = (__m512bh)_mm512_loadu_si512(kp + 64), k3 = (__m512bh)_mm512_loadu_si512(kp + 96);
    for (int r = 0; r < RB; ++r) {
      const __m512bh qr = pair(q[r] + 2 * d2);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qr, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qr, k1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], qr, k2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], qr, k3);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(scores + r * KB + 16 * v, acc[r][v]);
}

// out[r][d0 .. d0 + 16 NV) += weights[r] . values, for RB rows over one block of keys.
template <int NV>
inline void weighted_sum_tile(const bf16* weights, const bf16* values, int64_t D, int64_t d0, float* out) {
  __m512 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(out + r * D + d0 + 16 * v);
  for (int64_t j2 = 0; j2 < KB / 2; ++j2) {
    __m512bh vals[NV];
    for (int v = 0; v < NV; ++v) vals[v] = (__m512bh)_mm512_loadu_si512(values + (j2 * D + d0 + 16 * v) * 2);
    for (int r = 0; r < RB; ++r) {
      const __m512bh w = pair(weights + r * KB + 2 * j2);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], w, vals[v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * D + d0 + 16 * v, acc[r][v]);
}

void weighted_sum(const bf16* weights, const bf16* values, int64_t D, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (std::min<int64_t>(4, (D - d0) / 16)) {
      case 4: weighted_sum_tile<4>(weights, values, D, d0, out); break;
      case 3: weighted_sum_tile<3>(weights, values, D, d0, out); break;
      case 2: weighted_sum_tile<2>(weights, values, D, d0, out); break;
      default: weighted_sum_tile<1>(weights, values, D, d0, out); break;
    }
  }
}

// Queries q0 .. q0 + QB of head h in batch b: out [B, Lq, H, D].
struct Task {
  const bf16* q;  // [Lq, D] rows of this (b, h), at stride q_stride
  int64_t q_stride;
  const bf16* keys;    // packed
  const bf16* values;  // packed
  const bool* mask;    // [Lq, Lk] of this batch, or null
  int64_t mask_stride;
  bool causal;
  float scale;
  bf16* out;  // row i at out + i * out_stride
  int64_t out_stride;
};

// The keys row i may see end before this (its last visible key + 1; 0: none).
int64_t visible_end(const Task& t, const Shape& S, int64_t i) {
  int64_t end = t.causal ? std::min(S.keys, i + 1) : S.keys;
  if (t.mask) {
    const bool* row = t.mask + i * t.mask_stride;
    while (end > 0 && !row[end - 1]) --end;
  }
  return end;
}

// One past the last key some row of the mask sees, at most ``keys``: a scan of each row's tail back
// to the farthest key found so far, 8 keys a load. The last rows first, as under a causal mask they
// see farthest, so in a prompt without empty slots the other rows' scans stop at once.
int64_t last_seen(const bool* mask, int64_t batches, int64_t batch_stride, int64_t rows, int64_t row_stride, int64_t keys) {
  int64_t end = 0;
  for (int64_t b = 0; b < batches; ++b) {
    for (int64_t i = rows - 1; i >= 0 && end < keys; --i) {
      const bool* row = mask + b * batch_stride + i * row_stride;
      int64_t j = keys;
      for (uint64_t word; j - 8 >= end; j -= 8) {
        std::memcpy(&word, row + j - 8, 8);
        if (word) break;
      }
      while (j > end && !row[j - 1]) --j;
      end = j;  // row[j - 1] is its last seen key, or j == end: none past the farthest so far
    }
  }
  return end;
}

void attend(const Task& t, const Shape& S, int64_t q0) {
  const int64_t rows = std::min(QB, S.Lq - q0), D = S.D;
  alignas(64) float scores[QB * KB];
  alignas(64) bf16 weights[QB * KB];
  std::vector<float> acc(QB * D, 0.0f);
  float top[QB], total[QB];
  int64_t ends[QB], end = 0;
  for (int64_t r = 0; r < QB; ++r) {
    top[r] = -std::numeric_limits<float>::infinity();
    total[r] = 0.0f;
    ends[r] = r < rows ? visible_end(t, S, q0 + r) : 0;
    end = std::max(end, ends[r]);
  }
  const int64_t tiles = (rows + RB - 1) / RB;
  for (int64_t j0 = 0; j0 < end; j0 += KB) {
    const bf16* keys = t.keys + j0 * D;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const bf16* q[RB];
      for (int r = 0; r < RB; ++r) q[r] = t.q + std::min(q0 + tile * RB + r, S.Lq - 1) * t.q_stride;
      score_tile(q, keys, D, scores + tile * RB * KB);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores + r * KB;
      bf16* w = weights + r * KB;
      const bool* mask = t.mask ? t.mask + (q0 + r) * t.mask_stride + j0 : nullptr;
      __mmask16 seen[4], nan = 0;
      __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int v = 0; v < 4; ++v) {
        const int64_t j = j0 + 16 * v, left = std::clamp<int64_t>(ends[r] - j, 0, 16);
        __mmask16 m = (__mmask16)((1u << left) - 1u);
        if (mask && left) m &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(m, mask + 16 * v), _mm_set1_epi8(1));
        seen[v] = m;
        const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, _mm512_loadu_ps(s + 16 * v), _mm512_set1_ps(t.scale));
        _mm512_storeu_ps(s + 16 * v, x);
        best = _mm512_max_ps(best, x);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);  // a NaN score seen (hidden ones are -inf)
      }
      // the running max, NaN once any score seen was (max and its reduction may drop a NaN)
      const float next = nan || std::isnan(top[r]) ? std::numeric_limits<float>::quiet_NaN() : std::max(top[r], _mm512_reduce_max_ps(best));
      if (next == -std::numeric_limits<float>::infinity()) {  // nothing seen yet
        std::memset((void*)w, 0, KB * sizeof(bf16));
        continue;
      }
      const float rescale = std::exp(top[r] - next);  // NaN with next: total and acc turn NaN
      __m512 sum = _mm512_setzero_ps();
      for (int v = 0; v < 4; ++v) {
        const __m512 p = _mm512_maskz_mov_ps(seen[v], exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * v), _mm512_set1_ps(next))));
        const __m256bh pb = _mm512_cvtneps_pbh(p);
        _mm256_storeu_si256((__m256i*)(w + 16 * v), (__m256i)pb);
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(pb));  // the weights as multiplied
      }
      total[r] = total[r] * rescale + _mm512_reduce_add_ps(sum);
      top[r] = next;
      if (rescale != 1.0f)
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= rescale;
    }
    for (int64_t r = rows; r < tiles * RB; ++r) std::memset((void*)(weights + r * KB), 0, KB * sizeof(bf16));
    const bf16* values = t.values + j0 * D;
    for (int64_t tile = 0; tile < tiles; ++tile) weighted_sum(weights + tile * RB * KB, values, D, acc.data() + tile * RB * D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    bf16* o = t.out + (q0 + r) * t.out_stride;
    const float inv = total[r] > 0.0f || std::isnan(total[r]) ? 1.0f / total[r] : 0.0f;  // 0: saw nothing
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + d), _mm512_set1_ps(inv));
      _mm256_storeu_si256((__m256i*)(o + d), (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == at::kBFloat16 &&
                  k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "zen_woq prompt_attention: q, k, v must be bf16 [B, heads, length, D]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "zen_woq prompt_attention: the last dimension must be contiguous");
  Shape S{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), k.size(2)};
  TORCH_CHECK(k.size(0) == S.B && v.size(0) == S.B && v.size(1) == S.Hkv && v.size(2) == S.Lk && k.size(3) == S.D && v.size(3) == S.D,
              "zen_woq prompt_attention: k and v must be [B, kv heads, keys, D] alike");
  TORCH_CHECK(S.Hkv > 0 && S.H % S.Hkv == 0, "zen_woq prompt_attention: heads ", S.H, " not a multiple of kv heads ", S.Hkv);
  TORCH_CHECK(S.D % 16 == 0 && S.D <= 512, "zen_woq prompt_attention: head size ", S.D, " must be a multiple of 16, at most 512");
  const bool* mp = nullptr;
  int64_t mask_batch_stride = 0, mask_stride = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && (mask->size(0) == 1 || mask->size(0) == S.B) &&
                    mask->size(1) == 1 && mask->size(2) == S.Lq && mask->size(3) == S.Lk && mask->stride(3) == 1,
                "zen_woq prompt_attention: mask must be bool [1 or B, 1, q, keys], contiguous in keys");
    mp = mask->const_data_ptr<bool>();
    mask_batch_stride = mask->size(0) == 1 ? 0 : mask->stride(0);
    mask_stride = mask->stride(2);
  }
  if (causal) S.keys = std::min(S.Lk, S.Lq);
  if (mp) S.keys = last_seen(mp, mask->size(0), mask_batch_stride, S.Lq, mask_stride, S.keys);
  at::Tensor out = at::empty({S.B, S.Lq, S.H, S.D}, q.options());
  if (S.keys == 0 || S.Lq == 0) return out.zero_();
  const int64_t padded = (S.keys + KB - 1) / KB * KB;
  at::Tensor packed = at::empty({S.B * S.Hkv, 2, padded * S.D}, k.options());
  bf16* pp = packed.mutable_data_ptr<bf16>();
  const bf16 *qp = q.const_data_ptr<bf16>(), *kp = k.const_data_ptr<bf16>(), *vp = v.const_data_ptr<bf16>();
  at::parallel_for(0, S.B * S.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / S.Hkv, h = bh % S.Hkv;
      pack_keys(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), S, pp + bh * 2 * padded * S.D);
      pack_values(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), S, pp + (bh * 2 + 1) * padded * S.D);
    }
  });
  // Tasks per (b, h) in the order first, last, second, second to last...: any run of them costs
  // about the same under a causal mask, so ATen's even split of the range keeps threads even.
  const int64_t blocks = (S.Lq + QB - 1) / QB;
  bf16* op = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, S.B * S.H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, n = task % blocks, b = bh / S.H, h = bh % S.H;
      const int64_t block = n % 2 == 0 ? n / 2 : blocks - 1 - n / 2;
      const int64_t kvh = h / (S.H / S.Hkv);
      const Task t{qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                   pp + (b * S.Hkv + kvh) * 2 * padded * S.D, pp + ((b * S.Hkv + kvh) * 2 + 1) * padded * S.D,
                   mp ? mp + b * mask_batch_stride : nullptr, mask_stride, causal, (float)scale,
                   op + b * out.stride(0) + h * out.stride(2), out.stride(1)};
      attend(t, S, block * QB);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zen_woq_native, m) {
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(zen_woq_native, CPU, m) {
  m.impl("prompt_attention", &prompt_attention);
}
