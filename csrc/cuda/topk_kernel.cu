// Fused vocabulary projection on the GPU: from logits = norm(h) @ W^T + b, in ONE pass over the
// vocabulary (one GEMM per tile) and without writing N x V logits, any combination per row of
//   * the top-k list (largest logits; ties -> lower vocabulary index first),
//   * the bottom-k list (smallest logits; ties -> lower index first),
//   * the online log-sum-exp of the whole row (always),
//   * target counts against a given (target_id, target_logit = tau) per row, over every column j other
//     than the target's own: greater = #{logit_j > tau}, less = #{logit_j < tau},
//     equal_lower = #{logit_j == tau and j < target_id} (-0.0 == +0.0; NaN counts nowhere).
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
//      rows; every lane holds 4 columns (lane + 32 j) of a row and
//      - updates its own running (max, sum exp);
//      - for the counts, compares its logits with tau: one __ballot_sync + __popc per column group and
//        counter gives the warp's count for the tile, added by lane 3 * row + counter (a per-lane
//        register: lanes 0..23 hold the 8 rows x 3 counters, no per-row register arrays);
//      - for each list, tests its logits (s = logit for the top list, s = -logit for the bottom list)
//        against the list's float bound (the value of its threshold key); only when some lane passes,
//        the row goes through the exact selection below.
//   3. Exact selection (rows that passed, one list at a time, list_offer): 64-bit keys
//      (order-preserving bits of s << 32 | ~column: larger s wins, then the lower column; the negated
//      logits of the bottom list give ascending order with the same lower-index tie rule) are compared
//      with the row's threshold = the minimum of its k-slot list. Candidates are found with
//      __ballot_sync and inserted one at a time into the minimum slot; the new minimum comes from a warp
//      shuffle reduction. After the first tiles almost no row passes the float test, so the usual cost
//      per row and list is one compare and one vote.
// The k-slot lists (k <= 256) live in the output key buffers (global memory, L1/L2 resident; only the
// owning warp touches a row's list); empty slots hold the distinct keys 0 .. k-1, below every logit's.
// Results per split: keys [splits, N, k] per requested list (unsorted; stored as key ^ 2^63, the int64
// encoding shared with the Triton kernel), counts [splits, N, 3] int64 when targets are given, and
// per-row (max, sum exp); the binding sorts, merges the splits, decodes and sums the counts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "topk_common.cuh"

