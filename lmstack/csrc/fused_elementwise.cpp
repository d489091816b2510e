// Fused elementwise ops for CPU inference: each replaces a chain of 2-8 PyTorch ops (and their
// dispatch, temporaries and passes over memory) in every decoder layer:
//   rms_norm      x.float() * rsqrt(mean(x^2) + eps) -> cast -> * weight   (HF Llama's order)
//   add_rms_norm  the residual add x + y, then rms_norm of the sum (the new residual is returned too)
//   silu_mul      silu(gate) * up over a fused gate/up projection's output
//   rope_         x * cos + rotate_half(x) * sin, in place on the q and k heads of a fused qkv output
// Every intermediate is rounded to the storage dtype exactly where the PyTorch chain rounds it
// (bf16: round to nearest even): bf16 results equal the eager ops' (RMSNorm up to the rare one-ulp
// flip from fp32 summation order), fp32 ones within the last bit of rsqrt / exp.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "simd.h"

namespace {

// x (R, C) rows at stride xs; y (optional) rows at stride ys; s (new residual, optional) and out (R, C).
// T is the activations' dtype (x, s, w; the rounding points); y and out may be wider / narrower copies
// (Y, O: see add_rms_norm_mixed).
template <typename T, typename Y = T, typename O = T>
void norm_rows(const T* x, int64_t xs, const Y* y, int64_t ys, T* s, const T* w, O* out, int64_t R, int64_t C,
               float eps) {
  const bool avx = cpu_has_avx512();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * xs;
      T* sr = s ? s + r * C : nullptr;
      O* orow = out + r * C;
      if (y) {  // the residual sum, rounded as x + y in T would be
        const Y* yr = y + r * ys;
        for (int64_t c = 0; c < C; ++c) sr[c] = static_cast<T>(to_f32(xr[c]) + to_f32(yr[c]));
        xr = sr;
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += to_f32(xr[c]) * to_f32(xr[c]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
      int64_t c = 0;
      if (avx) c = [&]() AVX512 {
        int64_t k = 0;
        const __m512 iv = _mm512_set1_ps(inv);
        for (; k + 16 <= C; k += 16)
          store16(orow + k, _mm512_mul_ps(load16(w + k), rnd(_mm512_mul_ps(load16(xr + k), iv), T())));
        return k;
      }();
      for (; c < C; ++c) orow[c] = static_cast<O>(to_f32(w[c]) * rnd1(to_f32(xr[c]) * inv, T()));
    }
  });
}

// T: the dtype silu(gate) is rounded to before the product (the eager chain's dtype); In / Out: storage
// of gate_up and the result (see silu_mul_bf16_fp32)
template <typename T, typename In = T, typename Out = T>
void silu_mul_rows(const In* gu, int64_t gs, Out* out, int64_t R, int64_t I) {
  const bool avx = cpu_has_avx512();
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const In* g = gu + r * gs;
      const In* u = g + I;
      Out* o = out + r * I;
      int64_t i = 0;
      if (avx) i = [&]() AVX512 {
        int64_t k = 0;
        const __m512 one = _mm512_set1_ps(1.f);
        for (; k + 16 <= I; k += 16) {
          const __m512 gv = load16(g + k);
          const __m512 sv = rnd(_mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)))), T());
          store16(o + k, _mm512_mul_ps(sv, load16(u + k)));
        }
        return k;
      }();
      for (; i < I; ++i) {
        const float gv = to_f32(g[i]);
        o[i] = static_cast<Out>(rnd1(gv / (1.f + std::exp(-gv)), T()) * to_f32(u[i]));
      }
    }
  });
}

template <typename T>
void rope_rows(T* x, int64_t xs, const T* cos, const T* sin, int64_t R, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  const bool avx = cpu_has_avx512() && half % 16 == 0;
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* c = cos + r * D;
      const T* s = sin + r * D;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + r * xs + h * D;
        if (avx) {
          [&]() AVX512 {
            for (int64_t d = 0; d < half; d += 16) {
              const __m512 x1 = load16(v + d), x2 = load16(v + half + d);
              const __m512 a = rnd(_mm512_mul_ps(x1, load16(c + d)), T());
              const __m512 b = rnd(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load16(s + d)), T());
              const __m512 a2 = rnd(_mm512_mul_ps(x2, load16(c + half + d)), T());
              const __m512 b2 = rnd(_mm512_mul_ps(x1, load16(s + half + d)), T());
              store16(v + d, _mm512_add_ps(a, b));
              store16(v + half + d, _mm512_add_ps(a2, b2));
            }
          }();
          continue;
        }
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = to_f32(v[d]), x2 = to_f32(v[half + d]);
          v[d] = static_cast<T>(rnd1(x1 * to_f32(c[d]), T()) + rnd1(-x2 * to_f32(s[d]), T()));
          v[half + d] = static_cast<T>(rnd1(x2 * to_f32(c[half + d]), T()) + rnd1(x1 * to_f32(s[half + d]), T()));
        }
      }
    }
  });
}

