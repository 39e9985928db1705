// Torch binding for csrc/cuda/topk_kernel.cu: argument checks, buffers, the split merge, the key
// decoding (the kernel's int64 keys are the same encoding as the Triton kernel's) and the sum of the
// per-split target counts.
// One call computes, in one pass over the vocabulary, any of: the top-k list, the bottom-k list and the
// target counts (greater, less, equal with a lower index than the target, the target's own column
// skipped), always with the row's log-sum-exp; see blens_fast/ops/reference.py (Lists, target_counts).
// The optional norm prologue (row_a, row_c, norm_w, norm_b) is applied inside the kernel while the
// hidden tile is staged; hidden may be float32 when the weight is 16-bit (project() passes the raw
// vectors), otherwise it is used in the weight's dtype.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <utility>
#include <vector>

extern "C" int blens_topk_launch(int dtype, int hidden_f32, const void* hidden, const void* weight, const float* bias,
                                 const float* row_a, const float* row_c, const float* norm_w, const float* norm_b,
                                 const long long* target_ids, const float* target_logits, long long N, long long V,
                                 long long D, long long stride_hn, long long stride_wv, int k, int splits,
                                 long long* keys_top, long long* keys_bottom, long long* counts, float* part_m,
                                 float* part_s, cudaStream_t stream);
extern "C" int blens_topk_splits(long long V, int splits);
extern "C" int blens_topk_block_rows();
extern "C" int blens_topk_max_k();

namespace {

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

const float* opt_ptr(const c10::optional<at::Tensor>& t, const at::Device& device, const char* name,
                     at::Tensor& keep) {
  if (!given(t)) return nullptr;
  TORCH_CHECK(t->device() == device, "topk_logits_cuda: ", name, " is on ", t->device(), ", expected ", device);
  keep = t->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// The k best of every row over all splits' (unsorted) slots, sorted: int64 keys order by value, then
// lower index. Decoded to (values, indices); negate for the bottom list (keys of the negated logits).
std::pair<at::Tensor, at::Tensor> merge_decode(const at::Tensor& keys, int64_t N, int64_t splits, int64_t k,
                                               bool negate) {
  at::Tensor best = std::get<0>(at::topk(keys.permute({1, 0, 2}).reshape({N, splits * k}), k, 1, true, true));
  at::Tensor indices = 4294967295LL - at::bitwise_and(best, 0xFFFFFFFFLL);
  at::Tensor hi = at::bitwise_right_shift(best, 32).to(at::kInt);
  at::Tensor bits = at::where(hi < 0, at::bitwise_xor(hi, 0x7FFFFFFF), hi);
  at::Tensor v = bits.view(at::kFloat);
  return {negate ? at::rsub(v, 0) : v.clone(), indices};  // 0 - v: a zero logit stays +0.0, as in the top list
}

}  // namespace

// Returns [top_values, top_indices, bottom_values, bottom_indices, logsumexp, target_counts]: values
// float32 N x k (top descending, bottom ascending), indices int64 N x k, logsumexp float32 N,
// target_counts int64 N x 3 (greater, less, equal_lower); undefined tensors (None in Python) for the
// lists not requested and for the counts without target_ids.
std::vector<at::Tensor> topk_logits_cuda(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& row_a,
                                         const c10::optional<at::Tensor>& row_c,
                                         const c10::optional<at::Tensor>& norm_w,
                                         const c10::optional<at::Tensor>& norm_b, int64_t k, bool top, bool bottom,
                                         const c10::optional<at::Tensor>& target_ids,
                                         const c10::optional<at::Tensor>& target_logits) {
  TORCH_CHECK(hidden_in.is_cuda() && weight_in.is_cuda(), "topk_logits_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(hidden_in.device() == weight_in.device(), "topk_logits_cuda: hidden is on ", hidden_in.device(),
              " but weight is on ", weight_in.device());
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2, "topk_logits_cuda: hidden must be N x d, weight V x d");
  const int64_t N = hidden_in.size(0), D = hidden_in.size(1), V = weight_in.size(0);
  TORCH_CHECK(weight_in.size(1) == D, "topk_logits_cuda: hidden has ", D, " features but weight has ",
              weight_in.size(1), " columns");
  TORCH_CHECK(V >= 1, "topk_logits_cuda: the vocabulary is empty");
  TORCH_CHECK(V < (int64_t(1) << 32), "topk_logits_cuda: V must be below 2^32");
  const bool count = given(target_ids);
  TORCH_CHECK(count == given(target_logits), "topk_logits_cuda: target_ids and target_logits go together");
  TORCH_CHECK(top || bottom || count, "topk_logits_cuda: nothing to compute (top=False, bottom=False, no targets)");
  if (top || bottom) {
    const int64_t max_k = std::min<int64_t>(V, blens_topk_max_k());
    TORCH_CHECK(k >= 1 && k <= max_k, "topk_logits_cuda: k=", k, " must be between 1 and ", max_k,
                " (V=", V, ", at most ", blens_topk_max_k(), " on the GPU)");
  }
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto dev = hidden_in.device();
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

