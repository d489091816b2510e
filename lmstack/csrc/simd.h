// Helpers shared by lmstack's CPU kernels: bf16 <-> fp32 and AVX-512 loads and exp.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) {  // bf16 is the top half of an fp32
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// AVX-512 code is compiled for these features and only called after a runtime CPU check, so the
// extension still loads (and uses its portable C++ loops) on CPUs without them.
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,fma")))

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// exp by range reduction (x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial, then scalef by 2^n):
// relative error ~2e-7, below fp32 softmax noise; valid for x <= 88 (larger x overflows to inf).
AVX512 inline __m512 exp16(__m512 x) {
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

// fp32 -> bf16 rounding to nearest even (what at::BFloat16(float) and PyTorch's casts do), 16 at a time;
// NaN stays NaN.
AVX512 inline __m512i bf16_bits32(__m512 v) {  // rounded value in the top 16 bits of each lane
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// round-trip through the storage type: identity for fp32, bf16 rounding for bf16 (replays the
// intermediate roundings a chain of bf16 PyTorch ops makes)
AVX512 inline __m512 rnd(__m512 v, float) { return v; }
AVX512 inline __m512 rnd(__m512 v, at::BFloat16) {
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits32(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
AVX512 inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits32(v), 16)));
}

inline float rnd1(float v, float) { return v; }
inline float rnd1(float v, at::BFloat16) { return static_cast<float>(at::BFloat16(v)); }

inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}

}  // namespace
