// PagedAttention decode kernel for the CPU (Kwon et al. 2023, "Efficient Memory Management for
// Large Language Model Serving with PagedAttention", section 4.1): every decoding sequence attends
// with its one new query over its keys and values *where they lie* in the block pool, following
// its block table. The PyTorch path gathers each sequence's blocks into a padded contiguous copy
// first; that copy (read + write + read again) and the padding cost more than the attention itself
// at decode sizes (a SmolLM2-135M-shape GRPO rollout, 64 sequences: gather 4.5 ms + SDPA 8 ms per step).
//
// One work item = one (sequence, KV head): its G = H / Hkv query heads share every key and value
// row they read (GQA without copies). Per item: scores s[g, t] = scale * q_g . k_t for the visible
// positions t (the last `window` ones under a sliding window), a softmax in fp32, then
// o_g = sum_t p[g, t] v_t / sum_t p[g, t]. Accumulation is fp32 whatever the storage (fp32 or bf16).
// Each item's arithmetic depends on its own sequence only, so results do not change with batch
// composition.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

template <typename T>
inline void store(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// One (sequence, KV head): q (G, D) already scaled, fp32; out (G, D) fp32.
template <typename KV>
__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_one(const float* q, const KV* k_pool, const KV* v_pool, const int64_t* blocks, int64_t start,
                int64_t len, int64_t block_size, int64_t row_stride, int64_t G, int64_t D, float* scores,
                float* out) {
  const int64_t n = len - start;
  for (int64_t i = 0; i < n; ++i) {  // scores (G, n)
    const int64_t t = start + i;
    const KV* kr = k_pool + (blocks[t / block_size] * block_size + t % block_size) * row_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += qg[d] * to_f32(kr[d]);
      scores[g * n + i] = acc;
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax over each query head's row, fp32
    float* s = scores + g * n;
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      s[i] = std::exp(s[i] - m);
      sum += s[i];
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < n; ++i) s[i] *= inv;
  }
  std::fill(out, out + G * D, 0.f);
  for (int64_t i = 0; i < n; ++i) {  // out (G, D) = P (G, n) @ V (n, D)
    const int64_t t = start + i;
    const KV* vr = v_pool + (blocks[t / block_size] * block_size + t % block_size) * row_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * n + i];
      float* og = out + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] += p * to_f32(vr[d]);
    }
  }
}


// ---- AVX-512 path (head_dim 32, 64 or 128): the same arithmetic, explicitly vectorized.
// Four horizontal sums at once: [sum(a0), sum(a1), sum(a2), sum(a3)] in ~13 instructions instead of
// ~4 x 8 for four separate _mm512_reduce_add_ps.
AVX512 inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // per 128-bit lane: [a0_0+a0_2, a1_0+a1_2, a0_1+a0_3, a1_1+a1_3], the same for a2, a3
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  // per 128-bit lane: that lane's sums of a0, a1, a2, a3
  __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0x4E));  // + the other 256-bit half
  u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0xB1));  // + the neighbouring 128-bit lane
  return _mm512_castps512_ps128(u);
}

