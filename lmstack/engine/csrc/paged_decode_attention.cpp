// PagedAttention decode kernel for the CPU (Kwon et al. 2023, "Efficient Memory Management for
// Large Language Model Serving with PagedAttention", section 4.1): every decoding sequence attends
// with its one new query over its keys and values *where they lie* in the block pool, following
// its block table. The PyTorch path gathers each sequence's blocks into a padded contiguous copy
// first; that copy (read + write + read again) and the padding cost more than the attention itself
// at decode sizes (models/quickstart, 64 sequences: gather 4.5 ms + SDPA 8 ms per step).
//
// One work item = one (sequence, KV head): its G = H / Hkv query heads share every key and value
// row they read (GQA without copies). Per item: scores s[g, t] = scale * q_g . k_t for the visible
// positions t (the last `window` ones under a sliding window), a softmax in fp32, then
// o_g = sum_t p[g, t] v_t / sum_t p[g, t]. Accumulation is fp32 whatever the storage (fp32 or bf16).
// Each item's arithmetic depends on its own sequence only, so results do not change with batch
// composition.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) {  // bf16 is the top half of an fp32
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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


// ---- AVX-512 path (head_dim a multiple of 16, at most 256): the same arithmetic, explicitly
// vectorized; exp by range reduction (x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, then
// scalef by 2^n): relative error ~2e-7, below fp32 softmax noise.
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,fma")))

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

AVX512 inline __m512 exp16(__m512 x) {  // x <= 0
  const __m512 log2e = _mm512_set1_ps(1.44269504089f), ln2 = _mm512_set1_ps(0.693147180560f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp(-104) underflows to 0 in fp32 anyway
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2, x);
  __m512 p = _mm512_set1_ps(1.f / 720);  // Taylor series of e^r, Horner form
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

template <typename KV>
AVX512 void attend_one_avx512(const float* q, const KV* k_pool, const KV* v_pool, const int64_t* blocks, int64_t start,
                              int64_t len, int64_t block_size, int64_t row_stride, int64_t G, int64_t D,
                              float* scores, float* out) {
  const int64_t n = len - start, V = D / 16;
  __m512 kv[16];
  for (int64_t i = 0; i < n; ++i) {  // scores (G, n)
    const int64_t t = start + i;
    const KV* kr = k_pool + (blocks[t / block_size] * block_size + t % block_size) * row_stride;
    for (int64_t j = 0; j < V; ++j) kv[j] = load16(kr + 16 * j);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m512 acc = _mm512_mul_ps(load16(qg), kv[0]);
      for (int64_t j = 1; j < V; ++j) acc = _mm512_fmadd_ps(load16(qg + 16 * j), kv[j], acc);
      scores[g * n + i] = _mm512_reduce_add_ps(acc);
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax, fp32
    float* s = scores + g * n;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
    float m = _mm512_reduce_max_ps(mv);
    for (; i < n; ++i) m = s[i] > m ? s[i] : m;
    const __m512 mb = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), mb));
      _mm512_storeu_ps(s + i, e);
      sv = _mm512_add_ps(sv, e);
    }
    if (i < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), mb));
      _mm512_mask_storeu_ps(s + i, k, e);
      sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sv);
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
  for (int64_t j = 0; j < G * D; j += 16) _mm512_storeu_ps(out + j, _mm512_setzero_ps());
  for (int64_t i = 0; i < n; ++i) {  // out (G, D) = P (G, n) @ V (n, D)
    const int64_t t = start + i;
    const KV* vr = v_pool + (blocks[t / block_size] * block_size + t % block_size) * row_stride;
    for (int64_t j = 0; j < V; ++j) kv[j] = load16(vr + 16 * j);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + i]);
      float* og = out + g * D;
      for (int64_t j = 0; j < V; ++j) _mm512_storeu_ps(og + 16 * j, _mm512_fmadd_ps(p, kv[j], _mm512_loadu_ps(og + 16 * j)));
    }
  }
}

template <typename KV>
void run(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
         const torch::Tensor& block_tables, const torch::Tensor& ctx_lens, double scale, int64_t window,
         torch::Tensor& out) {
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_pool.size(1), Hkv = k_pool.size(2), G = H / Hkv;
  const int64_t nblk = block_tables.size(1), row_stride = Hkv * D;
  const KV* kp = k_pool.data_ptr<KV>();
  const KV* vp = v_pool.data_ptr<KV>();
  const KV* qp = q.data_ptr<KV>();
  KV* op = out.data_ptr<KV>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  const bool avx512 = D % 16 == 0 && D <= 256 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
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
      (avx512 ? attend_one_avx512<KV> : attend_one<KV>)(qf.data(), kp + h * D, vp + h * D, bt + s * nblk, start,
                                                        len, block_size, row_stride, G, D, scores.data(), of.data());
      store<KV>(op + (s * H + h * G) * D, of.data(), G * D);
    }
  });
}

}  // namespace

// q (S, H, D); k_pool, v_pool (num_blocks, block_size, Hkv, D), same dtype as q (float32 or bfloat16);
// block_tables (S, max_blocks) int64, padded; ctx_lens (S,) int64 >= 1; window <= 0: no sliding window.
// Returns (S, H, D) in q's dtype.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, double scale,
                                     int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && v_pool.scalar_type() == k_pool.scalar_type(),
              "q, k_pool and v_pool must share a dtype");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && q.size(2) == k_pool.size(3), "head layout mismatch");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && ctx_lens.scalar_type() == torch::kLong, "int64 tables");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  ctx_lens = ctx_lens.contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat) {
    run<float>(q, k_pool, v_pool, block_tables, ctx_lens, scale, window, out);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
    run<at::BFloat16>(q, k_pool, v_pool, block_tables, ctx_lens, scale, window, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "PagedAttention decode over a block pool (CPU)");
}
