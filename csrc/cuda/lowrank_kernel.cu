// CUDA kernels of the fused low-rank accumulation, on raw pointers (binding: lowrank_binding.cpp).
//
// For factors A (N x p) and B (N x q) stacked over examples (offsets, E + 1 row boundaries):
//   norms[e] = sum((A_e A_e^T) * (B_e B_e^T))        per example, never forming A_e^T B_e
//   y (p x s1) += A^T (B right)                     right: q x s1
//   w (s2 x q) += (A left_t)^T B                    left_t: p x s2
//
// Two launches, no atomics (results do not depend on scheduling):
//   project_kernel:    C = B right (N x s1) and D = A left_t (N x s2), 16 x 16 shared-memory tiles;
//   accumulate_kernel: a 1-D grid of three kinds of blocks: a tile of y += A^T C, a tile of
//                      w += D^T B, or one example's Gram-product norm over tile pairs of its rows.
// Inputs A, B: float32, float16 or bfloat16; right, left_t, y, w, C, D: float32; accumulation in float32.
// Reference: blens_fast/ops/lowrank_reference.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace blens_fast {
namespace lowrank {

constexpr int kTile = 16;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// out[n, j] = sum_k x[n, k] m[k, j]; blockIdx.z == 0: (x, m, out) = (B, right, C), 1: (A, left_t, D).
template <typename T>
__global__ void project_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ right,
                               const float* __restrict__ left_t, float* __restrict__ c, float* __restrict__ d,
                               int64_t n, int64_t p, int64_t q, int64_t s1, int64_t s2) {
  const bool second = blockIdx.z == 1;
  const T* x = second ? a : b;
  const float* m = second ? left_t : right;
  float* out = second ? d : c;
  const int64_t inner = second ? p : q;
  const int64_t s = second ? s2 : s1;
  if (static_cast<int64_t>(blockIdx.y) * kTile >= s) return;  // uniform over the block
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTile + ty;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + tx;
  __shared__ float xs[kTile][kTile + 1];
  __shared__ float ms[kTile][kTile + 1];
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < inner; k0 += kTile) {
    xs[ty][tx] = (row < n && k0 + tx < inner) ? to_float(x[row * inner + k0 + tx]) : 0.f;
    ms[ty][tx] = (k0 + ty < inner && col < s) ? m[(k0 + ty) * s + col] : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += xs[ty][kk] * ms[kk][tx];
    __syncthreads();
  }
  if (row < n && col < s) out[row * s + col] = acc;
}

// target[i, j] += sum_n left[n, i] rightm[n, j] for a kTile x kTile tile (i0, j0):
// left is N x li (row-major), rightm is N x lj; target is li x lj.
template <typename TL, typename TR>
__device__ void transposed_product_tile(const TL* __restrict__ left, const TR* __restrict__ rightm,
                                        float* __restrict__ target, int64_t n, int64_t li, int64_t lj, int64_t i0,
                                        int64_t j0, float (*ls)[kTile + 1], float (*rs)[kTile + 1]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc = 0.f;
  for (int64_t n0 = 0; n0 < n; n0 += kTile) {
    const int64_t row = n0 + ty;
    ls[ty][tx] = (row < n && i0 + tx < li) ? to_float(left[row * li + i0 + tx]) : 0.f;
    rs[ty][tx] = (row < n && j0 + tx < lj) ? to_float(rightm[row * lj + j0 + tx]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += ls[kk][ty] * rs[kk][tx];
    __syncthreads();
  }
  const int64_t i = i0 + ty, j = j0 + tx;
  if (i < li && j < lj) target[i * lj + j] += acc;
}

template <typename T>
__device__ float dot_tile(const T* __restrict__ x, int64_t width, int64_t i0, int64_t j0, int64_t stop,
                          float (*xi)[kTile + 1], float (*xj)[kTile + 1]) {
  // returns, for thread (ty, tx), sum_k x[i0 + ty, k] x[j0 + tx, k] (zero outside [.., stop))
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < width; k0 += kTile) {
    xi[ty][tx] = (i0 + ty < stop && k0 + tx < width) ? to_float(x[(i0 + ty) * width + k0 + tx]) : 0.f;
    xj[ty][tx] = (j0 + ty < stop && k0 + tx < width) ? to_float(x[(j0 + ty) * width + k0 + tx]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) acc += xi[ty][kk] * xj[tx][kk];
    __syncthreads();
  }
  return acc;
}

