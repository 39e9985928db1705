// Torch binding for csrc/cuda/topk_kernel.cu: argument checks, buffers, the split merge and the
// key decoding (the kernel's int64 keys are the same encoding as the Triton kernel's).
// The optional norm prologue (row_a, row_c, norm_w, norm_b) is applied inside the kernel while the
// hidden tile is staged; hidden may be float32 when the weight is 16-bit (project() passes the raw
// vectors), otherwise it is used in the weight's dtype.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

extern "C" int blens_topk_launch(int dtype, int hidden_f32, const void* hidden, const void* weight, const float* bias,
                                 const float* row_a, const float* row_c, const float* norm_w, const float* norm_b,
                                 long long N, long long V, long long D, long long stride_hn, long long stride_wv,
                                 int k, int largest, int splits, long long* keys, float* part_m, float* part_s,
                                 cudaStream_t stream);
extern "C" int blens_topk_splits(long long V, int splits);
extern "C" int blens_topk_block_rows();

namespace {

const float* opt_ptr(const c10::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

}  // namespace

std::vector<at::Tensor> topk_logits_cuda(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& row_a,
                                         const c10::optional<at::Tensor>& row_c,
                                         const c10::optional<at::Tensor>& norm_w,
                                         const c10::optional<at::Tensor>& norm_b, int64_t k, bool largest) {
  TORCH_CHECK(hidden_in.is_cuda() && weight_in.is_cuda(), "topk_logits_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2, "topk_logits_cuda: hidden must be N x d, weight V x d");
  const int64_t N = hidden_in.size(0), D = hidden_in.size(1), V = weight_in.size(0);
  TORCH_CHECK(weight_in.size(1) == D, "topk_logits_cuda: hidden has ", D, " features but weight has ",
              weight_in.size(1), " columns");
  TORCH_CHECK(k >= 1 && k <= V, "topk_logits_cuda: k=", k, " must be between 1 and V=", V);
  TORCH_CHECK(V < (int64_t(1) << 32), "topk_logits_cuda: V must be below 2^32");
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto wt = weight_in.scalar_type();
  int code;
  if (wt == at::kFloat) code = 0;
  else if (wt == at::kBFloat16) code = 1;
  else if (wt == at::kHalf) code = 2;
  else TORCH_CHECK(false, "topk_logits_cuda: weight must be float32, bfloat16 or float16, got ", wt);

  // rows contiguous in d (copies only when they are not: N x d and V x d are small next to N x V)
  at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  at::Tensor hidden = hidden_in;
  if (hidden.scalar_type() != wt) hidden = hidden.to(at::kFloat);
  if (hidden.stride(1) != 1) hidden = hidden.contiguous();
  const int hidden_f32 = (hidden.scalar_type() == at::kFloat && wt != at::kFloat) ? 1 : 0;

  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor values = at::empty({N, k}, f32), lse = at::empty({N}, f32);
  at::Tensor indices = at::empty({N, k}, hidden.options().dtype(at::kLong));
  if (N == 0) return {values, indices, lse};

  at::Tensor keep_b, keep_a, keep_c, keep_w, keep_nb;
  const float* bias_p = opt_ptr(bias, keep_b);
  const float* a_p = opt_ptr(row_a, keep_a);
  const float* c_p = opt_ptr(row_c, keep_c);
  const float* nw_p = opt_ptr(norm_w, keep_w);
  const float* nb_p = opt_ptr(norm_b, keep_nb);
  TORCH_CHECK(!a_p || c_p, "topk_logits_cuda: row_a needs row_c");

  // enough blocks for the machine: split the vocabulary when there are few row tiles
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  sms = std::max(sms, 1);
  const int64_t row_tiles = (N + blens_topk_block_rows() - 1) / blens_topk_block_rows();
  int64_t want = std::max<int64_t>(1, (2 * sms + row_tiles - 1) / row_tiles);
  const int64_t max_splits = std::max<int64_t>(1, ((V + 127) / 128) / 8);
  const int splits = blens_topk_splits(V, static_cast<int>(std::min<int64_t>({want, max_splits, 65535})));

  at::Tensor keys = at::empty({splits, N, k}, hidden.options().dtype(at::kLong));
  at::Tensor part_m = at::empty({splits, N}, f32), part_s = at::empty({splits, N}, f32);
  const int err = blens_topk_launch(code, hidden_f32, hidden.data_ptr(), weight.data_ptr(), bias_p, a_p, c_p, nw_p,
                                    nb_p, N, V, D, hidden.stride(0), weight.stride(0), static_cast<int>(k),
                                    largest ? 1 : 0, splits, reinterpret_cast<long long*>(keys.data_ptr<int64_t>()), part_m.data_ptr<float>(),
                                    part_s.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "topk_logits_cuda: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));

  // sort the (unsorted) k slots and merge the splits: int64 keys order by value, then lower index
  at::Tensor top = std::get<0>(at::topk(keys.permute({1, 0, 2}).reshape({N, splits * k}), k, 1, true, true));
  at::Tensor hi = at::bitwise_right_shift(top, 32).to(at::kInt);
  indices.copy_(4294967295LL - at::bitwise_and(top, 0xFFFFFFFFLL));
  at::Tensor bits = at::where(hi < 0, at::bitwise_xor(hi, 0x7FFFFFFF), hi);
  at::Tensor v = bits.view(at::kFloat);
  values.copy_(largest ? v : -v);
  lse.copy_(splits == 1 ? part_m[0] + at::log(part_s[0]) : at::logsumexp(part_m + at::log(part_s), 0));
  return {values, indices, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blens_fast CUDA kernels: fused top-k vocabulary projection";
  m.def("topk_logits", &topk_logits_cuda, "fused top-k of hidden @ weight.T (+ bias) with online logsumexp",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("k"), py::arg("largest"));
}