namespace blens {

using namespace blens_topk_common;

constexpr int BM = 64;
constexpr int BN = 128;
constexpr int BK = 32;
constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS_PER_WARP = BM / WARPS;  // 8: counters of row i live in lanes 3i .. 3i+2
constexpr int MAX_K = 256;
constexpr unsigned FULL = 0xffffffffu;
static_assert(3 * ROWS_PER_WARP <= 32, "one counter lane per (row, counter)");

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

// Warp-wide, the selection update of one row and one list (top: s = logit, bottom: s = -logit): offer
// this lane's columns col0 + lane + 32 j (those below n_valid exist) to the row's k-slot list, keeping
// thr / pos (the list's minimum key and its slot) up to date. Larger s wins, then the lower column.
__device__ __forceinline__ void list_offer(unsigned long long* list, int k, int lane, const float (&s)[4],
                                           long long col0, int n_valid, unsigned long long& thr, int& pos) {
  unsigned long long key[4];
  bool cand[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = lane + 32 * j;
    key[j] = c < n_valid ? make_key(s[j], col0 + c) : 0ull;  // 0 never beats a threshold
    cand[j] = key[j] > thr;
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
}

// keys_top / keys_bottom: [splits, N, k] or nullptr (list not requested); counts: [splits, N, 3] or
// nullptr (then target_ids / target_logits are not read); part_m / part_s: [splits, N].
template <typename TW, typename TH, bool TC>
__global__ void __launch_bounds__(THREADS)
topk_kernel(const TH* __restrict__ hidden, const TW* __restrict__ weight, const float* __restrict__ bias,
            const float* __restrict__ row_a, const float* __restrict__ row_c, const float* __restrict__ norm_w,
            const float* __restrict__ norm_b, const long long* __restrict__ target_ids,
            const float* __restrict__ target_logits, long long N, long long V, long long D, long long stride_hn,
            long long stride_wv, int k, long long tiles_per_split, unsigned long long* __restrict__ keys_top,
            unsigned long long* __restrict__ keys_bottom, long long* __restrict__ counts,
            float* __restrict__ part_m, float* __restrict__ part_s) {
  using S = Smem<TW>;
  __shared__ __align__(128) unsigned char smem[S::BYTES];
  // per row and list (0 top, 1 bottom): threshold key, its slot, and the float bound key_bound(thr)
  __shared__ unsigned long long thr_s[2][BM];
  __shared__ int pos_s[2][BM];
  __shared__ float bound_s[2][BM];
  __shared__ long long tgt_s[BM];  // target id and logit per row (counts only)
  __shared__ float tau_s[BM];
  TW* As = reinterpret_cast<TW*>(smem);
  TW* Bs = reinterpret_cast<TW*>(smem + S::A_BYTES);
  float* Cs = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long row0 = static_cast<long long>(blockIdx.x) * BM;
  const long long split = blockIdx.y;
  const long long n_tiles = (V + BN - 1) / BN;
  const long long t_begin = split * tiles_per_split;
  const long long t_end = min(t_begin + tiles_per_split, n_tiles);
  const bool prologue = row_a != nullptr;
  const bool top = keys_top != nullptr, bottom = keys_bottom != nullptr, count = counts != nullptr;
  auto row_list = [&](int dir, long long row) {
    return (dir ? keys_bottom : keys_top) + (static_cast<size_t>(split) * N + row) * k;
  };

  // per-warp rows: warp w owns rows w*8 .. w*8+7 of the tile
  float m_l[ROWS_PER_WARP], s_l[ROWS_PER_WARP];
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) { m_l[i] = -INFINITY; s_l[i] = 0.f; }
  unsigned int cnt = 0;  // lane 3i + c: counter c (greater, less, equal_lower) of row i, this split
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp * ROWS_PER_WARP + i;
    const long long row = row0 + r;
    if (row >= N) break;
    for (int dir = 0; dir < 2; ++dir) {
      if (!(dir ? bottom : top)) continue;
      unsigned long long* list = row_list(dir, row);
      for (int q = lane; q < k; q += 32) list[q] = static_cast<unsigned long long>(q);  // distinct "empty" keys
      if (lane == 0) { thr_s[dir][r] = 0ull; pos_s[dir][r] = 0; bound_s[dir][r] = -INFINITY; }
    }
    if (count && lane == 0) { tgt_s[r] = target_ids[row]; tau_s[r] = target_logits[row]; }
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

    // ---------------- per row: log-sum-exp, counts, list prefilter (warp w, rows w*8 .. w*8+7) ----------------
    // this lane's columns col0 + lane + 32 j: the first n_valid columns of the tile exist; bias loaded once
    const int n_valid = static_cast<int>(min(static_cast<long long>(BN), V - col0));
    bool valid[4];
    float bj[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      valid[j] = lane + 32 * j < n_valid;
      bj[j] = (valid[j] && bias) ? bias[col0 + lane + 32 * j] : 0.f;
    }
    auto logit = [&](int r, int j) { return valid[j] ? Cs[r * S::LDC + lane + 32 * j] + bj[j] : -INFINITY; };
    unsigned int need = 0;  // bit 2i + dir: row i may have candidates for list dir (warp-uniform)
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      const int r = warp * ROWS_PER_WARP + i;
      if (row0 + r < N) {  // warp-uniform
        float x[4];
        float bmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          x[j] = logit(r, j);
          bmax = fmaxf(bmax, x[j]);
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
        if (count) cnt += target_count_share(x, valid, tau_s[r], tgt_s[r], col0, BN, lane, i);
        // a list's candidates satisfy !(s < bound): flag the row for the exact selection
        if (top) {
          const float b = bound_s[0][r];
          const bool p = (valid[0] && !(x[0] < b)) || (valid[1] && !(x[1] < b)) || (valid[2] && !(x[2] < b)) ||
                         (valid[3] && !(x[3] < b));
          if (__any_sync(FULL, p)) need |= 1u << (2 * i);
        }
        if (bottom) {
          const float b = bound_s[1][r];
          const bool p = (valid[0] && !(-x[0] < b)) || (valid[1] && !(-x[1] < b)) ||
                         (valid[2] && !(-x[2] < b)) || (valid[3] && !(-x[3] < b));
          if (__any_sync(FULL, p)) need |= 2u << (2 * i);
        }
      }
    }
    // ---------------- exact selection of the flagged (row, list) pairs ----------------
    while (need) {  // warp-uniform
      const int bit = __ffs(need) - 1;
      need &= need - 1;
      const int i = bit >> 1, dir = bit & 1;
      const int r = warp * ROWS_PER_WARP + i;
      float s[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j] = dir ? -logit(r, j) : logit(r, j);
      unsigned long long thr = thr_s[dir][r];
      int pos = pos_s[dir][r];
      list_offer(row_list(dir, row0 + r), k, lane, s, col0, n_valid, thr, pos);
      __syncwarp();  // every lane has read thr_s / pos_s before lane 0 writes them
      if (lane == 0) { thr_s[dir][r] = thr; pos_s[dir][r] = pos; bound_s[dir][r] = key_bound(thr); }
    }
    __syncthreads();  // Cs is overwritten by the next tile's operands; thr_s / bound_s are read next tile
  }

  // ---------------- finish: per-row (max, sum exp) over lanes, counts; stored keys ^ 2^63 ----------------
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp * ROWS_PER_WARP + i;
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
      if (count && lane >= 3 * i && lane < 3 * i + 3) counts[(split * N + row) * 3 + (lane - 3 * i)] = cnt;
      __syncwarp();
      for (int dir = 0; dir < 2; ++dir) {
        if (!(dir ? bottom : top)) continue;
        unsigned long long* list = row_list(dir, row);
        for (int q = lane; q < k; q += 32) list[q] ^= 0x8000000000000000ull;
      }
    }
  }
}

