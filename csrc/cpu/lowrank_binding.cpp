// Torch binding of the fused low-rank accumulation on the CPU: per-example gradient norms from the factors (the
// raw-pointer kernel of lowrank_kernel.cpp), and the streaming sketches of the summed gradient (two thin products
// each), without forming any d_in x d_out matrix.
//
//   norms_sq[e] = sum((A_e A_e^T) * (B_e B_e^T))      (A_e = rows offsets[e]:offsets[e+1] of A)
//   y += A^T (B right)                                  (p x s1)
//   w += (A left_t)^T B                                 (s2 x q)
//
// Registered as torch.ops.blens_fast.lowrank_sketch_update (schema below; a TORCH_LIBRARY_FRAGMENT,
// so it coexists with the other blens_fast ops whatever file defines the namespace). The CUDA
// implementation of the same schema lives in csrc/cuda/lowrank_binding.cpp.
// Reference: blens_fast/ops/lowrank_reference.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lowrank_kernel.h"

namespace blens_fast {
namespace {

void check_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, const at::Tensor& right,
                const at::Tensor& left_t, const at::Tensor& y, const at::Tensor& w) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "lowrank_sketch_update: a and b must be 2-D, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0), "lowrank_sketch_update: a has ", a.size(0), " rows but b has ", b.size(0));
  TORCH_CHECK(a.is_floating_point() && b.is_floating_point(), "lowrank_sketch_update: a and b must be floating point");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "lowrank_sketch_update: offsets must be a 1-D int64 tensor of length E + 1");
  TORCH_CHECK(right.dim() == 2 && right.size(0) == b.size(1), "lowrank_sketch_update: right must be q x s1 with q = ",
              b.size(1), ", got ", right.sizes());
  TORCH_CHECK(left_t.dim() == 2 && left_t.size(0) == a.size(1),
              "lowrank_sketch_update: left_t must be p x s2 with p = ", a.size(1), ", got ", left_t.sizes());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == a.size(1) && y.size(1) == right.size(1),
              "lowrank_sketch_update: y must be ", a.size(1), " x ", right.size(1), ", got ", y.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == left_t.size(1) && w.size(1) == b.size(1),
              "lowrank_sketch_update: w must be ", left_t.size(1), " x ", b.size(1), ", got ", w.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  right.scalar_type() == at::kFloat && left_t.scalar_type() == at::kFloat,
              "lowrank_sketch_update: right, left_t, y and w must be float32");
  TORCH_CHECK(y.is_contiguous() && w.is_contiguous(), "lowrank_sketch_update: y and w must be contiguous");
}

at::Tensor lowrank_sketch_update_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                     const at::Tensor& right, const at::Tensor& left_t, const at::Tensor& y, const at::Tensor& w) {
  check_args(a, b, offsets, right, left_t, y, w);
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && y.device().is_cpu() && w.device().is_cpu(),
              "lowrank_sketch_update (CPU): all tensors must be on the CPU");
  const int64_t n = a.size(0), p = a.size(1), q = b.size(1);
  const at::Tensor af = a.to(at::kFloat).contiguous();
  const at::Tensor bf = b.to(at::kFloat).contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t num_examples = off.size(0) - 1;
  const int64_t* bounds = off.data_ptr<int64_t>();
  TORCH_CHECK(bounds[0] == 0 && bounds[num_examples] == n, "lowrank_sketch_update: offsets must start at 0 and end at ",
              n, ", got ", bounds[0], " and ", bounds[num_examples]);
  for (int64_t e = 0; e < num_examples; ++e) {
    TORCH_CHECK(bounds[e] <= bounds[e + 1], "lowrank_sketch_update: offsets must be non-decreasing");
  }

  // Sketches: two thin products each; B right and A left_t are N x s, never d_in x d_out.
  if (n > 0) {
    y.addmm_(af.t(), at::mm(bf, right));
    w.addmm_(at::mm(af, left_t).t(), bf);
  }

  at::Tensor norms = at::empty({num_examples}, at::TensorOptions().dtype(at::kDouble));
  cpu::gradient_norms_sq(af.data_ptr<float>(), bf.data_ptr<float>(), bounds, num_examples, p, q,
                         norms.data_ptr<double>());
  return norms;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(blens_fast, m) {
  m.def("lowrank_sketch_update(Tensor a, Tensor b, Tensor offsets, Tensor right, Tensor left_t, Tensor(a!) y, "
        "Tensor(b!) w) -> Tensor");
}

TORCH_LIBRARY_IMPL(blens_fast, CPU, m) {
  m.impl("lowrank_sketch_update", &lowrank_sketch_update_cpu);
}

}  // namespace blens_fast
