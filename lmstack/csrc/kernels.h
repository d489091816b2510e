// The kernels' entry points, shared by the Python module (module.cpp) and the decode loop (decode_layers.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                                  at::Tensor block_tables, at::Tensor ctx_lens, double scale, int64_t window);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(at::Tensor x, at::Tensor y, at::Tensor weight, double eps);
at::Tensor silu_mul(at::Tensor gate_up);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_mixed(at::Tensor x, std::optional<at::Tensor> y,
                                                      at::Tensor weight, double eps, at::ScalarType out_dtype);
at::Tensor silu_mul_bf16_fp32(at::Tensor gate_up);
void rope_(at::Tensor x, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t D);
at::Tensor nf4_decode(at::Tensor codes, at::Tensor absmax, at::Tensor lut, int64_t start, int64_t n,
                      at::ScalarType dtype);
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
                         int64_t Hkv, int64_t D, double eps, double scale, int64_t window);
