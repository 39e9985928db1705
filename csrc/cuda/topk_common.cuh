// Device helpers shared by the CUDA projection kernels (topk_kernel.cu, topk_fast_kernel.cu): dtype conversions,
// the order-preserving selection keys (the int64 encoding shared with the Triton kernel: key ^ 2^63), and a warp's
// count of a row's logits against its target's logit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace blens_topk_common {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Unsigned order-preserving key (larger value first, then the lower column); stored as key ^ 2^63.
__device__ __forceinline__ unsigned long long make_key(float v, long long col) {
  unsigned int bits = __float_as_uint(v);
  if (v == 0.0f) bits = 0u;  // -0.0 == +0.0
  const unsigned int ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<unsigned long long>(ord) << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(col));
}

// The float a threshold key stands for (its high word decoded): every value whose key beats thr has
// !(value < key_bound(thr)), NaN included, so the bound is an exact prefilter for the key compare.
// -inf while the list still has empty slots (keys below 2^32) or when the threshold is a NaN.
__device__ __forceinline__ float key_bound(unsigned long long thr) {
  const unsigned int ord = static_cast<unsigned int>(thr >> 32);
  if (ord == 0u) return -INFINITY;
  const float b = __uint_as_float((ord & 0x80000000u) ? (ord & 0x7FFFFFFFu) : ~ord);
  return b != b ? -INFINITY : b;
}

// One row's 128 logits of a tile (lane + 32 j, j < 4, column col0 + that) against the target's logit tau: the
// warp's counts of other columns with a greater logit, a smaller one, and an equal one with a lower index (the
// target's own column skipped). Returns what lane 3 * row_in_warp + c adds to its counter c; 0 for other lanes.
__device__ __forceinline__ unsigned int target_count_share(const float (&x)[4], const bool (&valid)[4], float tau,
                                                           long long target, long long col0, int tile_columns,
                                                           int lane, int row_in_warp) {
  // target column relative to the tile, clamped to [-1, tile_columns]: c < tr <=> column < target id
  const long long rel = target - col0;
  const int tr = rel < 0 ? -1 : (rel > tile_columns ? tile_columns : static_cast<int>(rel));
  unsigned int greater = 0, less = 0, equal_lower = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = lane + 32 * j;
    const bool other = valid[j] && c != tr;
    greater += __popc(__ballot_sync(0xffffffffu, other && x[j] > tau));
    less += __popc(__ballot_sync(0xffffffffu, other && x[j] < tau));
    equal_lower += __popc(__ballot_sync(0xffffffffu, other && x[j] == tau && c < tr));
  }
  const int slot = lane - 3 * row_in_warp;
  return slot == 0 ? greater : slot == 1 ? less : slot == 2 ? equal_lower : 0u;
}

}  // namespace blens_topk_common
