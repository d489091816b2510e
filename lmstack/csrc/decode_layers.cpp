// Every decoder layer of one pure-decode engine step in a single call: the CPU counterpart of replaying
// a captured CUDA graph. A decode step of a small model is mostly interpreter overhead: the Python
// forward runs ~20 module calls and tensor ops per layer, ~0.2-0.3 ms of Python per layer on these
// machines against ~0.3 ms of weight streaming (SmolLM2-135M shape, 32 sequences). Here the same ops
// run back to back from C++, with the same kernels and the same rounding points as
// model/transformer.py's eager path (tests/test_cpu_decode.py compares the two bit for bit):
//   h = rms_norm(x)                          (the previous layer's residual add is fused in: add_rms_norm)
//   qkv = h Wqkv^T (+ b)   RoPE in place on the q and k heads
//   k, v -> the paged pool at their slots;  o = paged_decode_attention(q, pool)
//   x, h = add_rms_norm(x, o Wo^T (+ b))
//   delta = silu_mul(h Wgu^T (+ b)) Wdown^T (+ b)      (added to x by the next layer's norm)
// Linears go through the same oneDNN op the Python path calls (mkldnn::_linear_pointwise, via the
// dispatcher), on oneDNN-packed bf16 copies when the engine has them. With fp32 activations and bf16
// linears (RL rollouts from an fp32 policy) the casts around each linear move into the norm and silu
// kernels, which round once where the eager chain casts: 28.2 -> 24.4 ms per 32-sequence SmolLM2 step.
#include <ATen/core/dispatch/Dispatcher.h>

#include "kernels.h"
#include "simd.h"

namespace {

// How a projection is computed; mirrors model/layers.py `_project` / `linear`.
enum LinearMode : int64_t {
  kPlain = 0,       // at::linear (no oneDNN)
  kOneDNN = 1,      // oneDNN inner product on the plain weight (fp32 inference)
  kPacked = 2,      // oneDNN on a packed bf16 weight, bf16 activations
  kPackedFp32 = 3,  // packed bf16 weight, fp32 activations (`project_bf16` and the mixed loop below)
};

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> st;  // the boxed call stack (torch::jit::Stack)
  st.reserve(6);
  st.emplace_back(x);
  st.emplace_back(w);
  st.emplace_back(b.has_value() ? c10::IValue(*b) : c10::IValue());
  st.emplace_back(std::string("none"));
  st.emplace_back(c10::List<std::optional<at::Scalar>>());
  st.emplace_back(c10::IValue());
  op.callBoxed(&st);
  return st[0].toTensor();
}

// kPlain / kOneDNN / kPacked: activations and result in the model's dtype
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t mode) {
  return mode == kPlain ? at::linear(x, w, b) : onednn_linear(x, w, b);
}

// kPackedFp32: x (bf16, or fp32 rounded here) times the packed bf16 weight. The bf16 product comes back
// as it is when there is no bias (its consumers widen it exactly, inside their kernels), else widened
// and biased in fp32, as layers._project does.
at::Tensor project_bf16(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  at::Tensor y = onednn_linear(x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16), w, std::nullopt);
  return b.has_value() ? y.to(at::kFloat).add_(*b) : y;
}

// pool row slots[s] <- src row s (n values from column `col` of a row-major (S, width) tensor), converted
// to the pool's dtype with round-to-nearest-even (what Tensor.to does)
template <typename T, typename KV>
void write_rows(const T* src, int64_t src_stride, KV* pool, const int64_t* slots, int64_t S, int64_t n) {
  for (int64_t s = 0; s < S; ++s) {
    const T* r = src + s * src_stride;
    KV* dst = pool + slots[s] * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<KV>(to_f32(r[i]));
  }
}

void write_kv(const at::Tensor& qkv, int64_t col, int64_t n, at::Tensor& pool, const at::Tensor& slots) {
  const int64_t S = qkv.size(0), stride = qkv.stride(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  auto go = [&](auto* src) {
    if (pool.scalar_type() == at::kFloat)
      write_rows(src + col, stride, pool.data_ptr<float>(), sl, S, n);
    else
      write_rows(src + col, stride, pool.data_ptr<at::BFloat16>(), sl, S, n);
  };
  if (qkv.scalar_type() == at::kFloat)
    go(qkv.data_ptr<float>());
  else
    go(qkv.data_ptr<at::BFloat16>());
}

}  // namespace