  at::Tensor ids, tau;
  if (count) {
    TORCH_CHECK(target_ids->dim() == 1 && target_ids->size(0) == N && target_logits->dim() == 1 &&
                    target_logits->size(0) == N,
                "topk_logits_cuda: target_ids and target_logits must have one entry per row (", N, "), got ",
                target_ids->sizes(), " and ", target_logits->sizes());
    TORCH_CHECK(target_ids->device() == dev && target_logits->device() == dev,
                "topk_logits_cuda: target_ids and target_logits must be on ", dev);
    TORCH_CHECK(!target_ids->is_floating_point() && !target_ids->is_complex(),
                "topk_logits_cuda: target_ids must be integer token ids, got ", target_ids->scalar_type());
    ids = target_ids->to(at::kLong).contiguous();
    tau = target_logits->to(at::kFloat).contiguous();
  }

  auto f32 = hidden.options().dtype(at::kFloat), i64 = hidden.options().dtype(at::kLong);
  at::Tensor top_v, top_i, bottom_v, bottom_i, counts;  // undefined (None) unless requested
  at::Tensor lse = at::empty({N}, f32);
  if (N == 0) {
    if (top) std::tie(top_v, top_i) = std::make_pair(at::empty({0, k}, f32), at::empty({0, k}, i64));
    if (bottom) std::tie(bottom_v, bottom_i) = std::make_pair(at::empty({0, k}, f32), at::empty({0, k}, i64));
    if (count) counts = at::empty({0, 3}, i64);
    return {top_v, top_i, bottom_v, bottom_i, lse, counts};
  }

  at::Tensor keep_b, keep_a, keep_c, keep_w, keep_nb;
  const float* bias_p = opt_ptr(bias, dev, "bias", keep_b);
  const float* a_p = opt_ptr(row_a, dev, "row_a", keep_a);
  const float* c_p = opt_ptr(row_c, dev, "row_c", keep_c);
  const float* nw_p = opt_ptr(norm_w, dev, "norm_w", keep_w);
  const float* nb_p = opt_ptr(norm_b, dev, "norm_b", keep_nb);
  TORCH_CHECK(!a_p || c_p, "topk_logits_cuda: row_a needs row_c");

  // enough blocks for the machine: split the vocabulary when there are few row tiles
  int cuda_dev = 0, sms = 0;
  cudaGetDevice(&cuda_dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cuda_dev);
  sms = std::max(sms, 1);
  const int64_t row_tiles = (N + blens_topk_block_rows() - 1) / blens_topk_block_rows();
  int64_t want = std::max<int64_t>(1, (2 * sms + row_tiles - 1) / row_tiles);
  const int64_t max_splits = std::max<int64_t>(1, ((V + 127) / 128) / 8);
  const int splits = blens_topk_splits(V, static_cast<int>(std::min<int64_t>({want, max_splits, 65535})));

  // per-split results: unsorted key slots per list, (max, sum exp), counts
  at::Tensor keys_top, keys_bottom, part_counts;
  if (top) keys_top = at::empty({splits, N, k}, i64);
  if (bottom) keys_bottom = at::empty({splits, N, k}, i64);
  if (count) part_counts = at::empty({splits, N, 3}, i64);
  at::Tensor part_m = at::empty({splits, N}, f32), part_s = at::empty({splits, N}, f32);
  auto ll_ptr = [](at::Tensor& t) {
    return t.defined() ? reinterpret_cast<long long*>(t.data_ptr<int64_t>()) : nullptr;
  };
  const int err = blens_topk_launch(
      code, hidden_f32, hidden.data_ptr(), weight.data_ptr(), bias_p, a_p, c_p, nw_p, nb_p,
      count ? reinterpret_cast<const long long*>(ids.data_ptr<int64_t>()) : nullptr,
      count ? tau.data_ptr<float>() : nullptr, N, V, D, hidden.stride(0), weight.stride(0),
      static_cast<int>(top || bottom ? k : 1), splits, ll_ptr(keys_top), ll_ptr(keys_bottom), ll_ptr(part_counts),
      part_m.data_ptr<float>(), part_s.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "topk_logits_cuda: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));

  if (top) std::tie(top_v, top_i) = merge_decode(keys_top, N, splits, k, false);
  if (bottom) std::tie(bottom_v, bottom_i) = merge_decode(keys_bottom, N, splits, k, true);
  if (count) counts = splits == 1 ? part_counts[0] : part_counts.sum(0);
  lse.copy_(splits == 1 ? part_m[0] + at::log(part_s[0]) : at::logsumexp(part_m + at::log(part_s), 0));
  return {top_v, top_i, bottom_v, bottom_i, lse, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blens_fast CUDA kernels: fused top-k / bottom-k vocabulary projection with target counts";
  m.def("topk_logits", &topk_logits_cuda,
        "one pass over hidden @ weight.T (+ bias, optional norm prologue): top-k and/or bottom-k lists, the online "
        "logsumexp and the target counts (greater, less, equal_lower); returns [top_values, top_indices, "
        "bottom_values, bottom_indices, logsumexp, target_counts] with None for what was not requested",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("k"), py::arg("top"), py::arg("bottom"),
        py::arg("target_ids") = py::none(), py::arg("target_logits") = py::none());
}
