// The Python module of lmstack's CPU kernels (built by lmstack/cpu_kernels.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "PagedAttention decode over a block pool");
  m.def("rms_norm", &rms_norm, "RMSNorm (HF Llama's rounding order)");
  m.def("add_rms_norm", &add_rms_norm, "residual add, then RMSNorm of the sum");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over [gate | up]");
  m.def("rope_", &rope_, "rotary embedding in place on the first heads of each row");
  m.def("decode_layers", &decode_layers, "every decoder layer of a pure-decode step in one call");
  m.def("nf4_decode", &nf4_decode, "n NF4 weights from element start, in fp32 or bf16");
}
