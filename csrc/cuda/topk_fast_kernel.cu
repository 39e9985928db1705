// Fused vocabulary projection on tensor cores as they are meant to be used (16-bit weights):
//   logits = x @ W^T + b, x = norm(h) (optional prologue), in ONE pass over the vocabulary, without writing the
//   N x V logits; per row any of: the top-k list, the bottom-k list, the online log-sum-exp (always), the target
//   counts (greater, less, equal with a lower index, the target's own column skipped). Same semantics and the same
//   int64 key encoding as csrc/cuda/topk_kernel.cu (the "simple" variant) and the Triton kernel: ties go to the
//   lower vocabulary index. Raw pointers only; the torch binding is csrc/cuda/topk_binding.cpp.
//
// Two main loops share one epilogue (both: BM = 128 rows x BN = 128 vocabulary columns per tile, 256 threads):
//   * "mma"   (sm_80+): mma.sync.aligned.m16n8k16 (bf16/fp16 in, float32 accumulators) fed by ldmatrix.x4 from
//             XOR-swizzled shared memory (conflict-free for cp.async stores and ldmatrix reads), BK = 32,
//             a 4-stage cp.async (16-byte, zero-filling) global -> shared pipeline; 8 warps in a 2 x 4 grid, a
//             64 x 32 warp tile (4 x 4 mma tiles, 64 float accumulators per thread).
//   * "wgmma" (sm_90a only): wgmma.mma_async m64n128k16 with both operands read from shared memory through
//             matrix descriptors (128-byte swizzle, K-major, BK = 64), 2 warpgroups of 64 rows each, a 5-stage
//             cp.async pipeline (three stages in flight while one wgmma group runs: wgmma.wait_group 1);
//             cp.async writes reach the tensor cores' async proxy through fence.proxy.async before the barrier.
//             Compiled only in the sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL); blens_topk_fast_available() runs a
//             probe kernel of this file to learn whether the loaded image has it.
// The pipeline runs over the flattened (vocabulary tile, k step) sequence of a block, so the next tile's first
// stages are in flight while the epilogue of the current tile runs (the accumulator tile goes through its own
// shared-memory buffer, not through the operand stages).
//
// The norm prologue x = (h * a - c) * norm_w + norm_b (float32, each operation rounded as torch does it, no FMA
// contraction), rounded to the weight dtype, is applied ONCE per element by blens_topk_prep_launch into an
// N x Dp workspace (Dp = d rounded up to 8, zero padded); the GEMM then streams that workspace with cp.async. The
// same pre-pass converts float32 or strided hidden states. Without a prologue, 16-bit hidden rows with 16-byte
// aligned rows are read in place.
//
// Epilogue, per tile (one half = 64 rows at a time through a 64 x (128 + 8) float32 buffer): the warps that hold
// the half's accumulators store them, then each of the 8 warps takes 8 rows; every lane holds 4 columns
// (lane + 32 j) of a row and updates its running (max, sum exp) per row, the target counts (one __ballot_sync +
// __popc per column group and counter, accumulated in a per-lane register: lane 3 i + c holds counter c of row i),
// and tests its logits against each list's float bound. Rows that pass go through the exact 64-bit key selection
// (list_offer): while a row's k-slot list still has empty slots, candidates are written in parallel (ballot rank)
// into the next empty slots; once it is full, candidates replace the minimum slot one at a time, the new minimum
// coming from a warp reduction (__reduce_min_sync on the two key halves, sm_80+).
// Split-V: blocks own a contiguous range of vocabulary tiles (a split); splits are merged by the binding. With
// several splits, each split publishes its list's threshold key per row (atomicMax into floor[2][N]) and every split
// also prunes with the published maximum: an element whose key is not above another split's k-th best key cannot be
// in the row's top-k, so the merged result is exact while the splits do far fewer insertions.
// Block order: blockIdx.x -> (row tile, split) in groups of `group` row tiles (split-major inside a group), so the
// blocks resident at once read few distinct hidden panels and few distinct weight tiles (L2 reuse).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "topk_common.cuh"