// DV = head_dim / 16 vectors per row (a compile-time count, so rows and accumulators stay in registers).
template <typename KV, int DV>
AVX512 void attend_one_avx512(const float* q, const KV* k_pool, const KV* v_pool, const int64_t* blocks, int64_t start,
                              int64_t len, int64_t block_size, int64_t row_stride, int64_t G, int64_t D,
                              float* scores, float* out) {
  const int64_t n = len - start;
  auto row = [&](const KV* pool, int64_t t) {
    return pool + (blocks[t / block_size] * block_size + t % block_size) * row_stride;
  };
  // Prefetch: a sequence's K/V rows are scattered over blocks, and a head's slice of a row is a short
  // strided piece, so the hardware prefetcher barely helps once the pool is out of cache (measured 6.6
  // GB/s). K rows are requested PF positions ahead, and each V row as its K row is used, so the P.V pass
  // below finds V in cache.
  constexpr int64_t PF = 32;
  constexpr int kLines = DV * 16 * static_cast<int>(sizeof(KV)) / 64;  // cache lines per head row
  auto prefetch = [&](const KV* r) {
    for (int c = 0; c < kLines; ++c) _mm_prefetch(reinterpret_cast<const char*>(r) + 64 * c, _MM_HINT_T0);
  };
  for (int64_t t = 0; t < std::min<int64_t>(PF, n); ++t) prefetch(row(k_pool, start + t));
  // scores (G, n): four positions at a time, their dot products reduced together
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m512 k[4][DV];
    for (int r = 0; r < 4; ++r) {
      if (i + r + PF < n) prefetch(row(k_pool, start + i + r + PF));
      prefetch(row(v_pool, start + i + r));
      const KV* kr = row(k_pool, start + i + r);
      for (int j = 0; j < DV; ++j) k[r][j] = load16(kr + 16 * j);
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m512 acc[4];
      for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_ps();
      for (int j = 0; j < DV; ++j) {
        const __m512 qv = _mm512_loadu_ps(qg + 16 * j);
        for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(qv, k[r][j], acc[r]);
      }
      _mm_storeu_ps(scores + g * n + i, hsum4(acc[0], acc[1], acc[2], acc[3]));
    }
  }
  for (; i < n; ++i) {
    prefetch(row(v_pool, start + i));
    const KV* kr = row(k_pool, start + i);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < DV; ++j) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * j), load16(kr + 16 * j), acc);
      scores[g * n + i] = _mm512_reduce_add_ps(acc);
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax, fp32
    float* s = scores + g * n;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    float m = _mm512_reduce_max_ps(mv);
    for (; j < n; ++j) m = s[j] > m ? s[j] : m;
    const __m512 mb = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mb));
      _mm512_storeu_ps(s + j, e);
      sv = _mm512_add_ps(sv, e);
    }
    if (j < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mb));
      _mm512_mask_storeu_ps(s + j, k, e);
      sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sv);
    for (j = 0; j < n; ++j) s[j] *= inv;
  }
  // out (G, D) = P (G, n) @ V (n, D): up to GB query heads' accumulators held in registers while
  // the V rows stream past once per group of heads
  constexpr int GB = DV <= 4 ? 4 : 2;
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const int gb = static_cast<int>(std::min<int64_t>(GB, G - g0));
    __m512 acc[GB][DV];
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const KV* vr = row(v_pool, start + t);
      __m512 v[DV];
      for (int j = 0; j < DV; ++j) v[j] = load16(vr + 16 * j);
      for (int g = 0; g < GB; ++g) {
        if (g >= gb) break;
        const __m512 p = _mm512_set1_ps(scores[(g0 + g) * n + t]);
        for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
      }
    }
    for (int g = 0; g < gb; ++g)
      for (int j = 0; j < DV; ++j) _mm512_storeu_ps(out + (g0 + g) * D + 16 * j, acc[g][j]);
  }
}

template <typename KV>
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
         const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale, int64_t window,
         at::Tensor& out) {
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_pool.size(1), Hkv = k_pool.size(2), G = H / Hkv;
  const int64_t nblk = block_tables.size(1), row_stride = Hkv * D;
  const KV* kp = k_pool.data_ptr<KV>();
  const KV* vp = v_pool.data_ptr<KV>();
  const KV* qp = q.data_ptr<KV>();
  KV* op = out.data_ptr<KV>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  const bool avx512 = cpu_has_avx512();
  // the explicitly vectorized kernel for head_dim 32 / 64 / 128 (every supported family), else portable C++
  decltype(&attend_one<KV>) fn = &attend_one<KV>;
  if (avx512 && D == 32) fn = &attend_one_avx512<KV, 2>;
  if (avx512 && D == 64) fn = &attend_one_avx512<KV, 4>;
  if (avx512 && D == 128) fn = &attend_one_avx512<KV, 8>;
  int64_t max_len = 1;
  for (int64_t s = 0; s < S; ++s) max_len = std::max(max_len, lens[s]);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), of(G * D), scores(G * max_len);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / Hkv, h = item % Hkv;
      const int64_t len = lens[s];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const KV* qs = qp + (s * H + h * G) * D;  // the G query heads of KV head h are adjacent
      for (int64_t i = 0; i < G * D; ++i) qf[i] = to_f32(qs[i]) * static_cast<float>(scale);
      fn(qf.data(), kp + h * D, vp + h * D, bt + s * nblk, start, len, block_size, row_stride, G, D, scores.data(),
         of.data());
      store<KV>(op + (s * H + h * G) * D, of.data(), G * D);
    }
  });
}

}  // namespace

// q (S, H, D); k_pool, v_pool (num_blocks, block_size, Hkv, D), same dtype as q (float32 or bfloat16);
// block_tables (S, max_blocks) int64, padded; ctx_lens (S,) int64 >= 1; window <= 0: no sliding window.
// Returns (S, H, D) in q's dtype.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                                  at::Tensor block_tables, at::Tensor ctx_lens, double scale,
                                  int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && v_pool.scalar_type() == k_pool.scalar_type(),
              "q, k_pool and v_pool must share a dtype");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && q.size(2) == k_pool.size(3), "head layout mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k_pool, v_pool, block_tables, ctx_lens, scale, window, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    run<at::BFloat16>(q, k_pool, v_pool, block_tables, ctx_lens, scale, window, out);
  }
  return out;
}
