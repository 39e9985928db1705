// Fused top-k vocabulary projection on the GPU: topk(norm(h) @ W^T + b), never writing N x V logits.
// Raw pointers only (no torch headers); the torch binding is csrc/cuda/topk_binding.cpp.
//
// One block owns BM = 64 rows and a contiguous range of BN = 128-column vocabulary tiles (a split).
// blockIdx.x is the row tile, so the blocks resident at once are different row tiles of the same
// split and read the same unembedding tiles together (served from L2: the grouped tile order).
// Per tile:
//   1. GEMM over d in BK = 32 steps into float32: bf16/fp16 on tensor cores (WMMA 16x16x16, 8 warps
//      in a 2 x 4 grid, 2 x 2 fragments each); float32 on CUDA cores (exact float32 products). The
//      optional norm prologue (x = (h * a - c) * norm_w + norm_b, rounded to the weight dtype) is
//      applied while the hidden tile is staged in shared memory.
//   2. The accumulator tile goes to shared memory (aliasing the operand tiles) and each warp takes 8
//      rows: every lane holds 4 columns, updates its own running (max, sum exp) and compares 64-bit
//      keys (order-preserving float bits << 32 | ~index: larger value wins, then lower index) with the
//      row's threshold = the minimum of its k-slot list. Candidates are found with __ballot_sync and
//      inserted one at a time into the minimum slot; the new minimum comes from a warp shuffle
//      reduction. After the first tile almost no lane has a candidate, so the usual cost is one
//      compare and one ballot per row.
// The k-slot lists live in the output buffer (global memory, L1/L2 resident; only the owning warp
// touches a row's list). Results per split: keys [splits, N, k] (unsorted; int64 encoding shared with
// the Triton kernel), and per-row (max, sum exp); the binding sorts, merges splits and decodes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace blens {

constexpr int BM = 64;
constexpr int BN = 128;
constexpr int BK = 32;
constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr unsigned FULL = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Unsigned order-preserving key; the stored int64 is key ^ 2^63 (the Triton kernel's encoding).
__device__ __forceinline__ unsigned long long make_key(float v, long long col) {
  unsigned int bits = __float_as_uint(v);
  if (v == 0.0f) bits = 0u;  // -0.0 == +0.0
  unsigned int ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<unsigned long long>(ord) << 32) | (0xFFFFFFFFull - static_cast<unsigned long long>(col));
}

template <typename TW>
struct Smem {
  // operand tiles (GEMM phase) alias the float32 accumulator tile (selection phase)
  static constexpr int LDA = BK + 8;   // 16-bit: multiple of 8 elements; float: 40 also fine
  static constexpr int LDC = BN + 4;
  static constexpr int A_BYTES = BM * LDA * sizeof(TW);
  static constexpr int B_BYTES = BN * LDA * sizeof(TW);
  static constexpr int C_BYTES = BM * LDC * sizeof(float);
  static constexpr int BYTES = (A_BYTES + B_BYTES > C_BYTES) ? A_BYTES + B_BYTES : C_BYTES;
};

// Warp-wide: refresh the row's threshold (minimum key of its k slots) and its position.
__device__ __forceinline__ void list_min(const unsigned long long* list, int k, int lane, unsigned long long& thr,
                                         int& pos) {
  unsigned long long best = ~0ull;
  int bpos = 0;
  for (int q = lane; q < k; q += 32) {
    unsigned long long v = list[q];
    if (v < best) { best = v; bpos = q; }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    unsigned long long ov = __shfl_xor_sync(FULL, best, off);
    int op = __shfl_xor_sync(FULL, bpos, off);
    if (ov < best) { best = ov; bpos = op; }
  }
  thr = best;
  pos = bpos;
}