namespace blens_fast_topk {

using namespace blens_topk_common;

using u64 = unsigned long long;

constexpr int BM = 128;
constexpr int BN = 128;
constexpr int THREADS = 256;
constexpr int HALF = 64;            // rows per epilogue half
constexpr int RPW = 8;              // rows per warp per half
constexpr int LDC = BN + 8;         // float2 accumulator stores: conflict-free per half-warp
constexpr int MAX_K = 256;
constexpr unsigned FULL = 0xffffffffu;
constexpr u64 FULL_LIST = 1ull << 32;  // thresholds below this are "list not full" (empty-slot keys 0 .. k-1)

// mma.sync main loop
constexpr int MMA_BK = 32;
constexpr int MMA_STAGES = 4;
constexpr int MMA_STAGE_BYTES = (BM + BN) * MMA_BK * 2;  // 16 KiB
// wgmma main loop
constexpr int WG_BK = 64;
constexpr int WG_STAGES = 5;
constexpr int WG_TILE_BYTES = BM * WG_BK * 2;           // 16 KiB per operand tile, 1024-byte aligned
constexpr int WG_STAGE_BYTES = 2 * WG_TILE_BYTES;       // 32 KiB

struct EpiSmem {
  float C[HALF * LDC];   // one half of the accumulator tile (+ nothing else aliases it)
  u64 thr[2][BM];        // per list and row: the minimum key of the k slots (the threshold)
  long long tgt[BM];     // target id per row (counts only)
  int pos[2][BM];        // the threshold's slot
  float tau[BM];         // target logit per row
};

constexpr int MMA_SMEM = MMA_STAGES * MMA_STAGE_BYTES + static_cast<int>(sizeof(EpiSmem));
constexpr int WG_SMEM = 1024 + WG_STAGES * WG_STAGE_BYTES + static_cast<int>(sizeof(EpiSmem));  // +1024: alignment

struct Params {
  const void* X;  // N x ldx, the weight dtype (the prologue applied), rows 16-byte aligned
  long long ldx;
  const void* W;  // V x ldw, rows 16-byte aligned
  long long ldw;
  const float* bias;  // V or nullptr
  const long long* target_ids;
  const float* target_logits;
  long long N, V, D;
  int k;
  int splits, group;
  long long row_tiles, n_tiles, tiles_per_split;
  u64* keys_top;     // [splits, N, k] or nullptr
  u64* keys_bottom;  // [splits, N, k] or nullptr
  long long* counts; // [splits, N, 3] or nullptr
  float* part_m;     // [splits, N]
  float* part_s;
  u64* floor;        // [2, N] published thresholds (zero-initialised) or nullptr (one split)
};

// ------------------------------------------------------------------------------------------------------------------
// small helpers
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte cp.async, bypassing L1; bytes < 16 zero-fill the rest (0: nothing is read, src only has to be valid)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename TW> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                             uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u64 umax64(u64 a, u64 b) { return a > b ? a : b; }

// Warp-wide minimum key of the row's k slots and its slot. The slot `wpos` was just written with `wval` by lane 0:
// its value is taken from the register, not read back.
__device__ __forceinline__ void list_min(const u64* list, int k, int lane, int wpos, u64 wval, u64& thr, int& pos) {
  u64 best = ~0ull;
  int bpos = 0;
  for (int q = lane; q < k; q += 32) {
    const u64 v = q == wpos ? wval : list[q];
    if (v < best) { best = v; bpos = q; }
  }
  const unsigned hi = static_cast<unsigned>(best >> 32), lo = static_cast<unsigned>(best);
  const unsigned mhi = __reduce_min_sync(FULL, hi);
  const unsigned mlo = __reduce_min_sync(FULL, hi == mhi ? lo : 0xFFFFFFFFu);
  const u64 m = (static_cast<u64>(mhi) << 32) | mlo;
  const unsigned who = __ballot_sync(FULL, best == m);
  pos = __shfl_sync(FULL, bpos, __ffs(who) - 1);
  thr = m;
}

// Warp-wide selection update of one row and one list (top: s = logit, bottom: s = -logit). This lane's columns are
// col0 + lane + 32 j (those below n_valid exist). A column is a candidate when its key beats both the list's
// threshold and `floor` (another split's published threshold: not above it means not in the row's top-k).
__device__ __forceinline__ void list_offer(u64* list, int k, int lane, const float (&s)[4], long long col0, int n_valid,
                                           u64 floor, u64& thr, int& pos) {
  u64 key[4];
  bool cand[4];
  u64 cut = umax64(thr, floor);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = lane + 32 * j;
    key[j] = c < n_valid ? make_key(s[j], col0 + c) : 0ull;  // 0 never beats a threshold
    cand[j] = key[j] > cut;
  }
  if (thr < FULL_LIST) {
    // The list is not full: slots [0, filled) hold keys, slot q >= filled holds the empty key q, so the threshold
    // is `filled` itself. Candidates go, in parallel, into the next empty slots (ranked by ballot).
    const int filled = static_cast<int>(thr);
    const int room = k - filled;
    const unsigned lt = (1u << lane) - 1u;
    int base = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const unsigned b = __ballot_sync(FULL, cand[j]);
      const int rank = base + __popc(b & lt);
      if (cand[j] && rank < room) {
        list[filled + rank] = key[j];
        cand[j] = false;
      }
      base += __popc(b);
    }
    __syncwarp();
    if (base < room) {  // warp-uniform: every candidate found a slot and the list still has empty ones
      thr = static_cast<u64>(filled + base);
      pos = filled + base;
      return;
    }
    list_min(list, k, lane, -1, 0ull, thr, pos);  // full now
    cut = umax64(thr, floor);
#pragma unroll
    for (int j = 0; j < 4; ++j) cand[j] = cand[j] && key[j] > cut;
  }
  unsigned bal = __ballot_sync(FULL, cand[0] | cand[1] | cand[2] | cand[3]);
  while (bal) {
    const int leader = __ffs(bal) - 1;
    u64 mine = 0ull;
    int mj = -1;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (cand[j] && key[j] > mine) { mine = key[j]; mj = j; }
    const u64 c = __shfl_sync(FULL, mine, leader);
    if (lane == leader) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j == mj) cand[j] = false;
    }
    if (c > cut) {  // warp-uniform (always true: candidates are refreshed against cut below)
      const int wpos = pos;
      if (lane == 0) list[wpos] = c;
      __syncwarp();
      list_min(list, k, lane, wpos, c, thr, pos);
      cut = umax64(thr, floor);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) cand[j] = cand[j] && key[j] > cut;
    bal = __ballot_sync(FULL, cand[0] | cand[1] | cand[2] | cand[3]);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// the epilogue, shared by both main loops
struct BlockInfo {
  long long row0, split, t_begin, t_end;
};

__device__ __forceinline__ BlockInfo block_info(const Params& p) {
  // blockIdx.x -> (row tile, split): groups of `group` row tiles, split-major inside a group
  const long long b = blockIdx.x;
  const long long gsize = static_cast<long long>(p.group) * p.splits;
  const long long g = b / gsize, rem = b % gsize;
  const long long rows_here = min(static_cast<long long>(p.group), p.row_tiles - g * p.group);
  BlockInfo bi;
  bi.split = rem / rows_here;
  bi.row0 = (g * p.group + rem % rows_here) * BM;
  bi.t_begin = bi.split * p.tiles_per_split;
  bi.t_end = min(bi.t_begin + p.tiles_per_split, p.n_tiles);
  return bi;
}

__device__ __forceinline__ u64* row_list(const Params& p, int dir, long long split, long long row) {
  return (dir ? p.keys_bottom : p.keys_top) + (static_cast<size_t>(split) * p.N + row) * p.k;
}

