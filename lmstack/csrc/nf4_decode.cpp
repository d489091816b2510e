// NF4 decoding (QLoRA's frozen weights): out[i] = level[nibble(start + i)] * absmax[(start + i) / 64],
// for n consecutive weights from element `start`, in fp32 or bf16. QLoRA decodes every layer's weights
// two or three times per training step; the PyTorch chain (int32 indices, a (n/2, 2) LUT gather, an fp32
// scale, a cast) writes ~8 bytes of temporaries per weight, here only the result is written.
// Byte j holds weights 2j (low nibble) and 2j+1 (high nibble). The product is one fp32 multiply and the
// cast rounds to nearest even: bit-identical to lmstack.model.quant.dequantize_nf4's PyTorch path.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace {

template <typename Out>
void decode_scalar(const uint8_t* codes, const float* absmax, const float* lut, int64_t start, int64_t n, Out* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = start + i;
    const uint8_t b = codes[g >> 1];
    out[i] = static_cast<Out>(lut[(g & 1) ? (b >> 4) : (b & 15)] * absmax[g >> 6]);
  }
}

// 32 weights from 16 bytes (element index even and a multiple of 32 within its 64-block): nibble indices
// in memory order via (lo | hi << 16) per byte viewed as u16 pairs, then a 16-entry table permute.
template <typename Out>
AVX512 void decode32(const uint8_t* bytes, __m512 table, float scale, Out* out) {
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));  // 16 x u32
  const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi32(15));
  const __m512i pairs = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_srli_epi32(w, 4), 16));  // [lo | hi << 16]
  const __m512i i0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(pairs));  // weights 0..15
  const __m512i i1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(pairs, 1));  // weights 16..31
  const __m512 s = _mm512_set1_ps(scale);
  store16(out, _mm512_mul_ps(_mm512_permutexvar_ps(i0, table), s));
  store16(out + 16, _mm512_mul_ps(_mm512_permutexvar_ps(i1, table), s));
}

template <typename Out>
void decode(const uint8_t* codes, const float* absmax, const float* lut, int64_t start, int64_t n, Out* out) {
  // head up to a 32-weight boundary, whole 32-weight groups (vectorized, in parallel), tail
  const int64_t head = std::min<int64_t>(n, (32 - start % 32) % 32);
  decode_scalar(codes, absmax, lut, start, head, out);
  const int64_t groups = (n - head) / 32, s0 = start + head;
  if (cpu_has_avx512()) {
    at::parallel_for(0, groups, 256, [&](int64_t g0, int64_t g1) {
      [&]() AVX512 {
        const __m512 table = _mm512_loadu_ps(lut);
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t e = s0 + g * 32;
          decode32(codes + e / 2, table, absmax[e >> 6], out + head + g * 32);
        }
      }();
    });
  } else {
    at::parallel_for(0, groups, 256, [&](int64_t g0, int64_t g1) {
      decode_scalar(codes, absmax, lut, s0 + g0 * 32, (g1 - g0) * 32, out + head + g0 * 32);
    });
  }
  const int64_t done = head + groups * 32;
  decode_scalar(codes, absmax, lut, start + done, n - done, out + done);
}

}  // namespace

at::Tensor nf4_decode(at::Tensor codes, at::Tensor absmax, at::Tensor lut, int64_t start, int64_t n,
                      at::ScalarType dtype) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "nf4_decode: codes must be contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "nf4_decode: absmax must be contiguous fp32");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "nf4_decode: the codebook must be 16 fp32 values");
  TORCH_CHECK(start >= 0 && n >= 0 && (start + n + 1) / 2 <= codes.numel() && (start + n + 63) / 64 <= absmax.numel(),
              "nf4_decode: weights [", start, ", ", start + n, ") lie outside the codes / scales given");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "nf4_decode: output dtype must be fp32 or bf16");
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const float* l = lut.data_ptr<float>();
  if (dtype == at::kFloat)
    decode(c, a, l, start, n, out.data_ptr<float>());
  else
    decode(c, a, l, start, n, out.data_ptr<at::BFloat16>());
  return out;
}