template <typename TW, typename TH, bool TC>
__global__ void __launch_bounds__(THREADS)
topk_kernel(const TH* __restrict__ hidden, const TW* __restrict__ weight, const float* __restrict__ bias,
            const float* __restrict__ row_a, const float* __restrict__ row_c, const float* __restrict__ norm_w,
            const float* __restrict__ norm_b, long long N, long long V, long long D, long long stride_hn,
            long long stride_wv, int k, int largest, long long tiles_per_split, long long* __restrict__ keys_out,
            float* __restrict__ part_m, float* __restrict__ part_s) {
  using S = Smem<TW>;
  __shared__ __align__(128) unsigned char smem[S::BYTES];
  __shared__ unsigned long long thr_s[BM];
  __shared__ int pos_s[BM];
  TW* As = reinterpret_cast<TW*>(smem);
  TW* Bs = reinterpret_cast<TW*>(smem + S::A_BYTES);
  float* Cs = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long row0 = static_cast<long long>(blockIdx.x) * BM;
  const long long split = blockIdx.y;
  const long long n_tiles = (V + BN - 1) / BN;
  const long long t_begin = split * tiles_per_split;
  const long long t_end = min(t_begin + tiles_per_split, n_tiles);
  const float sign = largest ? 1.f : -1.f;
  const bool prologue = row_a != nullptr;

  // per-warp rows: warp w owns rows w*8 .. w*8+7 of the tile
  float m_l[8], s_l[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) { m_l[i] = -INFINITY; s_l[i] = 0.f; }
  for (int i = 0; i < 8; ++i) {
    const int r = warp * 8 + i;
    const long long row = row0 + r;
    if (row >= N) break;
    unsigned long long* list =
        reinterpret_cast<unsigned long long*>(keys_out) + (static_cast<size_t>(split) * N + row) * k;
    for (int q = lane; q < k; q += 32) list[q] = static_cast<unsigned long long>(q);  // distinct "empty" keys
    if (lane == 0) { thr_s[r] = 0ull; pos_s[r] = 0; }
  }
  __syncwarp();

  for (long long t = t_begin; t < t_end; ++t) {
    const long long col0 = t * BN;
    // ---------------- GEMM: BM x BN tile, float32 accumulation ----------------
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[2][2];
    float acc[4][8];
    if constexpr (TC) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(cf[i][j], 0.f);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    }
    for (long long k0 = 0; k0 < D; k0 += BK) {
      // stage A (with the norm prologue) and B; zero outside the matrix
      for (int e = tid; e < BM * BK; e += THREADS) {
        const int r = e / BK, c = e % BK;
        const long long row = row0 + r, kk = k0 + c;
        float x = 0.f;
        if (row < N && kk < D) {
          x = to_float(hidden[row * stride_hn + kk]);
          if (prologue) {
            x = x * row_a[row] - row_c[row];
            if (norm_w) x *= norm_w[kk];
            if (norm_b) x += norm_b[kk];
          }
        }
        As[r * S::LDA + c] = from_float<TW>(x);
      }
      for (int e = tid; e < BN * BK; e += THREADS) {
        const int n = e / BK, c = e % BK;
        const long long col = col0 + n, kk = k0 + c;
        Bs[n * S::LDA + c] = (col < V && kk < D) ? weight[col * stride_wv + kk] : from_float<TW>(0.f);
      }
      __syncthreads();
      if constexpr (TC) {
        const int wm = warp / 4, wn = warp % 4;  // 2 x 4 warps, 32 x 32 each
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, TW, wmma::row_major> af[2];
          wmma::fragment<wmma::matrix_b, 16, 16, 16, TW, wmma::col_major> bf[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], As + (wm * 32 + i * 16) * S::LDA + kk, S::LDA);
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], Bs + (wn * 32 + j * 16) * S::LDA + kk, S::LDA);
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(cf[i][j], af[i], bf[j], cf[i][j]);
        }
      } else {
        const int ty = tid / 16, tx = tid % 16;  // rows ty*4.., cols tx + 16*j
#pragma unroll 4
        for (int c = 0; c < BK; ++c) {
          float a[4], b[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = to_float(As[(ty * 4 + i) * S::LDA + c]);
#pragma unroll
          for (int j = 0; j < 8; ++j) b[j] = to_float(Bs[(tx + 16 * j) * S::LDA + c]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
    // accumulators -> Cs (aliases the operand tiles: everyone is past the last MMA)
    if constexpr (TC) {
      const int wm = warp / 4, wn = warp % 4;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * S::LDC + wn * 32 + j * 16, cf[i][j], S::LDC,
                                  wmma::mem_row_major);
    } else {
      const int ty = tid / 16, tx = tid % 16;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) Cs[(ty * 4 + i) * S::LDC + tx + 16 * j] = acc[i][j];
    }
    __syncthreads();

    // ---------------- selection: warp w, rows w*8 .. w*8+7 ----------------
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = warp * 8 + i;
      const long long row = row0 + r;
      if (row < N) {  // warp-uniform
        unsigned long long* list =
            reinterpret_cast<unsigned long long*>(keys_out) + (static_cast<size_t>(split) * N + row) * k;
        unsigned long long thr = thr_s[r];
        int pos = pos_s[r];
        float x[4];
        unsigned long long key[4];
        bool cand[4];
        float bmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const long long col = col0 + lane + 32 * j;
          const bool valid = col < V;
          x[j] = valid ? Cs[r * S::LDC + lane + 32 * j] + (bias ? bias[col] : 0.f) : -INFINITY;
          bmax = fmaxf(bmax, x[j]);
          key[j] = valid ? make_key(x[j] * sign, col) : 0ull;
          cand[j] = valid && key[j] > thr;
        }
        // this lane's online log-sum-exp (NaN propagates through the sum)
        const float m_new = fmaxf(m_l[i], bmax);
        if (m_new != -INFINITY) {
          float s = s_l[i] * expf(m_l[i] - m_new);
#pragma unroll
          for (int j = 0; j < 4; ++j) s += expf(x[j] - m_new);
          s_l[i] = s;
          m_l[i] = m_new;
        }
        unsigned bal = __ballot_sync(FULL, cand[0] | cand[1] | cand[2] | cand[3]);
        while (bal) {
          const int leader = __ffs(bal) - 1;
          unsigned long long mine = 0ull;
          int mj = -1;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (cand[j] && key[j] > mine) { mine = key[j]; mj = j; }
          const unsigned long long c = __shfl_sync(FULL, mine, leader);
          if (lane == leader) {
#pragma unroll
            for (int j = 0; j < 4; ++j)
              if (j == mj) cand[j] = false;
          }
          if (c > thr) {  // warp-uniform
            if (lane == 0) list[pos] = c;
            __syncwarp();
            list_min(list, k, lane, thr, pos);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) cand[j] = cand[j] && key[j] > thr;
          bal = __ballot_sync(FULL, cand[0] | cand[1] | cand[2] | cand[3]);
        }
        if (lane == 0) { thr_s[r] = thr; pos_s[r] = pos; }
      }
    }
    __syncthreads();  // Cs is overwritten by the next tile's operands
  }

  // ---------------- finish: per-row (max, sum exp) over lanes; stored keys ^ 2^63 ----------------
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = warp * 8 + i;
    const long long row = row0 + r;
    if (row < N) {
      float m = m_l[i];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, off));
      float s = (m_l[i] == -INFINITY) ? 0.f : s_l[i] * expf(m_l[i] - m);
      if (m_l[i] != m_l[i] || s_l[i] != s_l[i]) s = NAN;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
      if (lane == 0) {
        part_m[split * N + row] = m;
        part_s[split * N + row] = s;
      }
      unsigned long long* list =
          reinterpret_cast<unsigned long long*>(keys_out) + (static_cast<size_t>(split) * N + row) * k;
      __syncwarp();
      for (int q = lane; q < k; q += 32) list[q] ^= 0x8000000000000000ull;
    }
  }
}

