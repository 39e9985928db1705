// The fused vocabulary projection on the CPU, on raw pointers (no torch tensors): see topk_kernel.cpp for the
// algorithm and csrc/cpu/topk_binding.cpp for the torch binding (argument checks, buffers, the Python module).
#pragma once

#include <cstdint>

namespace blens_fast {
namespace cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Element (i, j) of a matrix is data[i * row_stride + j * col_stride] (strides in elements).
struct Matrix {
  const void* data;
  DType dtype;
  int64_t rows, cols;
  int64_t row_stride, col_stride;
};

// The optional norm prologue of each hidden row: x = (h * a[row] - c[row]) * norm_w + norm_b (float32, each
// operation rounded on its own, as torch computes it), then rounded to the weight dtype. a == nullptr: no prologue
// (the row as it is, rounded to the weight dtype); c, norm_w, norm_b may be null (0, 1, 0).
struct Prologue {
  const float* a = nullptr;
  const float* c = nullptr;
  const float* norm_w = nullptr;
  const float* norm_b = nullptr;
};

// Where the results go; a list not asked for has null pointers, and so have the counts without targets.
struct Outputs {
  float* top_values = nullptr;  // N x k, best first
  int64_t* top_indices = nullptr;
  float* bottom_values = nullptr;  // N x k, smallest first
  int64_t* bottom_indices = nullptr;
  float* logsumexp = nullptr;    // N
  int64_t* target_counts = nullptr;  // N x 3: greater, less, equal with a lower index
};

// 0 = chosen from the shapes. gemm_mode: 0 auto, 1 the exact float32 GEMM of this file, 2 the native 16-bit
// brgemm (16-bit weights only). simd=false runs the portable scalar code (the same bits, slowly: for tests).
struct Plan {
  int64_t k = 10;
  int64_t block_rows = 0;
  int64_t block_vocab = 0;
  int gemm_mode = 0;
  bool simd = true;
  int64_t threads = 1;
};

// One pass over hidden (N x d) @ weight (V x d)^T + bias: the lists asked for in `out`, each row's log-sum-exp and,
// with target_ids and target_logits (N each), the target counts.
void project(const Matrix& hidden, const Matrix& weight, const float* bias, const Prologue& prologue,
             const int64_t* target_ids, const float* target_logits, const Plan& plan, const Outputs& out);

// Each row's logit for its target token, bit for bit the value project() computes for that column (the same
// prologue, rounding and dot-product order) when it uses the exact float32 GEMM.
void target_logits(const Matrix& hidden, const Matrix& weight, const float* bias, const Prologue& prologue,
                   const int64_t* target_ids, bool simd, float* out);

}  // namespace cpu
}  // namespace blens_fast
