// Torch binding for csrc/cuda/topk_kernel.cu ("simple") and csrc/cuda/topk_fast_kernel.cu ("mma", "wgmma"):
// argument checks, buffers, the split merge, the key decoding (the kernels' int64 keys are the same encoding as
// the Triton kernel's) and the sum of the per-split target counts.
// Variants: "simple" (the first CUDA kernel: WMMA with scalar staging for 16-bit weights, exact float32 FMA on CUDA
// cores for float32 weights), "mma" (mma.sync + ldmatrix + cp.async, sm_80+, 16-bit weights), "wgmma" (sm_90a
// image on a compute capability 9.0 GPU, 16-bit weights). "auto" (topk_logits): float32 -> simple; 16-bit with
// 16-byte aligned weight rows -> wgmma where available, else mma. The Python registry names each variant as an
// implementation of its own (impl="cuda:simple", "cuda:mma", "cuda:wgmma"; blens_fast/ops/topk.py), so measured tables
// choose among them; impl="cuda" is "auto".
// One call computes, in one pass over the vocabulary, any of: the top-k list, the bottom-k list and the
// target counts (greater, less, equal with a lower index than the target, the target's own column
// skipped), always with the row's log-sum-exp; see blens_fast/ops/topk_reference.py (Selection, target_counts).
// The optional norm prologue (row_a, row_c, norm_w, norm_b) is applied by "simple" while each hidden tile is
// staged, by "mma" / "wgmma" once per element in a pre-pass into an N x d workspace in the weight's dtype (which
// also converts float32 or unaligned hidden states); hidden may be float32 when the weight is 16-bit (project()
// passes the raw vectors), otherwise it is used in the weight's dtype.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
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
extern "C" int blens_topk_fast_block_rows();
extern "C" int blens_topk_fast_max_k();
extern "C" int blens_topk_fast_available(int variant);
extern "C" int blens_topk_fast_plan(long long N, long long V, long long D, int sms, long long l2_bytes, int* splits,
                                    int* group);
extern "C" int blens_topk_prep_launch(int dtype, int hidden_f32, const void* hidden, long long ldh, const float* row_a,
                                      const float* row_c, const float* norm_w, const float* norm_b, long long N,
                                      long long D, long long Dp, void* X, cudaStream_t stream);
extern "C" int blens_topk_fast_launch(int variant, int dtype, const void* X, long long ldx, const void* W, long long ldw,
                                      const float* bias, const long long* target_ids, const float* target_logits,
                                      long long N, long long V, long long D, int k, int splits, int group,
                                      long long* keys_top, long long* keys_bottom, long long* counts, float* part_m,
                                      float* part_s, long long* floor, cudaStream_t stream);

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

enum Variant { kAuto = 0, kSimple = 1, kMma = 2, kWgmma = 3 };

Variant parse_variant(const std::string& name) {
  if (name == "auto") return kAuto;
  if (name == "simple") return kSimple;
  if (name == "mma") return kMma;
  if (name == "wgmma") return kWgmma;
  TORCH_CHECK(false, "topk_logits_cuda: variant must be 'auto', 'simple', 'mma' or 'wgmma', got '", name, "'");
}

const char* variant_name(Variant v) {
  return v == kSimple ? "simple" : v == kMma ? "mma" : v == kWgmma ? "wgmma" : "auto";
}

// whether a fast variant can run on the current device (cached per device and variant)
bool fast_available(Variant v) {
  if (v != kMma && v != kWgmma) return false;
  const int r = blens_topk_fast_available(v == kMma ? 1 : 2);
  TORCH_CHECK(r >= 0, "topk_logits_cuda: probing the CUDA device failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(-r)));
  return r == 1;
}

// The fast variants read 16-byte chunks of weight rows with cp.async: 16-bit weights, rows 16-byte aligned.
bool weight_fits_fast(const at::Tensor& weight) {
  const auto wt = weight.scalar_type();
  if (wt != at::kBFloat16 && wt != at::kHalf) return false;
  if (weight.dim() != 2 || weight.size(1) == 0) return false;
  const bool rows_contiguous = weight.stride(1) == 1 || weight.size(1) == 1;
  return rows_contiguous && weight.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
}

// What "auto" runs for this weight on the current device.
Variant resolve_auto(const at::Tensor& weight) {
  if (!weight_fits_fast(weight)) return kSimple;
  if (fast_available(kWgmma)) return kWgmma;
  if (fast_available(kMma)) return kMma;
  return kSimple;
}

}  // namespace