// x (S, C): the step's token embeddings; cos, sin (S, D) in x's dtype. Per layer l: norm weights (q_norm /
// k_norm: Qwen3's per-head norms, empty lists for models without them), the fused
// q/k/v, o, fused gate/up and down weights (as `mode` says: plain, or oneDNN-packed) with optional biases,
// and the layer's K/V pools (num_blocks, block_size, Hkv, D). slots (S,): pool slot of each new token;
// block_tables (S, nblk), ctx_lens (S,) as paged_decode_attention takes them. Returns the final-norm
// hidden states (S, C).
at::Tensor decode_layers(at::Tensor x, at::Tensor cos, at::Tensor sin,
                         const std::vector<at::Tensor>& in_norm, const std::vector<at::Tensor>& post_norm,
                         at::Tensor final_norm, const std::vector<at::Tensor>& q_norm,
                         const std::vector<at::Tensor>& k_norm, const std::vector<at::Tensor>& qkv_w,
                         const std::vector<std::optional<at::Tensor>>& qkv_b, const std::vector<at::Tensor>& o_w,
                         const std::vector<std::optional<at::Tensor>>& o_b, const std::vector<at::Tensor>& gu_w,
                         const std::vector<std::optional<at::Tensor>>& gu_b, const std::vector<at::Tensor>& down_w,
                         const std::vector<std::optional<at::Tensor>>& down_b, int64_t mode,
                         const std::vector<at::Tensor>& k_pools, const std::vector<at::Tensor>& v_pools,
                         at::Tensor slots, at::Tensor block_tables, at::Tensor ctx_lens, int64_t H,
                         int64_t Hkv, int64_t D, double eps, double scale, int64_t window) {
  const size_t L = in_norm.size();
  TORCH_CHECK(post_norm.size() == L && qkv_w.size() == L && qkv_b.size() == L && o_w.size() == L && o_b.size() == L &&
                  gu_w.size() == L && gu_b.size() == L && down_w.size() == L && down_b.size() == L &&
                  k_pools.size() == L && v_pools.size() == L,
              "one entry per layer in every list");
  TORCH_CHECK(q_norm.size() == k_norm.size() && (q_norm.empty() || q_norm.size() == L), "q_norm / k_norm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be (S, C) contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0), "slots");
  const int64_t S = x.size(0);
  const auto act = x.scalar_type();
  // RoPE in place on qkv's q and k heads, the new k / v into layer l's pools, then attention in the pool's
  // dtype (bf16 K/V under an fp32 forward with bf16 linears): (S, H * D) in the pool's dtype
  auto attend = [&](size_t l, at::Tensor& qkv) {
    if (!q_norm.empty()) {  // Qwen3: RMSNorm over each q and k head, before RoPE
      at::Tensor q = qkv.narrow(1, 0, H * D), k = qkv.narrow(1, H * D, Hkv * D);
      q.copy_(rms_norm(q.reshape({S * H, D}), q_norm[l], eps).view({S, H * D}));
      k.copy_(rms_norm(k.reshape({S * Hkv, D}), k_norm[l], eps).view({S, Hkv * D}));
    }
    rope_(qkv, cos, sin, H + Hkv, D);
    at::Tensor kp = k_pools[l], vp = v_pools[l];
    TORCH_CHECK(kp.is_contiguous() && vp.is_contiguous() && kp.size(2) * kp.size(3) == Hkv * D, "pool layout");
    write_kv(qkv, H * D, Hkv * D, kp, slots);
    write_kv(qkv, (H + Hkv) * D, Hkv * D, vp, slots);
    at::Tensor q = qkv.narrow(1, 0, H * D).to(kp.scalar_type()).contiguous().view({S, H, D});
    return paged_decode_attention(q, kp, vp, block_tables, ctx_lens, scale, window).view({S, H * D});
  };
  at::Tensor delta;  // the previous layer's MLP output, not yet added to x
  if (mode == kPackedFp32) {
    // fp32 activations, bf16 linears (RL rollouts from an fp32 policy). Same arithmetic as the loop below;
    // the casts around each linear happen inside the norm / silu kernels (or not at all: the bf16
    // attention output is what the o projection would round to anyway).
    const auto bf16 = at::kBFloat16;
    auto pending = [&]() { return delta.defined() ? std::optional<at::Tensor>(delta) : std::nullopt; };
    for (size_t l = 0; l < L; ++l) {
      at::Tensor s, h;
      std::tie(s, h) = add_rms_norm_mixed(x, pending(), in_norm[l], eps, bf16);
      if (s.defined()) x = s;  // the residual sum (undefined before the first layer: x is the embedding)
      at::Tensor qkv = project_bf16(h, qkv_w[l], qkv_b[l]).to(at::kFloat).contiguous();  // RoPE runs in fp32
      at::Tensor a = project_bf16(attend(l, qkv), o_w[l], o_b[l]);
      std::tie(x, h) = add_rms_norm_mixed(x, a, post_norm[l], eps, bf16);
      at::Tensor gu = project_bf16(h, gu_w[l], gu_b[l]);
      delta = project_bf16(gu.scalar_type() == bf16 ? silu_mul_bf16_fp32(gu) : silu_mul(gu), down_w[l], down_b[l]);
    }
    return std::get<1>(add_rms_norm_mixed(x, pending(), final_norm, eps, at::kFloat));
  }
  for (size_t l = 0; l < L; ++l) {
    at::Tensor h;
    if (delta.defined())
      std::tie(x, h) = add_rms_norm(x, delta, in_norm[l], eps);
    else
      h = rms_norm(x, in_norm[l], eps);
    at::Tensor qkv = project(h, qkv_w[l], qkv_b[l], mode);  // (S, (H + 2 Hkv) D)
    at::Tensor a = project(attend(l, qkv).to(act), o_w[l], o_b[l], mode);
    std::tie(x, h) = add_rms_norm(x, a, post_norm[l], eps);
    delta = project(silu_mul(project(h, gu_w[l], gu_b[l], mode)), down_w[l], down_b[l], mode);
  }
  if (!delta.defined()) return rms_norm(x, final_norm, eps);
  return std::get<1>(add_rms_norm(x, delta, final_norm, eps));
}