// Per warp state: rows h * 64 + warp * 8 + i (h = 0, 1; i = 0 .. 7) of the block.
struct RowState {
  float m[2 * RPW], s[2 * RPW];  // this lane's running (max, sum exp) per row
  unsigned cnt[2];               // lane 3 i + c: counter c of row i of half h
};

__device__ __forceinline__ void epi_init(const Params& p, EpiSmem& E, const BlockInfo& bi, RowState& st, int warp,
                                         int lane) {
  const bool top = p.keys_top != nullptr, bottom = p.keys_bottom != nullptr, count = p.counts != nullptr;
#pragma unroll
  for (int i = 0; i < 2 * RPW; ++i) { st.m[i] = -INFINITY; st.s[i] = 0.f; }
  st.cnt[0] = st.cnt[1] = 0u;
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < RPW; ++i) {
      const int r = h * HALF + warp * RPW + i;
      const long long row = bi.row0 + r;
      if (row >= p.N) break;
      for (int dir = 0; dir < 2; ++dir) {
        if (!(dir ? bottom : top)) continue;
        u64* list = row_list(p, dir, bi.split, row);
        for (int q = lane; q < p.k; q += 32) list[q] = static_cast<u64>(q);  // distinct "empty" keys
        if (lane == 0) { E.thr[dir][r] = 0ull; E.pos[dir][r] = 0; }
      }
      if (count && lane == 0) { E.tgt[r] = p.target_ids[row]; E.tau[r] = p.target_logits[row]; }
    }
  }
  __syncwarp();
}

// Rows of half H (Cs rows warp * 8 + i) of the tile starting at column col0: log-sum-exp, counts, prefilter, then
// the exact selection of the flagged (row, list) pairs.
template <int H>
__device__ __forceinline__ void epi_half(const Params& p, EpiSmem& E, const BlockInfo& bi, RowState& st, long long col0,
                                         int n_valid, const bool (&valid)[4], const float (&bj)[4], int warp, int lane) {
  const bool top = p.keys_top != nullptr, bottom = p.keys_bottom != nullptr, count = p.counts != nullptr;
  // published thresholds of this warp's 8 rows: lane l < 16 holds list l >> 3, row l & 7
  u64 fl = 0ull;
  if (p.floor != nullptr && lane < 16) {
    const int dir = lane >> 3;
    const long long row = bi.row0 + H * HALF + warp * RPW + (lane & 7);
    if (row < p.N && (dir ? bottom : top)) fl = __ldcg(p.floor + dir * p.N + row);
  }
  const float* C = E.C;
  auto logit = [&](int rr, int j) { return valid[j] ? C[rr * LDC + lane + 32 * j] + bj[j] : -INFINITY; };
  unsigned need = 0;  // bit 2 i + dir: row i may have candidates for list dir (warp-uniform)
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int rr = warp * RPW + i;
    const int r = H * HALF + rr;
    if (bi.row0 + r < p.N) {  // warp-uniform
      float x[4];
      float bmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[j] = logit(rr, j);
        bmax = fmaxf(bmax, x[j]);
      }
      // this lane's online log-sum-exp (NaN propagates through the sum)
      float& ml = st.m[H * RPW + i];
      float& sl = st.s[H * RPW + i];
      const float m_new = fmaxf(ml, bmax);
      if (m_new != -INFINITY) {
        float s = sl * __expf(ml - m_new);
#pragma unroll
        for (int j = 0; j < 4; ++j) s += __expf(x[j] - m_new);
        sl = s;
        ml = m_new;
      }
      if (count) st.cnt[H] += target_count_share(x, valid, E.tau[r], E.tgt[r], col0, BN, lane, i);
      // a list's candidates satisfy !(s < bound): flag the row for the exact selection
      if (top) {
        const float b = key_bound(umax64(E.thr[0][r], __shfl_sync(FULL, fl, i)));
        const bool q = (valid[0] && !(x[0] < b)) || (valid[1] && !(x[1] < b)) || (valid[2] && !(x[2] < b)) ||
                       (valid[3] && !(x[3] < b));
        if (__any_sync(FULL, q)) need |= 1u << (2 * i);
      }
      if (bottom) {
        const float b = key_bound(umax64(E.thr[1][r], __shfl_sync(FULL, fl, RPW + i)));
        const bool q = (valid[0] && !(-x[0] < b)) || (valid[1] && !(-x[1] < b)) || (valid[2] && !(-x[2] < b)) ||
                       (valid[3] && !(-x[3] < b));
        if (__any_sync(FULL, q)) need |= 2u << (2 * i);
      }
    }
  }
  while (need) {  // warp-uniform
    const int bit = __ffs(need) - 1;
    need &= need - 1;
    const int i = bit >> 1, dir = bit & 1;
    const int rr = warp * RPW + i;
    const int r = H * HALF + rr;
    const long long row = bi.row0 + r;
    float s[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j] = dir ? -logit(rr, j) : logit(rr, j);
    const u64 f = __shfl_sync(FULL, fl, dir * RPW + i);
    u64 thr = E.thr[dir][r];
    int pos = E.pos[dir][r];
    list_offer(row_list(p, dir, bi.split, row), p.k, lane, s, col0, n_valid, f, thr, pos);
    __syncwarp();  // every lane has read E.thr / E.pos before lane 0 writes them
    if (lane == 0) {
      E.thr[dir][r] = thr;
      E.pos[dir][r] = pos;
      if (p.floor != nullptr && thr >= FULL_LIST && thr > f) atomicMax(p.floor + dir * p.N + row, thr);
    }
  }
}