// Returns [top_values, top_indices, bottom_values, bottom_indices, logsumexp, target_counts]: values
// float32 N x k (top descending, bottom ascending), indices int64 N x k, logsumexp float32 N,
// target_counts int64 N x 3 (greater, less, equal_lower); undefined tensors (None in Python) for the
// lists not requested and for the counts without target_ids. `variant` as above; `splits` / `group` > 0 override
// the fast variants' plan (vocabulary splits, row tiles per block group; ignored by "simple").
std::vector<at::Tensor> topk_logits_variant(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                            const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& row_a,
                                            const c10::optional<at::Tensor>& row_c,
                                            const c10::optional<at::Tensor>& norm_w,
                                            const c10::optional<at::Tensor>& norm_b, int64_t k, bool top, bool bottom,
                                            const c10::optional<at::Tensor>& target_ids,
                                            const c10::optional<at::Tensor>& target_logits,
                                            const std::string& variant_in, int64_t splits_in, int64_t group_in) {
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

  Variant variant = parse_variant(variant_in);
  if (variant == kAuto) variant = resolve_auto(weight);
  if (variant == kMma || variant == kWgmma) {
    TORCH_CHECK(wt != at::kFloat, "topk_logits_cuda: variant '", variant_name(variant),
                "' takes bfloat16 or float16 weights (float32 runs on 'simple', with exact float32 products)");
    TORCH_CHECK(weight_fits_fast(weight), "topk_logits_cuda: variant '", variant_name(variant),
                "' needs weight rows aligned to 16 bytes (row stride a multiple of 8 elements); use 'simple'");
    TORCH_CHECK(fast_available(variant), "topk_logits_cuda: variant '", variant_name(variant),
                "' is not available on this device/build (wgmma needs a compute capability 9.0 GPU and the "
                "extension built with -gencode=arch=compute_90a,code=sm_90a; mma needs sm_80+)");
  }

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

  int cuda_dev = 0, sms = 0, l2 = 0;
  cudaGetDevice(&cuda_dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cuda_dev);
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, cuda_dev);
  sms = std::max(sms, 1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto ll_ptr = [](at::Tensor& t) {
    return t.defined() ? reinterpret_cast<long long*>(t.data_ptr<int64_t>()) : nullptr;
  };

  int splits = 1;
  at::Tensor keys_top, keys_bottom, part_counts, part_m, part_s;
  if (variant == kSimple) {
    // enough blocks for the machine: split the vocabulary when there are few row tiles
    const int64_t row_tiles = (N + blens_topk_block_rows() - 1) / blens_topk_block_rows();
    int64_t want = std::max<int64_t>(1, (2 * sms + row_tiles - 1) / row_tiles);
    const int64_t max_splits = std::max<int64_t>(1, ((V + 127) / 128) / 8);
    splits = blens_topk_splits(V, static_cast<int>(std::min<int64_t>({want, max_splits, 65535})));
    if (top) keys_top = at::empty({splits, N, k}, i64);
    if (bottom) keys_bottom = at::empty({splits, N, k}, i64);
    if (count) part_counts = at::empty({splits, N, 3}, i64);
    part_m = at::empty({splits, N}, f32);
    part_s = at::empty({splits, N}, f32);
    const int err = blens_topk_launch(
        code, hidden_f32, hidden.data_ptr(), weight.data_ptr(), bias_p, a_p, c_p, nw_p, nb_p,
        count ? reinterpret_cast<const long long*>(ids.data_ptr<int64_t>()) : nullptr,
        count ? tau.data_ptr<float>() : nullptr, N, V, D, hidden.stride(0), weight.stride(0),
        static_cast<int>(top || bottom ? k : 1), splits, ll_ptr(keys_top), ll_ptr(keys_bottom), ll_ptr(part_counts),
        part_m.data_ptr<float>(), part_s.data_ptr<float>(), stream);
    TORCH_CHECK(err == 0, "topk_logits_cuda: kernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
  } else {
    // X: the rows the GEMM streams (weight dtype, 16-byte aligned rows); the prologue / conversion applied once
    at::Tensor X = hidden;
    int64_t ldx = hidden.stride(0);
    const bool in_place = !a_p && !hidden_f32 && hidden.stride(0) % 8 == 0 &&
                          reinterpret_cast<uintptr_t>(hidden.data_ptr()) % 16 == 0;
    if (!in_place) {
      const int64_t Dp = (D + 7) / 8 * 8;
      X = at::empty({N, Dp}, weight.options());
      ldx = Dp;
      const int err = blens_topk_prep_launch(code, hidden_f32, hidden.data_ptr(), hidden.stride(0), a_p, c_p, nw_p,
                                             nb_p, N, D, Dp, X.data_ptr(), stream);
      TORCH_CHECK(err == 0, "topk_logits_cuda: prologue launch failed: ",
                  cudaGetErrorString(static_cast<cudaError_t>(err)));
    }
    int group = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(group_in, 1 << 30)));
    splits = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(splits_in, 65535)));
    blens_topk_fast_plan(N, V, D, sms, l2, &splits, &group);
    if (top) keys_top = at::empty({splits, N, k}, i64);
    if (bottom) keys_bottom = at::empty({splits, N, k}, i64);
    if (count) part_counts = at::empty({splits, N, 3}, i64);
    part_m = at::empty({splits, N}, f32);
    part_s = at::empty({splits, N}, f32);
    at::Tensor floor_keys;  // per list and row, the largest threshold key any split has published
    if (splits > 1 && (top || bottom)) floor_keys = at::zeros({2, N}, i64);
    const int err = blens_topk_fast_launch(
        variant == kMma ? 1 : 2, code, X.data_ptr(), ldx, weight.data_ptr(), weight.stride(0), bias_p,
        count ? reinterpret_cast<const long long*>(ids.data_ptr<int64_t>()) : nullptr,
        count ? tau.data_ptr<float>() : nullptr, N, V, D, static_cast<int>(top || bottom ? k : 1), splits, group,
        ll_ptr(keys_top), ll_ptr(keys_bottom), ll_ptr(part_counts), part_m.data_ptr<float>(),
        part_s.data_ptr<float>(), ll_ptr(floor_keys), stream);
    TORCH_CHECK(err == 0, "topk_logits_cuda: kernel launch failed (variant '", variant_name(variant), "'): ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
  }

  if (top) std::tie(top_v, top_i) = merge_decode(keys_top, N, splits, k, false);
  if (bottom) std::tie(bottom_v, bottom_i) = merge_decode(keys_bottom, N, splits, k, true);
  if (count) counts = splits == 1 ? part_counts[0] : part_counts.sum(0);
  lse.copy_(splits == 1 ? part_m[0] + at::log(part_s[0]) : at::logsumexp(part_m + at::log(part_s), 0));
  return {top_v, top_i, bottom_v, bottom_i, lse, counts};
}

