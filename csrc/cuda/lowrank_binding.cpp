// CUDA implementation of torch.ops.blens_fast.lowrank_sketch_update (schema defined in
// csrc/cpu/lowrank_binding.cpp). Checks arguments, allocates the thin scratch products and calls the
// raw-pointer kernels of lowrank_kernel.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

namespace blens_fast {
namespace lowrank {
cudaError_t sketch_update_launch(int dtype, const void* a, const void* b, const int64_t* offsets,
                                 const float* right, const float* left_t, float* c, float* d, float* y, float* w,
                                 float* norms, int64_t n, int64_t p, int64_t q, int64_t s1, int64_t s2,
                                 int64_t num_examples, cudaStream_t stream);
}  // namespace lowrank

namespace {

at::Tensor lowrank_sketch_update_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                      const at::Tensor& right, const at::Tensor& left_t, const at::Tensor& y,
                                      const at::Tensor& w) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
              "lowrank_sketch_update: a and b must be 2-D with one row per token each, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "lowrank_sketch_update: a and b must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  int dtype = -1;
  switch (a.scalar_type()) {
    case at::kFloat: dtype = 0; break;
    case at::kHalf: dtype = 1; break;
    case at::kBFloat16: dtype = 2; break;
    default: TORCH_CHECK(false, "lowrank_sketch_update (CUDA): a and b must be float32, float16 or bfloat16, got ",
                         a.scalar_type());
  }
  const int64_t n = a.size(0), p = a.size(1), q = b.size(1);
  TORCH_CHECK(right.dim() == 2 && right.size(0) == q && left_t.dim() == 2 && left_t.size(0) == p,
              "lowrank_sketch_update: right must be q x s1 and left_t p x s2, got ", right.sizes(), " and ",
              left_t.sizes());
  const int64_t s1 = right.size(1), s2 = left_t.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == p && y.size(1) == s1 && w.dim() == 2 && w.size(0) == s2 &&
                  w.size(1) == q,
              "lowrank_sketch_update: y must be p x s1 and w s2 x q, got ", y.sizes(), " and ", w.sizes());
  for (const at::Tensor* t : {&right, &left_t, &y, &w}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "lowrank_sketch_update: right, left_t, y and w must be float32");
  }
  TORCH_CHECK(y.is_contiguous() && w.is_contiguous(), "lowrank_sketch_update: y and w must be contiguous");
  for (const at::Tensor* t : {&a, &b, &right, &left_t, &y, &w}) {
    TORCH_CHECK(t->is_cuda() && t->device() == a.device(), "lowrank_sketch_update (CUDA): all tensors must be on ",
                a.device());
  }
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "lowrank_sketch_update: offsets must be a 1-D int64 tensor of length E + 1");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor rc = right.contiguous(), lc = left_t.contiguous();
  const at::Tensor off = offsets.to(a.device(), at::kLong).contiguous();
  const int64_t num_examples = off.size(0) - 1;
  const auto fopts = a.options().dtype(at::kFloat);
  at::Tensor c = at::empty({n, s1}, fopts);
  at::Tensor d = at::empty({n, s2}, fopts);
  at::Tensor norms = at::empty({num_examples}, fopts);
  const cudaError_t err = lowrank::sketch_update_launch(
      dtype, ac.data_ptr(), bc.data_ptr(), off.data_ptr<int64_t>(), rc.data_ptr<float>(), lc.data_ptr<float>(),
      c.data_ptr<float>(), d.data_ptr<float>(), y.data_ptr<float>(), w.data_ptr<float>(), norms.data_ptr<float>(), n,
      p, q, s1, s2, num_examples, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lowrank_sketch_update (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return norms.to(at::kDouble).clamp_min(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(blens_fast, CUDA, m) {
  m.impl("lowrank_sketch_update", &lowrank_sketch_update_cuda);
}

}  // namespace blens_fast