// per-row (max, sum exp) over lanes, counts, and the stored keys ^ 2^63
__device__ __forceinline__ void epi_finish(const Params& p, const BlockInfo& bi, RowState& st, int warp, int lane) {
  const bool top = p.keys_top != nullptr, bottom = p.keys_bottom != nullptr, count = p.counts != nullptr;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const long long row = bi.row0 + h * HALF + warp * RPW + i;
      if (row < p.N) {
        const float ml = st.m[h * RPW + i], sl = st.s[h * RPW + i];
        float m = ml;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, off));
        float s = (ml == -INFINITY) ? 0.f : sl * __expf(ml - m);
        if (ml != ml || sl != sl) s = NAN;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
        const size_t at = static_cast<size_t>(bi.split) * p.N + row;
        if (lane == 0) {
          p.part_m[at] = m;
          p.part_s[at] = s;
        }
        if (count && lane >= 3 * i && lane < 3 * i + 3) p.counts[at * 3 + (lane - 3 * i)] = st.cnt[h];
        __syncwarp();
        for (int dir = 0; dir < 2; ++dir) {
          if (!(dir ? bottom : top)) continue;
          u64* list = row_list(p, dir, bi.split, row);
          for (int q = lane; q < p.k; q += 32) list[q] ^= 0x8000000000000000ull;
        }
      }
    }
  }
}

// bias and column validity of this lane's 4 columns of the tile
__device__ __forceinline__ int tile_columns(const Params& p, long long col0, int lane, bool (&valid)[4], float (&bj)[4]) {
  const int n_valid = static_cast<int>(min(static_cast<long long>(BN), p.V - col0));
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    valid[j] = lane + 32 * j < n_valid;
    bj[j] = (valid[j] && p.bias) ? p.bias[col0 + lane + 32 * j] : 0.f;
  }
  return n_valid;
}

// Position of the next stage load in a block's flattened (vocabulary tile, k step) sequence.
struct StageCursor {
  int slot;
  long long t;
  int kt;
  long long count;
  __device__ __forceinline__ void advance(int KT, int stages) {
    ++count;
    slot = slot + 1 == stages ? 0 : slot + 1;
    if (++kt == KT) { kt = 0; ++t; }
  }
};

// ------------------------------------------------------------------------------------------------------------------
// "mma": mma.sync m16n8k16 + ldmatrix + 4-stage cp.async (sm_80+)
// Stage layout: A [128 rows][32] then B [128 rows][32], 16-bit, 64-byte rows of four 16-byte chunks; chunk c of row
// r sits at chunk c ^ ((r >> 1) & 3): ldmatrix (8 rows, one chunk column) and the cp.async stores hit 8 distinct
// 16-byte bank groups.
__device__ __forceinline__ uint32_t mma_off(int row, int chunk) {
  return static_cast<uint32_t>(row * (MMA_BK * 2) + ((chunk ^ ((row >> 1) & 3)) << 4));
}
__device__ __forceinline__ uint32_t wg_off(int row, int chunk) {
  return static_cast<uint32_t>(row * (WG_BK * 2) + ((chunk ^ (row & 7)) << 4));
}

// Byte offsets of (row, 16-byte chunk) in a swizzled operand tile: the mma.sync layout and wgmma's 128B swizzle.
struct MmaLayout {
  static constexpr int BK = MMA_BK;
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) { return mma_off(row, chunk); }
};
struct WgmmaLayout {
  static constexpr int BK = WG_BK;
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) { return wg_off(row, chunk); }
};

// One pipeline stage: the BM x BK hidden block (rows row0..) and the BN x BK vocabulary tile t of W at depth k0, in
// 16-byte cp.async chunks spread over the block's threads; chunks past N, V or D are zero-filled.
template <typename Layout, typename TW>
__device__ __forceinline__ void load_stage(const Params& p, const TW* X, const TW* W, long long row0, long long t,
                                           long long k0, uint32_t sA, uint32_t sB, int tid) {
  static_assert(BM == BN, "one row index serves both operand tiles");
  constexpr int CHUNKS = Layout::BK / 8;  // a power of two: row and chunk by shift and mask
  constexpr int SHIFT = CHUNKS == 8 ? 3 : CHUNKS == 4 ? 2 : -1;
  static_assert(SHIFT > 0, "BK of 32 or 64");
  constexpr int PER_THREAD = BM * CHUNKS / THREADS;
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) {
    const int id = tid + THREADS * e;
    const int r = id >> SHIFT, c = id & (CHUNKS - 1);
    const long long kk = k0 + c * 8;
    const int kbytes = kk < p.D ? static_cast<int>(min(8LL, p.D - kk)) * 2 : 0;
    const long long grow = row0 + r;
    const bool a_ok = grow < p.N && kbytes > 0;
    cp_async16(sA + Layout::offset(r, c), a_ok ? static_cast<const void*>(X + grow * p.ldx + kk) : p.X,
               a_ok ? kbytes : 0);
    const long long gcol = t * BN + r;
    const bool b_ok = gcol < p.V && kbytes > 0;
    cp_async16(sB + Layout::offset(r, c), b_ok ? static_cast<const void*>(W + gcol * p.ldw + kk) : p.W,
               b_ok ? kbytes : 0);
  }
}

