// Torch binding for csrc/cpu/topk_kernel.cpp: argument checks, dtype/layout conversions, the output tensors, and the
// Python module blens_fast._C (topk_logits, target_logits). Reference: blens_fast/ops/topk_reference.py.
#include <torch/extension.h>

#include <vector>

#include "topk_kernel.h"

namespace {

using blens_fast::cpu::DType;
using blens_fast::cpu::Matrix;

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "topk_logits_cpu: unsupported dtype ", t);
  }
}

// hidden as the kernel reads it: float32, bfloat16 or float16 (another floating dtype is converted to float32),
// any strides.
at::Tensor hidden_operand(const at::Tensor& hidden) {
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "topk_logits_cpu: hidden must be floating point");
  const auto t = hidden.scalar_type();
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf ? hidden : hidden.to(at::kFloat);
}

Matrix matrix(const at::Tensor& t) {
  return Matrix{t.data_ptr(), kernel_dtype(t.scalar_type()), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

void check_operands(const at::Tensor& hidden, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), name, ": tensors must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, name, ": hidden must be N x d and weight V x d, got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(1), name, ": hidden has ", hidden.size(1), " features but weight has ",
              weight.size(1), " columns");
  const auto wdtype = weight.scalar_type();
  TORCH_CHECK(wdtype == at::kFloat || wdtype == at::kBFloat16 || wdtype == at::kHalf, name,
              ": weight must be float32, bfloat16 or float16, got ", wdtype);
  TORCH_CHECK(weight.size(0) < (int64_t(1) << 31), name, ": V=", weight.size(0), " must be below 2^31");
}

// A float32 contiguous copy (or the tensor itself) of an optional per-row / per-column vector of `n` elements.
at::Tensor float_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!given(t)) return at::Tensor();
  TORCH_CHECK(t->numel() == n, "topk_logits_cpu: ", what, " has ", t->numel(), " elements, expected ", n);
  return t->to(at::kFloat).contiguous();
}

const float* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The norm prologue's tensors, kept alive by the caller, and their pointers.
struct PrologueArgs {
  at::Tensor a, c, norm_w, norm_b;
  blens_fast::cpu::Prologue pointers() const { return {ptr(a), ptr(c), ptr(norm_w), ptr(norm_b)}; }
};

PrologueArgs prologue_args(const c10::optional<at::Tensor>& row_a, const c10::optional<at::Tensor>& row_c,
                           const c10::optional<at::Tensor>& norm_w, const c10::optional<at::Tensor>& norm_b,
                           int64_t N, int64_t d) {
  PrologueArgs p;
  if (!given(row_a)) return p;
  p.a = float_vector(row_a, N, "row_a");
  p.c = float_vector(row_c, N, "row_c");
  p.norm_w = float_vector(norm_w, d, "norm_w");
  p.norm_b = float_vector(norm_b, d, "norm_b");
  return p;
}

}  // namespace

