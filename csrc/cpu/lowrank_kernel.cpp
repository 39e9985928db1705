// Per-example gradient norms from the low-rank factors, on raw pointers: see lowrank_kernel.h.
#include "lowrank_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace blens_fast {
namespace cpu {
namespace {

// Sum over the pairs (i, j) of one example's rows of (a_i . a_j) (b_i . b_j); rows are float32,
// the dot products accumulate in float32 (vectorizable), the pair sum in double.
double row_pairs(const float* a, const float* b, int64_t p, int64_t q, int64_t i, int64_t start) {
  const float* ai = a + i * p;
  const float* bi = b + i * q;
  double total = 0.0;
  for (int64_t j = start; j <= i; ++j) {
    const float* aj = a + j * p;
    const float* bj = b + j * q;
    float da = 0.f, db = 0.f;
    for (int64_t k = 0; k < p; ++k) da += ai[k] * aj[k];
    for (int64_t k = 0; k < q; ++k) db += bi[k] * bj[k];
    total += (j == i ? 1.0 : 2.0) * static_cast<double>(da) * static_cast<double>(db);
  }
  return total;
}

}  // namespace

void gradient_norms_sq(const float* a, const float* b, const int64_t* bounds, int64_t num_examples, int64_t p,
                       int64_t q, double* out) {
  const int64_t n = bounds[num_examples];
  // one task per row i (pairs j <= i of its example), then a per-example sum in row order
  std::vector<int64_t> owner(n);
  for (int64_t e = 0; e < num_examples; ++e) {
    for (int64_t i = bounds[e]; i < bounds[e + 1]; ++i) owner[i] = e;
  }
  std::vector<double> partial(n, 0.0);
  const int64_t work_per_row = std::max<int64_t>(1, (p + q) * 8);
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / work_per_row), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) partial[i] = row_pairs(a, b, p, q, i, bounds[owner[i]]);
  });
  std::fill(out, out + num_examples, 0.0);
  for (int64_t i = 0; i < n; ++i) out[owner[i]] += partial[i];
  for (int64_t e = 0; e < num_examples; ++e) out[e] = std::max(out[e], 0.0);
}

}  // namespace cpu
}  // namespace blens_fast