template <typename TW>
__global__ void __launch_bounds__(THREADS, 1) topk_mma_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  EpiSmem& E = *reinterpret_cast<EpiSmem*>(smem + MMA_STAGES * MMA_STAGE_BYTES);
  const uint32_t sbase = smem_u32(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps: rows wm * 64, columns wn * 32
  const BlockInfo bi = block_info(p);
  const TW* X = static_cast<const TW*>(p.X);
  const TW* W = static_cast<const TW*>(p.W);

  RowState st;
  epi_init(p, E, bi, st, warp, lane);

  const int KT = static_cast<int>((p.D + MMA_BK - 1) / MMA_BK);
  const long long total = (bi.t_end - bi.t_begin) * KT;
  // loader: 512 chunks of A and 512 of B per stage, 2 + 2 per thread; it walks the flattened (tile, k step)
  // sequence with counters (no divisions)
  StageCursor ld{0, bi.t_begin, 0, 0};
  auto load_next = [&]() {
    if (ld.count < total) {
      const uint32_t sA = sbase + ld.slot * MMA_STAGE_BYTES;
      load_stage<MmaLayout>(p, X, W, bi.row0, ld.t, static_cast<long long>(ld.kt) * MMA_BK, sA, sA + BM * MMA_BK * 2,
                            tid);
    }
    cp_async_commit();  // always: the wait_group counts stay uniform
    ld.advance(KT, MMA_STAGES);
  };

#pragma unroll
  for (int s = 0; s < MMA_STAGES - 1; ++s) load_next();

  int slot = 0;
  for (long long t = bi.t_begin; t < bi.t_end; ++t) {
    float acc[4][4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<MMA_STAGES - 2>();  // this stage has landed (for this thread) ...
      __syncthreads();                  // ... for every thread; and everyone is done with the previous stage
      load_next();                      // into the previous stage's slot
      const uint32_t sA = sbase + slot * MMA_STAGE_BYTES, sB = sA + BM * MMA_BK * 2;
      slot = slot + 1 == MMA_STAGES ? 0 : slot + 1;
#pragma unroll
      for (int ks = 0; ks < MMA_BK / 16; ++ks) {
        uint32_t af[4][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const int r = wm * 64 + mi * 16 + (lane & 15);
          ldmatrix_x4(af[mi], sA + mma_off(r, ks * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
          const int n = wn * 32 + nb * 16 + (lane & 7) + ((lane >> 4) << 3);
          uint32_t rb[4];
          ldmatrix_x4(rb, sB + mma_off(n, ks * 2 + ((lane >> 3) & 1)));
          bf[2 * nb][0] = rb[0];
          bf[2 * nb][1] = rb[1];
          bf[2 * nb + 1][0] = rb[2];
          bf[2 * nb + 1][1] = rb[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int nj = 0; nj < 4; ++nj) mma16816<TW>(acc[mi][nj], af[mi], bf[nj][0], bf[nj][1]);
      }
    }

    // ---------------- epilogue of tile t (the next tile's first stages are already in flight) ----------------
    const long long col0 = t * BN;
    bool valid[4];
    float bj[4];
    const int n_valid = tile_columns(p, col0, lane, valid, bj);
    const int g = lane >> 2, q4 = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      __syncthreads();  // the previous half's (or tile's) readers are done with E.C
      if (wm == h) {
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int nj = 0; nj < 4; ++nj) {
            const int r = mi * 16 + g, c = wn * 32 + nj * 8 + 2 * q4;
            *reinterpret_cast<float2*>(&E.C[r * LDC + c]) = make_float2(acc[mi][nj][0], acc[mi][nj][1]);
            *reinterpret_cast<float2*>(&E.C[(r + 8) * LDC + c]) = make_float2(acc[mi][nj][2], acc[mi][nj][3]);
          }
      }
      __syncthreads();
      if (h == 0) epi_half<0>(p, E, bi, st, col0, n_valid, valid, bj, warp, lane);
      else epi_half<1>(p, E, bi, st, col0, n_valid, valid, bj, warp, lane);
    }
  }
  cp_async_wait<0>();
  epi_finish(p, bi, st, warp, lane);
}

// ------------------------------------------------------------------------------------------------------------------
// "wgmma": wgmma.mma_async m64n128k16 from shared memory + 5-stage cp.async (sm_90a only)
// Stage layout: A [128 rows][64] then B [128 rows][64], 16-bit, 128-byte rows; chunk c of row r sits at chunk
// c ^ (r & 7) (the 128-byte swizzle the descriptors declare; each operand tile 1024-byte aligned).

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BLENS_WGMMA 1
// K-major operand in shared memory with the 128-byte swizzle: start address, leading byte offset 16 (unused for
// swizzled K-major layouts), stride byte offset 1024 (8 rows of 128 bytes), swizzle mode 1 (128B) in bits 62-63.
__device__ __forceinline__ u64 wg_desc(uint32_t addr) {
  u64 d = static_cast<u64>((addr & 0x3FFFF) >> 4);
  d |= static_cast<u64>(16 >> 4) << 16;
  d |= static_cast<u64>(1024 >> 4) << 32;
  d |= 1ull << 62;
  return d;
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// keeps the compiler from moving accumulator accesses across wgmma issue / wait points
__device__ __forceinline__ void fence_operands(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define BLENS_WG_D(i) "+f"(d[i])
#define BLENS_WG_OUT                                                                                                \
  BLENS_WG_D(0), BLENS_WG_D(1), BLENS_WG_D(2), BLENS_WG_D(3), BLENS_WG_D(4), BLENS_WG_D(5), BLENS_WG_D(6),          \
      BLENS_WG_D(7), BLENS_WG_D(8), BLENS_WG_D(9), BLENS_WG_D(10), BLENS_WG_D(11), BLENS_WG_D(12), BLENS_WG_D(13),  \
      BLENS_WG_D(14), BLENS_WG_D(15), BLENS_WG_D(16), BLENS_WG_D(17), BLENS_WG_D(18), BLENS_WG_D(19),               \
      BLENS_WG_D(20), BLENS_WG_D(21), BLENS_WG_D(22), BLENS_WG_D(23), BLENS_WG_D(24), BLENS_WG_D(25),               \
      BLENS_WG_D(26), BLENS_WG_D(27), BLENS_WG_D(28), BLENS_WG_D(29), BLENS_WG_D(30), BLENS_WG_D(31),               \
      BLENS_WG_D(32), BLENS_WG_D(33), BLENS_WG_D(34), BLENS_WG_D(35), BLENS_WG_D(36), BLENS_WG_D(37),               \
      BLENS_WG_D(38), BLENS_WG_D(39), BLENS_WG_D(40), BLENS_WG_D(41), BLENS_WG_D(42), BLENS_WG_D(43),               \
      BLENS_WG_D(44), BLENS_WG_D(45), BLENS_WG_D(46), BLENS_WG_D(47), BLENS_WG_D(48), BLENS_WG_D(49),               \
      BLENS_WG_D(50), BLENS_WG_D(51), BLENS_WG_D(52), BLENS_WG_D(53), BLENS_WG_D(54), BLENS_WG_D(55),               \
      BLENS_WG_D(56), BLENS_WG_D(57), BLENS_WG_D(58), BLENS_WG_D(59), BLENS_WG_D(60), BLENS_WG_D(61),               \
      BLENS_WG_D(62), BLENS_WG_D(63)
#define BLENS_WG_REGS                                                                                               \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "   \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

template <typename TW> __device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], u64 da, u64 db);
template <> __device__ __forceinline__ void wgmma_m64n128k16<__nv_bfloat16>(float (&d)[64], u64 da, u64 db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " BLENS_WG_REGS ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : BLENS_WG_OUT
      : "l"(da), "l"(db), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_m64n128k16<__half>(float (&d)[64], u64 da, u64 db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " BLENS_WG_REGS ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : BLENS_WG_OUT
      : "l"(da), "l"(db), "r"(1));
}
#endif

template <typename TW>
__global__ void __launch_bounds__(THREADS, 1) topk_wgmma_kernel(const Params p) {
#if defined(BLENS_WGMMA)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // operand tiles 1024-byte aligned (the 128-byte swizzle pattern repeats every 8 rows = 1024 bytes)
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  unsigned char* smem = smem_raw + pad;
  EpiSmem& E = *reinterpret_cast<EpiSmem*>(smem + WG_STAGES * WG_STAGE_BYTES);
  const uint32_t sbase = raw + pad;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup wg: rows wg * 64 .. + 63, all 128 columns
  const BlockInfo bi = block_info(p);
  const TW* X = static_cast<const TW*>(p.X);
  const TW* W = static_cast<const TW*>(p.W);

  RowState st;
  epi_init(p, E, bi, st, warp, lane);

  const int KT = static_cast<int>((p.D + WG_BK - 1) / WG_BK);
  const long long total = (bi.t_end - bi.t_begin) * KT;
  StageCursor ld{0, bi.t_begin, 0, 0};
  auto load_next = [&]() {  // 1024 chunks of A and 1024 of B per stage, 4 + 4 per thread
    if (ld.count < total) {
      const uint32_t sA = sbase + ld.slot * WG_STAGE_BYTES;
      load_stage<WgmmaLayout>(p, X, W, bi.row0, ld.t, static_cast<long long>(ld.kt) * WG_BK, sA, sA + WG_TILE_BYTES,
                              tid);
    }
    cp_async_commit();
    ld.advance(KT, WG_STAGES);
  };

  // loads run WG_STAGES - 2 iterations ahead: the slot a load overwrites was read by the wgmma group two
  // iterations back, which every thread has waited for (wait_group 1) before the barrier that precedes the load
#pragma unroll
  for (int s = 0; s < WG_STAGES - 2; ++s) load_next();

  float d[64];
  int slot = 0;
  for (long long t = bi.t_begin; t < bi.t_end; ++t) {
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.f;
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<WG_STAGES - 3>();
      fence_proxy_async();  // this thread's cp.async writes -> visible to the tensor cores (async proxy)
      __syncthreads();
      load_next();
      const uint32_t sA = sbase + slot * WG_STAGE_BYTES + wg * (64 * WG_BK * 2);
      const uint32_t sB = sbase + slot * WG_STAGE_BYTES + WG_TILE_BYTES;
      slot = slot + 1 == WG_STAGES ? 0 : slot + 1;
      wg_fence();
      fence_operands(d);
#pragma unroll
      for (int ks = 0; ks < WG_BK / 16; ++ks) wgmma_m64n128k16<TW>(d, wg_desc(sA + ks * 32), wg_desc(sB + ks * 32));
      wg_commit();
      fence_operands(d);
      wg_wait<1>();
      fence_operands(d);
    }
    wg_wait<0>();
    fence_operands(d);

    // ---------------- epilogue of tile t ----------------
    const long long col0 = t * BN;
    bool valid[4];
    float bj[4];
    const int n_valid = tile_columns(p, col0, lane, valid, bj);
    const int g = lane >> 2, q4 = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      __syncthreads();
      if (wg == h) {
        // accumulator layout of m64nNk16: warp wq of the warpgroup holds rows 16 wq + g and 16 wq + g + 8; register
        // 4 j + {0, 1} columns 8 j + 2 q4 + {0, 1} of the first, 4 j + {2, 3} the same columns of the second
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const int r = 16 * wq + g, c = 8 * j + 2 * q4;
          *reinterpret_cast<float2*>(&E.C[r * LDC + c]) = make_float2(d[4 * j], d[4 * j + 1]);
          *reinterpret_cast<float2*>(&E.C[(r + 8) * LDC + c]) = make_float2(d[4 * j + 2], d[4 * j + 3]);
        }
      }
      __syncthreads();
      if (h == 0) epi_half<0>(p, E, bi, st, col0, n_valid, valid, bj, warp, lane);
      else epi_half<1>(p, E, bi, st, col0, n_valid, valid, bj, warp, lane);
    }
  }
  cp_async_wait<0>();
  epi_finish(p, bi, st, warp, lane);