// What blens_topk_launch was given (host side).
struct Args {
  const void* hidden;
  const void* weight;
  const float *bias, *row_a, *row_c, *norm_w, *norm_b;
  const long long* target_ids;
  const float* target_logits;
  long long N, V, D, stride_hn, stride_wv;
  int k, splits;
  long long *keys_top, *keys_bottom, *counts;
  float *part_m, *part_s;
};

template <typename TW, typename TH, bool TC>
int launch(const Args& a, cudaStream_t stream) {
  if (a.N == 0) return 0;
  const long long n_tiles = (a.V + BN - 1) / BN;
  int splits = a.splits;
  if (splits < 1) splits = 1;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const long long tiles_per_split = (n_tiles + splits - 1) / splits;
  splits = static_cast<int>((n_tiles + tiles_per_split - 1) / tiles_per_split);
  const long long row_tiles = (a.N + BM - 1) / BM;
  if (row_tiles > 0x7fffffffLL || splits > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(splits));
  topk_kernel<TW, TH, TC><<<grid, THREADS, 0, stream>>>(
      static_cast<const TH*>(a.hidden), static_cast<const TW*>(a.weight), a.bias, a.row_a, a.row_c, a.norm_w,
      a.norm_b, a.target_ids, a.target_logits, a.N, a.V, a.D, a.stride_hn, a.stride_wv, a.k, tiles_per_split,
      reinterpret_cast<unsigned long long*>(a.keys_top), reinterpret_cast<unsigned long long*>(a.keys_bottom),
      a.counts, a.part_m, a.part_s);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace blens

// dtype codes: 0 float32, 1 bfloat16, 2 float16. hidden is either the weight's dtype or float32
// (hidden_f32 = 1). Rows of hidden/weight are contiguous in d; row strides are given. The actual
// splits used are ceil(n_tiles / ceil(n_tiles / splits)); call blens_topk_splits for that number.
// Outputs (each per split, see topk_kernel): keys_top / keys_bottom [splits, N, k] int64 or nullptr
// (list not requested; 1 <= k <= blens_topk_max_k() when either is given), counts [splits, N, 3] int64
// (greater, less, equal_lower) or nullptr (then target_ids / target_logits, N each, may be nullptr),
// part_m / part_s [splits, N] float32. Returns a cudaError_t value (0 = success).
extern "C" int blens_topk_splits(long long V, int splits) {
  const long long n_tiles = (V + blens::BN - 1) / blens::BN;
  if (splits < 1) splits = 1;
  if (splits > n_tiles) splits = static_cast<int>(n_tiles);
  const long long per = (n_tiles + splits - 1) / splits;
  return static_cast<int>((n_tiles + per - 1) / per);
}

extern "C" int blens_topk_block_rows() { return blens::BM; }

extern "C" int blens_topk_max_k() { return blens::MAX_K; }

extern "C" int blens_topk_launch(int dtype, int hidden_f32, const void* hidden, const void* weight, const float* bias,
                                 const float* row_a, const float* row_c, const float* norm_w, const float* norm_b,
                                 const long long* target_ids, const float* target_logits, long long N, long long V,
                                 long long D, long long stride_hn, long long stride_wv, int k, int splits,
                                 long long* keys_top, long long* keys_bottom, long long* counts, float* part_m,
                                 float* part_s, cudaStream_t stream) {
  using namespace blens;
  if ((keys_top || keys_bottom) && (k < 1 || k > MAX_K || k > V)) return static_cast<int>(cudaErrorInvalidValue);
  if (counts && (!target_ids || !target_logits)) return static_cast<int>(cudaErrorInvalidValue);
  const Args a{hidden, weight, bias,   row_a,       row_c,  norm_w, norm_b, target_ids,
               target_logits, N, V, D, stride_hn, stride_wv, k, splits, keys_top, keys_bottom, counts, part_m,
               part_s};
  switch (dtype) {
    case 0:
      return launch<float, float, false>(a, stream);
    case 1:
      return hidden_f32 ? launch<__nv_bfloat16, float, true>(a, stream)
                        : launch<__nv_bfloat16, __nv_bfloat16, true>(a, stream);
    case 2:
      return hidden_f32 ? launch<__half, float, true>(a, stream) : launch<__half, __half, true>(a, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