template <typename TW, typename TH, bool TC>
int launch(const void* hidden, const void* weight, const float* bias, const float* row_a, const float* row_c,
           const float* norm_w, const float* norm_b, long long N, long long V, long long D, long long stride_hn,
           long long stride_wv, int k, int largest, int splits, long long* keys, float* part_m, float* part_s,
           cudaStream_t stream) {
  if (N == 0) return 0;
  const long long n_tiles = (V + BN - 1) / BN;
  if (splits < 1) splits = 1;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const long long tiles_per_split = (n_tiles + splits - 1) / splits;
  splits = static_cast<int>((n_tiles + tiles_per_split - 1) / tiles_per_split);
  const long long row_tiles = (N + BM - 1) / BM;
  if (row_tiles > 0x7fffffffLL || splits > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
  topk_kernel<TW, TH, TC><<<grid, THREADS, 0, stream>>>(
      static_cast<const TH*>(hidden), static_cast<const TW*>(weight), bias, row_a, row_c, norm_w, norm_b, N, V, D,
      stride_hn, stride_wv, k, largest, tiles_per_split, keys, part_m, part_s);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace blens

// dtype codes: 0 float32, 1 bfloat16, 2 float16. hidden is either the weight's dtype or float32
// (hidden_f32 = 1). Rows of hidden/weight are contiguous in d; row strides are given. The actual
// splits used are ceil(n_tiles / ceil(n_tiles / splits)); call blens_topk_splits for that number.
// Returns a cudaError_t value (0 = success).
extern "C" int blens_topk_splits(long long V, int splits) {
  const long long n_tiles = (V + blens::BN - 1) / blens::BN;
  if (splits < 1) splits = 1;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const long long per = (n_tiles + splits - 1) / splits;
  return static_cast<int>((n_tiles + per - 1) / per);
}

extern "C" int blens_topk_block_rows() { return blens::BM; }

extern "C" int blens_topk_launch(int dtype, int hidden_f32, const void* hidden, const void* weight, const float* bias,
                                 const float* row_a, const float* row_c, const float* norm_w, const float* norm_b,
                                 long long N, long long V, long long D, long long stride_hn, long long stride_wv,
                                 int k, int largest, int splits, long long* keys, float* part_m, float* part_s,
                                 cudaStream_t stream) {
  using namespace blens;
  switch (dtype) {
    case 0:
      return launch<float, float, false>(hidden, weight, bias, row_a, row_c, norm_w, norm_b, N, V, D, stride_hn,
                                         stride_wv, k, largest, splits, keys, part_m, part_s, stream);
    case 1:
      return hidden_f32 ? launch<__nv_bfloat16, float, true>(hidden, weight, bias, row_a, row_c, norm_w, norm_b, N,
                                                             V, D, stride_hn, stride_wv, k, largest, splits, keys,
                                                             part_m, part_s, stream)
                        : launch<__nv_bfloat16, __nv_bfloat16, true>(hidden, weight, bias, row_a, row_c, norm_w,
                                                                     norm_b, N, V, D, stride_hn, stride_wv, k,
                                                                     largest, splits, keys, part_m, part_s, stream);
    case 2:
      return hidden_f32 ? launch<__half, float, true>(hidden, weight, bias, row_a, row_c, norm_w, norm_b, N, V, D,
                                                      stride_hn, stride_wv, k, largest, splits, keys, part_m, part_s,
                                                      stream)
                        : launch<__half, __half, true>(hidden, weight, bias, row_a, row_c, norm_w, norm_b, N, V, D,
                                                       stride_hn, stride_wv, k, largest, splits, keys, part_m, part_s,
                                                       stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