#else
  __trap();  // this image was not compiled for sm_90a: the host never launches it (blens_topk_fast_available)
#endif
}

// 1 when this image was compiled in the sm_90a pass (wgmma available), else 0
__global__ void wgmma_probe_kernel(int* out) {
#if defined(BLENS_WGMMA)
  *out = 1;
#else
  *out = 0;
#endif
}

// ------------------------------------------------------------------------------------------------------------------
// the pre-pass: X = round_to_TW((h * a - c) * norm_w + norm_b), zero padded to Dp columns
template <typename TW, typename TH>
__global__ void prep_kernel(const TH* __restrict__ h, long long ldh, const float* __restrict__ a,
                            const float* __restrict__ c, const float* __restrict__ nw, const float* __restrict__ nb,
                            long long N, long long D, long long Dp, TW* __restrict__ X) {
  for (long long row = blockIdx.x; row < N; row += gridDim.x) {
    const float ra = a ? a[row] : 1.f, rc = a ? c[row] : 0.f;
    for (long long kk = threadIdx.x; kk < Dp; kk += blockDim.x) {
      float x = 0.f;
      if (kk < D) {
        x = to_float(h[row * ldh + kk]);
        if (a) {
          x = __fsub_rn(__fmul_rn(x, ra), rc);  // as torch computes h * a - c: two roundings, no FMA
          if (nw) x = __fmul_rn(x, nw[kk]);
          if (nb) x = __fadd_rn(x, nb[kk]);
        }
      }
      X[row * Dp + kk] = from_float<TW>(x);
    }
  }
}

