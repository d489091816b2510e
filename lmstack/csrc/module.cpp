// The Python module of lmstack's CPU kernels (built by lmstack/cpu_kernels.py).
#include <torch/extension.h>

#include <tuple>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t window);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t D);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "PagedAttention decode over a block pool");
  m.def("rms_norm", &rms_norm, "RMSNorm (HF Llama's rounding order)");
  m.def("add_rms_norm", &add_rms_norm, "residual add, then RMSNorm of the sum");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over [gate | up]");
  m.def("rope_", &rope_, "rotary embedding in place on the first heads of each row");
}