std::vector<at::Tensor> topk_logits_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& row_a,
                                         const c10::optional<at::Tensor>& row_c,
                                         const c10::optional<at::Tensor>& norm_w,
                                         const c10::optional<at::Tensor>& norm_b, int64_t k, bool top, bool bottom,
                                         const c10::optional<at::Tensor>& target_ids,
                                         const c10::optional<at::Tensor>& target_logits) {
  return topk_logits_variant(hidden, weight, bias, row_a, row_c, norm_w, norm_b, k, top, bottom, target_ids,
                             target_logits, "auto", 0, 0);
}

// The variants that can run on the current CUDA device (any weight), best first.
std::vector<std::string> topk_variants() {
  std::vector<std::string> out;
  if (fast_available(kWgmma)) out.push_back("wgmma");
  if (fast_available(kMma)) out.push_back("mma");
  out.push_back("simple");
  return out;
}

// What topk_logits (variant "auto") runs for this weight on its device.
std::string topk_auto_variant(const at::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda(), "topk_auto_variant: weight must be on a CUDA device");
  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor w = weight.dim() == 2 && weight.stride(1) != 1 ? weight.contiguous() : weight;
  return variant_name(resolve_auto(w));
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
  m.def("topk_logits_variant", &topk_logits_variant,
        "topk_logits with the kernel chosen by hand: variant 'auto', 'simple', 'mma' or 'wgmma'; splits / group > 0 "
        "override the fast variants' vocabulary splits and row tiles per block group",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("k"), py::arg("top"), py::arg("bottom"),
        py::arg("target_ids") = py::none(), py::arg("target_logits") = py::none(), py::arg("variant") = "auto",
        py::arg("splits") = 0, py::arg("group") = 0);
  m.def("topk_variants", &topk_variants, "the projection kernel variants usable on the current CUDA device");
  m.def("topk_auto_variant", &topk_auto_variant, "the variant topk_logits runs for this weight",
        py::arg("weight"));
}