template <typename T>
__global__ void accumulate_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ c,
                                  const float* __restrict__ d, float* __restrict__ y, float* __restrict__ w,
                                  const int64_t* __restrict__ offsets, float* __restrict__ norms, int64_t n, int64_t p,
                                  int64_t q, int64_t s1, int64_t s2, int64_t y_tiles_j, int64_t num_y,
                                  int64_t w_tiles_j, int64_t num_w) {
  __shared__ float s0[kTile][kTile + 1];
  __shared__ float s1m[kTile][kTile + 1];
  __shared__ float reduce[kTile * kTile];
  const int64_t block = blockIdx.x;
  if (block < num_y) {
    // y (p x s1) += A^T C
    const int64_t i0 = (block / y_tiles_j) * kTile, j0 = (block % y_tiles_j) * kTile;
    transposed_product_tile<T, float>(a, c, y, n, p, s1, i0, j0, s0, s1m);
    return;
  }
  if (block < num_y + num_w) {
    // w (s2 x q) += D^T B
    const int64_t local = block - num_y;
    const int64_t i0 = (local / w_tiles_j) * kTile, j0 = (local % w_tiles_j) * kTile;
    transposed_product_tile<float, T>(d, b, w, n, s2, q, i0, j0, s0, s1m);
    return;
  }
  // one example: sum over (i, j) of its rows of (a_i . a_j) (b_i . b_j)
  const int64_t e = block - num_y - num_w;
  const int64_t start = offsets[e], stop = offsets[e + 1];
  float total = 0.f;
  for (int64_t i0 = start; i0 < stop; i0 += kTile) {
    for (int64_t j0 = start; j0 <= i0; j0 += kTile) {  // the Gram products are symmetric
      const float ga = dot_tile<T>(a, p, i0, j0, stop, s0, s1m);
      const float gb = dot_tile<T>(b, q, i0, j0, stop, s0, s1m);
      total += (j0 == i0 ? 1.f : 2.f) * ga * gb;
    }
  }
  const int t = threadIdx.y * kTile + threadIdx.x;
  reduce[t] = total;
  __syncthreads();
  for (int stride = kTile * kTile / 2; stride > 0; stride >>= 1) {
    if (t < stride) reduce[t] += reduce[t + stride];
    __syncthreads();
  }
  if (t == 0) norms[e] = reduce[0];
}

template <typename T>
cudaError_t launch_typed(const void* a, const void* b, const int64_t* offsets, const float* right,
                         const float* left_t, float* c, float* d, float* y, float* w, float* norms, int64_t n,
                         int64_t p, int64_t q, int64_t s1, int64_t s2, int64_t num_examples, cudaStream_t stream) {
  const T* at = static_cast<const T*>(a);
  const T* bt = static_cast<const T*>(b);
  const dim3 threads(kTile, kTile);
  auto tiles = [](int64_t x) { return (x + kTile - 1) / kTile; };
  if (n > 0) {
    const int64_t s_max = s1 > s2 ? s1 : s2;
    const dim3 grid(static_cast<unsigned>(tiles(n)), static_cast<unsigned>(tiles(s_max)), 2);
    project_kernel<T><<<grid, threads, 0, stream>>>(at, bt, right, left_t, c, d, n, p, q, s1, s2);
  }
  const int64_t y_tiles_j = tiles(s1), w_tiles_j = tiles(q);
  const int64_t num_y = n > 0 ? tiles(p) * y_tiles_j : 0;
  const int64_t num_w = n > 0 ? tiles(s2) * w_tiles_j : 0;
  const int64_t blocks = num_y + num_w + num_examples;
  if (blocks > 0) {
    accumulate_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        at, bt, c, d, y, w, offsets, norms, n, p, q, s1, s2, y_tiles_j, num_y, w_tiles_j, num_w);
  }
  return cudaGetLastError();
}

// dtype: 0 float32, 1 float16, 2 bfloat16. Pointers are device pointers, row-major and contiguous.
cudaError_t sketch_update_launch(int dtype, const void* a, const void* b, const int64_t* offsets,
                                 const float* right, const float* left_t, float* c, float* d, float* y, float* w,
                                 float* norms, int64_t n, int64_t p, int64_t q, int64_t s1, int64_t s2,
                                 int64_t num_examples, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return launch_typed<float>(a, b, offsets, right, left_t, c, d, y, w, norms, n, p, q, s1, s2, num_examples,
                                 stream);
    case 1:
      return launch_typed<__half>(a, b, offsets, right, left_t, c, d, y, w, norms, n, p, q, s1, s2, num_examples,
                                  stream);
    case 2:
      return launch_typed<__nv_bfloat16>(a, b, offsets, right, left_t, c, d, y, w, norms, n, p, q, s1, s2,
                                         num_examples, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lowrank
}  // namespace blens_fast