// hidden: N x d (any float dtype, any strides); weight: V x d (float32/bf16/fp16, any strides);
// bias: V or undefined; row_a/row_c (N, float32) + norm_w/norm_b (d) = the optional norm prologue
// x = (h * a - c) * norm_w + norm_b, rounded to weight's dtype; target_ids (N, int64) + target_logits (N,
// float32) or undefined. Returns [top values [N,k] float32, top indices [N,k] int64, the same two for the
// bottom list, logsumexp [N] float32, target counts [N,3] int64 (greater, less, equal with a lower index)];
// lists not asked for and the counts without targets are undefined tensors (None in Python).
// simd=false runs the portable scalar code (the same bits; for tests).
std::vector<at::Tensor> topk_logits_cpu(const at::Tensor& hidden_in, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias_opt,
                                        const c10::optional<at::Tensor>& row_a_opt,
                                        const c10::optional<at::Tensor>& row_c_opt,
                                        const c10::optional<at::Tensor>& norm_w_opt,
                                        const c10::optional<at::Tensor>& norm_b_opt, int64_t k, bool top, bool bottom,
                                        const c10::optional<at::Tensor>& target_ids_opt,
                                        const c10::optional<at::Tensor>& target_logits_opt, int64_t block_rows,
                                        int64_t block_vocab, int64_t gemm_mode, bool simd) {
  check_operands(hidden_in, weight, "topk_logits_cpu");
  const at::Tensor hidden = hidden_operand(hidden_in);
  const int64_t N = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= V, "topk_logits_cpu: k=", k, " must be between 1 and V=", V);
  TORCH_CHECK(gemm_mode >= 0 && gemm_mode <= 2, "topk_logits_cpu: gemm_mode must be 0, 1 or 2, got ", gemm_mode);
  const bool count = given(target_ids_opt);

  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor top_v, top_i, bottom_v, bottom_i, counts, target_ids, target_logits;
  if (top) top_v = at::empty({N, k}, f32), top_i = at::empty({N, k}, i64);
  if (bottom) bottom_v = at::empty({N, k}, f32), bottom_i = at::empty({N, k}, i64);
  at::Tensor lse = at::empty({N}, f32);
  if (count) {
    TORCH_CHECK(given(target_logits_opt), "topk_logits_cpu: target_ids needs target_logits");
    target_ids = target_ids_opt->to(at::kLong).contiguous();
    target_logits = target_logits_opt->to(at::kFloat).contiguous();
    TORCH_CHECK(target_ids.numel() == N && target_logits.numel() == N,
                "topk_logits_cpu: target_ids and target_logits must have N elements");
    counts = at::zeros({N, 3}, i64);
  }
  if (N == 0) return {top_v, top_i, bottom_v, bottom_i, lse, counts};
  const at::Tensor bias = float_vector(bias_opt, V, "bias");
  const PrologueArgs prologue = prologue_args(row_a_opt, row_c_opt, norm_w_opt, norm_b_opt, N, d);

  blens_fast::cpu::Plan plan;
  plan.k = k;
  plan.block_rows = block_rows;
  plan.block_vocab = block_vocab;
  plan.gemm_mode = static_cast<int>(gemm_mode);
  plan.simd = simd;
  plan.threads = at::get_num_threads();
  blens_fast::cpu::Outputs out;
  if (top) out.top_values = top_v.data_ptr<float>(), out.top_indices = top_i.data_ptr<int64_t>();
  if (bottom) out.bottom_values = bottom_v.data_ptr<float>(), out.bottom_indices = bottom_i.data_ptr<int64_t>();
  out.logsumexp = lse.data_ptr<float>();
  if (count) out.target_counts = counts.data_ptr<int64_t>();
  blens_fast::cpu::project(matrix(hidden), matrix(weight), ptr(bias), prologue.pointers(),
                           count ? target_ids.data_ptr<int64_t>() : nullptr, count ? ptr(target_logits) : nullptr,
                           plan, out);
  return {top_v, top_i, bottom_v, bottom_i, lse, counts};
}

// Each row's logit for its target token (N float32), bit for bit what topk_logits_cpu computes for that column with
// the exact float32 GEMM (gemm_mode 1, or 0 without a native 16-bit GEMM). Arguments as in topk_logits_cpu.
at::Tensor target_logits_cpu(const at::Tensor& hidden_in, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias_opt, const c10::optional<at::Tensor>& row_a_opt,
                             const c10::optional<at::Tensor>& row_c_opt, const c10::optional<at::Tensor>& norm_w_opt,
                             const c10::optional<at::Tensor>& norm_b_opt, const at::Tensor& target_ids_in, bool simd) {
  check_operands(hidden_in, weight, "target_logits_cpu");
  const at::Tensor hidden = hidden_operand(hidden_in);
  const int64_t N = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  const at::Tensor target_ids = target_ids_in.to(at::kLong).contiguous();
  TORCH_CHECK(target_ids.numel() == N, "target_logits_cpu: target_ids has ", target_ids.numel(),
              " elements, expected N=", N);
  if (N) {
    const auto range = at::aminmax(target_ids);
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < V,
                "target_logits_cpu: target ids must lie in [0, ", V, ")");
  }
  const at::Tensor bias = float_vector(bias_opt, V, "bias");
  const PrologueArgs prologue = prologue_args(row_a_opt, row_c_opt, norm_w_opt, norm_b_opt, N, d);
  at::Tensor out = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
  blens_fast::cpu::target_logits(matrix(hidden), matrix(weight), ptr(bias), prologue.pointers(),
                                 target_ids.data_ptr<int64_t>(), simd, out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blens_fast CPU kernels: fused one-pass vocabulary projection (top-k, bottom-k, target ranks)";
  m.def("topk_logits", &topk_logits_cpu,
        "one pass over hidden @ weight.T (+ bias): top-k, bottom-k, logsumexp and target counts",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("k"), py::arg("top"), py::arg("bottom"),
        py::arg("target_ids"), py::arg("target_logits"), py::arg("block_rows") = 0, py::arg("block_vocab") = 0,
        py::arg("gemm_mode") = 0, py::arg("simd") = true);
  m.def("target_logits", &target_logits_cpu, "each row's logit for its target token, as topk_logits computes it",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("target_ids"), py::arg("simd") = true);
}