template <typename TW>
int launch_fast(int variant, const Params& p, cudaStream_t stream) {
  const long long blocks = p.row_tiles * p.splits;
  if (blocks <= 0) return 0;
  if (blocks > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaError_t err;
  if (variant == 1) {
    err = cudaFuncSetAttribute(topk_mma_kernel<TW>, cudaFuncAttributeMaxDynamicSharedMemorySize, MMA_SMEM);
    if (err != cudaSuccess) return static_cast<int>(err);
    topk_mma_kernel<TW><<<static_cast<unsigned>(blocks), THREADS, MMA_SMEM, stream>>>(p);
  } else {
    err = cudaFuncSetAttribute(topk_wgmma_kernel<TW>, cudaFuncAttributeMaxDynamicSharedMemorySize, WG_SMEM);
    if (err != cudaSuccess) return static_cast<int>(err);
    topk_wgmma_kernel<TW><<<static_cast<unsigned>(blocks), THREADS, WG_SMEM, stream>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename TW, typename TH>
int launch_prep(const void* hidden, long long ldh, const float* a, const float* c, const float* nw, const float* nb,
                long long N, long long D, long long Dp, void* X, cudaStream_t stream) {
  if (N == 0) return 0;
  const unsigned blocks = static_cast<unsigned>(N < 65535 ? N : 65535);
  prep_kernel<TW, TH><<<blocks, 256, 0, stream>>>(static_cast<const TH*>(hidden), ldh, a, c, nw, nb, N, D, Dp,
                                                  static_cast<TW*>(X));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace blens_fast_topk

// ------------------------------------------------------------------------------------------------------------------
// C interface (host). Variants: 1 "mma" (sm_80+), 2 "wgmma" (sm_90a image on a compute capability 9.0 device).
// dtype codes as in topk_kernel.cu: 1 bfloat16, 2 float16 (the weight's dtype; X is in it too).

extern "C" int blens_topk_fast_block_rows() { return blens_fast_topk::BM; }
extern "C" int blens_topk_fast_block_cols() { return blens_fast_topk::BN; }
extern "C" int blens_topk_fast_max_k() { return blens_fast_topk::MAX_K; }
extern "C" int blens_topk_fast_smem_bytes(int variant) {
  return variant == 2 ? blens_fast_topk::WG_SMEM : blens_fast_topk::MMA_SMEM;
}

// 1 when `variant` can run on the current device, else 0 (a negative cudaError_t on a CUDA failure).
extern "C" int blens_topk_fast_available(int variant) {
  int dev = 0, major = 0, minor = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return -static_cast<int>(cudaErrorNoDevice);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (variant == 1) return (major >= 8 && optin >= blens_fast_topk::MMA_SMEM) ? 1 : 0;
  if (variant != 2) return 0;
  if (!(major == 9 && minor == 0) || optin < blens_fast_topk::WG_SMEM) return 0;
  static int cached[64];  // 0 unknown, 1 yes, 2 no (per device)
  if (dev < 64 && cached[dev]) return cached[dev] == 1 ? 1 : 0;
  int* d_out = nullptr;
  int h_out = 0;
  cudaError_t err = cudaMalloc(&d_out, sizeof(int));
  if (err != cudaSuccess) return -static_cast<int>(err);
  blens_fast_topk::wgmma_probe_kernel<<<1, 1>>>(d_out);
  err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(&h_out, d_out, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d_out);
  if (err != cudaSuccess) return -static_cast<int>(err);
  if (dev < 64) cached[dev] = h_out == 1 ? 1 : 2;
  return h_out == 1 ? 1 : 0;
}

// Splits of the vocabulary and row tiles per group for N x V x D on a device with `sms` multiprocessors and
// `l2_bytes` of L2 (one resident block per multiprocessor). Minimises waves x (tiles per block + 2), the 2 standing
// for a block's fixed costs (list set-up, the first tile's fill, the final flush); when the hidden panels of all row
// tiles (BM x D x 2 bytes each) do not fit in 40% of the L2, groups of row tiles that do fit are formed and at least
// ceil(sms / group) splits are used, so the resident blocks share few panels. `splits` / `group` > 0 are kept as
// given (clamped). Returns 0.
extern "C" int blens_topk_fast_plan(long long N, long long V, long long D, int sms, long long l2_bytes, int* splits,
                                    int* group) {
  using namespace blens_fast_topk;
  if (sms < 1) sms = 1;
  const long long row_tiles = N > 0 ? (N + BM - 1) / BM : 1;
  const long long n_tiles = (V + BN - 1) / BN;
  const long long panel = static_cast<long long>(BM) * ((D + 7) / 8 * 8) * 2;
  long long g = *group > 0 ? *group : row_tiles;
  long long min_s = 1;
  if (*group <= 0 && l2_bytes > 0 && row_tiles * panel > (l2_bytes * 2) / 5) {
    g = (l2_bytes * 2) / 5 / panel;
    if (g < 1) g = 1;
    if (g < row_tiles) min_s = (sms + g - 1) / g;
  }
  if (g > row_tiles) g = row_tiles;
  const long long max_s = n_tiles < 65535 ? n_tiles : 65535;
  long long best_s = 1;
  if (*splits > 0) {
    best_s = *splits < max_s ? *splits : max_s;
  } else {
    double best = -1.0;
    for (long long s = 1; s <= max_s && s <= 4LL * sms; ++s) {
      if (s < min_s && min_s <= max_s) continue;
      const long long per = (n_tiles + s - 1) / s;
      const long long s_eff = (n_tiles + per - 1) / per;
      if (s_eff != s) continue;
      const long long waves = (row_tiles * s + sms - 1) / sms;
      const double cost = static_cast<double>(waves) * static_cast<double>(per + 2);
      if (best < 0 || cost < best) { best = cost; best_s = s; }
    }
  }
  const long long per = (n_tiles + best_s - 1) / best_s;
  *splits = static_cast<int>((n_tiles + per - 1) / per);
  *group = static_cast<int>(g);
  return 0;
}

// X = the weight-dtype rows the GEMM streams: (h * a - c) * norm_w + norm_b when row_a is given, else h converted;
// N x Dp (Dp = D rounded up to 8, the padding zero). hidden_f32: hidden is float32, else the weight's dtype.
extern "C" int blens_topk_prep_launch(int dtype, int hidden_f32, const void* hidden, long long ldh, const float* row_a,
                                      const float* row_c, const float* norm_w, const float* norm_b, long long N,
                                      long long D, long long Dp, void* X, cudaStream_t stream) {
  using namespace blens_fast_topk;
  if (row_a && !row_c) return static_cast<int>(cudaErrorInvalidValue);
  if (dtype == 1)
    return hidden_f32 ? launch_prep<__nv_bfloat16, float>(hidden, ldh, row_a, row_c, norm_w, norm_b, N, D, Dp, X, stream)
                      : launch_prep<__nv_bfloat16, __nv_bfloat16>(hidden, ldh, row_a, row_c, norm_w, norm_b, N, D, Dp,
                                                                  X, stream);
  if (dtype == 2)
    return hidden_f32 ? launch_prep<__half, float>(hidden, ldh, row_a, row_c, norm_w, norm_b, N, D, Dp, X, stream)
                      : launch_prep<__half, __half>(hidden, ldh, row_a, row_c, norm_w, norm_b, N, D, Dp, X, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}

// The projection of X (N x D in the weight's dtype, row stride ldx, rows 16-byte aligned) through W (V x D, row
// stride ldw, rows 16-byte aligned). Outputs per split as in topk_kernel.cu: keys_top / keys_bottom [splits, N, k]
// (int64 keys ^ 2^63, unsorted) or nullptr, counts [splits, N, 3] or nullptr (then target_ids / target_logits are
// not read), part_m / part_s [splits, N]; floor: [2, N] zero-initialised int64 when splits > 1, else nullptr.
// `splits` and `group` as returned by blens_topk_fast_plan. Returns a cudaError_t value (0 = success).
extern "C" int blens_topk_fast_launch(int variant, int dtype, const void* X, long long ldx, const void* W, long long ldw,
                                      const float* bias, const long long* target_ids, const float* target_logits,
                                      long long N, long long V, long long D, int k, int splits, int group,
                                      long long* keys_top, long long* keys_bottom, long long* counts, float* part_m,
                                      float* part_s, long long* floor, cudaStream_t stream) {
  using namespace blens_fast_topk;
  if ((keys_top || keys_bottom) && (k < 1 || k > MAX_K || k > V)) return static_cast<int>(cudaErrorInvalidValue);
  if (counts && (!target_ids || !target_logits)) return static_cast<int>(cudaErrorInvalidValue);
  if ((reinterpret_cast<uintptr_t>(X) | reinterpret_cast<uintptr_t>(W)) % 16 != 0 || ldx % 8 != 0 || ldw % 8 != 0)
    return static_cast<int>(cudaErrorMisalignedAddress);
  if (splits < 1 || group < 1 || (variant != 1 && variant != 2)) return static_cast<int>(cudaErrorInvalidValue);
  if (N == 0) return 0;
  Params p;
  p.X = X;
  p.ldx = ldx;
  p.W = W;
  p.ldw = ldw;
  p.bias = bias;
  p.target_ids = target_ids;
  p.target_logits = target_logits;
  p.N = N;
  p.V = V;
  p.D = D;
  p.k = (keys_top || keys_bottom) ? k : 1;
  p.n_tiles = (V + BN - 1) / BN;
  p.tiles_per_split = (p.n_tiles + splits - 1) / splits;
  p.splits = static_cast<int>((p.n_tiles + p.tiles_per_split - 1) / p.tiles_per_split);
  if (p.splits != splits) return static_cast<int>(cudaErrorInvalidValue);  // use blens_topk_fast_plan's splits
  p.row_tiles = (N + BM - 1) / BM;
  p.group = static_cast<int>(group < p.row_tiles ? group : p.row_tiles);
  p.keys_top = reinterpret_cast<u64*>(keys_top);
  p.keys_bottom = reinterpret_cast<u64*>(keys_bottom);
  p.counts = counts;
  p.part_m = part_m;
  p.part_s = part_s;
  p.floor = splits > 1 ? reinterpret_cast<u64*>(floor) : nullptr;
  if (dtype == 1) return launch_fast<__nv_bfloat16>(variant, p, stream);
  if (dtype == 2) return launch_fast<__half>(variant, p, stream);
  return static_cast<int>(cudaErrorInvalidValue);
}
