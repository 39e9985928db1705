// Per-example gradient norms from the low-rank factors on the CPU, on raw pointers (no torch tensors); the torch
// binding (argument checks, the two sketch products, the op's registration) is csrc/cpu/lowrank_binding.cpp.
//
//   norms_sq[e] = sum((A_e A_e^T) * (B_e B_e^T))      (A_e = rows bounds[e]:bounds[e+1] of A)
//
// Reference: blens_fast/ops/lowrank_reference.py.
#pragma once

#include <cstdint>

namespace blens_fast {
namespace cpu {

// a: n x p and b: n x q float32, row-major; bounds: num_examples + 1 non-decreasing row boundaries from 0 to n;
// out: num_examples squared Frobenius norms of sum_i a_i^T b_i over each example's rows (in double, at least 0).
void gradient_norms_sq(const float* a, const float* b, const int64_t* bounds, int64_t num_examples, int64_t p,
                       int64_t q, double* out);

}  // namespace cpu
}  // namespace blens_fast
