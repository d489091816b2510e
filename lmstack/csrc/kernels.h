// The kernels' entry points, shared by the Python module (module.cpp) and the decode loop (decode_layers.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t window);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_mixed(torch::Tensor x, std::optional<torch::Tensor> y,
                                                            torch::Tensor weight, double eps, at::ScalarType out_dtype);
torch::Tensor silu_mul_bf16_fp32(torch::Tensor gate_up);
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t D);
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                            const std::vector<torch::Tensor>& in_norm, const std::vector<torch::Tensor>& post_norm,
                            torch::Tensor final_norm, const std::vector<torch::Tensor>& qkv_w,
                            const std::vector<std::optional<torch::Tensor>>& qkv_b, const std::vector<torch::Tensor>& o_w,
                            const std::vector<std::optional<torch::Tensor>>& o_b, const std::vector<torch::Tensor>& gu_w,
                            const std::vector<std::optional<torch::Tensor>>& gu_b, const std::vector<torch::Tensor>& down_w,
                            const std::vector<std::optional<torch::Tensor>>& down_b, int64_t mode,
                            const std::vector<torch::Tensor>& k_pools, const std::vector<torch::Tensor>& v_pools,
                            torch::Tensor slots, torch::Tensor block_tables, torch::Tensor ctx_lens, int64_t H,
                            int64_t Hkv, int64_t D, double eps, double scale, int64_t window);