// float32 or bfloat16 (check_rows): run `body` with scalar_t bound to the tensor's type
#define DISPATCH_F32_BF16(dtype, ...) \
  if ((dtype) == at::kFloat) {        \
    using scalar_t = float;           \
    __VA_ARGS__();                    \
  } else {                            \
    using scalar_t = at::BFloat16;    \
    __VA_ARGS__();                    \
  }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, ": float32 or bfloat16");
}

}  // namespace

// x (R, C) -> (R, C); weight (C,) in x's dtype
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(), "weight");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  DISPATCH_F32_BF16(x.scalar_type(), [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), static_cast<const scalar_t*>(nullptr), 0, nullptr,
                        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1),
                        static_cast<float>(eps));
  });
  return out;
}

// (x + y, rms_norm(x + y))
std::tuple<at::Tensor, at::Tensor> add_rms_norm(at::Tensor x, at::Tensor y, at::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(), "x and y must match");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(), "weight");
  auto s = at::empty({x.size(0), x.size(1)}, x.options());
  auto out = at::empty_like(s);
  DISPATCH_F32_BF16(x.scalar_type(), [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), y.data_ptr<scalar_t>(), y.stride(0), s.data_ptr<scalar_t>(),
                        weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return {s, out};
}

// gate_up (R, 2I) = [gate | up] -> silu(gate) * up (R, I)
at::Tensor silu_mul(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up needs an even width");
  const int64_t I = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), I}, gate_up.options());
  DISPATCH_F32_BF16(gate_up.scalar_type(), [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), gate_up.stride(0), out.data_ptr<scalar_t>(), gate_up.size(0), I);
  });
  return out;
}

// in place: the first `heads` heads (head_dim D) of every row of x (R, >= heads * D); cos, sin (R, D)
void rope_(at::Tensor x, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t D) {
  check_rows(x, "x");
  TORCH_CHECK(D % 2 == 0 && x.size(1) >= heads * D, "head layout");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == x.size(0) * D && sin.numel() == cos.numel() &&
              cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "cos / sin");
  DISPATCH_F32_BF16(x.scalar_type(), [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                        x.size(0), heads, D);
  });
}

// The fp32-activation forward with bf16 linears (decode_layers' kPackedFp32 mode) rounds a normed row to
// bf16 right before each linear and widens a bf16 linear output right after it. These two entry points
// fold those casts into the kernels; both casts are exact or round once, so results equal the eager
// chain's.

// x (R, C) float32; y (optional) float32 or bfloat16; weight float32. Returns (x + y, or undefined
// without y; rms_norm of it rounded to out_dtype).
std::tuple<at::Tensor, at::Tensor> add_rms_norm_mixed(at::Tensor x, std::optional<at::Tensor> y,
                                                      at::Tensor weight, double eps, at::ScalarType out_dtype) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.numel() == x.size(1), "float32 x and weight");
  auto out = at::empty({x.size(0), x.size(1)}, x.options().dtype(out_dtype));
  at::Tensor s;
  if (y.has_value()) {
    check_rows(*y, "y");
    TORCH_CHECK(y->sizes() == x.sizes(), "x and y must match");
    s = at::empty_like(out, x.options());
  }
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* sp = y.has_value() ? s.data_ptr<float>() : nullptr;
  const int64_t R = x.size(0), C = x.size(1), ys = y.has_value() ? y->stride(0) : 0;
  auto go = [&](auto* yp) {
    if (out_dtype == at::kBFloat16)
      norm_rows<float>(xp, x.stride(0), yp, ys, sp, wp, out.data_ptr<at::BFloat16>(), R, C, static_cast<float>(eps));
    else
      norm_rows<float>(xp, x.stride(0), yp, ys, sp, wp, out.data_ptr<float>(), R, C, static_cast<float>(eps));
  };
  if (!y.has_value())
    go(static_cast<const float*>(nullptr));
  else if (y->scalar_type() == at::kBFloat16)
    go(y->data_ptr<at::BFloat16>());
  else
    go(y->data_ptr<float>());
  return {s, out};
}

// gate_up (R, 2I) bfloat16 -> silu(gate) * up (R, I) bfloat16, computed in float32 with no rounding in
// between: what the eager fp32 chain gives after widening gate_up and before rounding for the next linear.
at::Tensor silu_mul_bf16_fp32(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.size(1) % 2 == 0, "bfloat16 gate_up of even width");
  const int64_t I = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), I}, gate_up.options());
  silu_mul_rows<float>(gate_up.data_ptr<at::BFloat16>(), gate_up.stride(0), out.data_ptr<at::BFloat16>(),
                       gate_up.size(0), I);
  return out;
}
