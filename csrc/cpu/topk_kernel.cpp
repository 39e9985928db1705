// Fused vocabulary projection on the CPU, one pass: for norm(h) @ W^T + b, per row, any of the top-k list,
// the bottom-k list, the log-sum-exp and a target token's counts (for its rank), without the N x V logits.
//
// Work is cut into units of (row block, vocabulary split). A thread takes a unit, and for each vocabulary block of
// it computes the block's float32 logits into a cache-sized buffer, then -- while that block is still in cache --
// runs one pass per row that
//   * keeps a candidate buffer per row and list: an element enters only if it beats the list's running k-th key
//     (one vector compare per 8 logits and list; almost everything is rejected after the first block), and the
//     buffer is compacted with nth_element when it fills, which raises the threshold;
//   * counts the logits above, below and equal to (with a lower index) the row's target logit, in vector lanes
//     (the target's own column is taken out afterwards);
//   * tracks NaN, the block max, and the online log-sum-exp (vectorised exp).
// Memory is bounded by the per-thread blocks (never N x V). Units are handed out dynamically (an atomic counter) so a
// thread slowed by other work on the machine does not hold up the rest. When there are fewer row blocks than
// 2 x threads, the vocabulary is split too and the splits' lists and counts are merged at the end.
//
// Reproducibility: every result of a row depends on that row's inputs only -- not on the thread count, the units,
// the other rows of the call or their number, nor on the SIMD path:
//   * a logit is one chain of fused multiply-adds over d in order, acc = fma(x[k], w[k], acc) from acc = 0, never
//     split (the exact GEMM below; K blocks continue the chain through the stored float32 accumulator), so the
//     AVX2 micro-kernel, any tile edge and the scalar code give the same bits, and target_logits() computes the
//     target's logit with the very same chain;
//   * the lists and counts are exact functions of the logits (the selection order is total: key, then index);
//   * the log-sum-exp is summed in fixed vocabulary segments (kSegmentColumns, whole blocks), each block's exp-sum
//     in 8 lanes (the scalar code emulates them with the same exp polynomial), and the segments are merged in order
//     in double precision, whatever split computed them. It depends on the block size (block_vocab), which depends
//     on d and the tuning only.
// The native 16-bit GEMM (gemm_mode 2) is oneDNN's: rows never share a reduction and d is never split, but the order
// inside a dot product is the library's; where the CPU lacks native 16-bit dot products (forced mode 2) it is
// called one row at a time, since torch's fallback GEMM gives a row different bits in different batches.
//
// Selection rule: keys are the logits (top) or their negation (bottom); a candidate beats another if its key is
// larger, or equal with a lower vocabulary index. NaN never enters a buffer (comparisons with NaN are false); it is
// flagged and the row's logsumexp becomes NaN, which the Python layer reports as an error.
//
// Low-precision inputs: the logits are always the float32 sums of the exact products of the 16-bit inputs (one
// contract for every implementation). gemm_mode=1 upcasts bf16/fp16 blocks to float32 while packing them for the
// exact GEMM; gemm_mode=2 runs torch's batch-reduce GEMM (at::native::cpublas::brgemm, 16-bit inputs, float32
// output, never rounded to 16 bits) on the weight block packed for the CPU's native 16-bit dot products (AMX /
// AVX512-BF16 through oneDNN) where torch can use them, and on torch's reference brgemm otherwise. Auto (0) picks 2
// exactly when the native path exists (cpublas::could_pack, and an even d).
//
// Build: the floating-point contraction must be off (-ffp-contract=off, blens_fast/ops/build_flags.py): a compiler
// that fuses a * b + c on its own would make the vector and the scalar paths differ.
#include "topk_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BLENS_X86 1
#endif

namespace blens_fast {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// the exact GEMM's register tile (rows x columns) and its K block
constexpr int64_t kMr = 6;
constexpr int64_t kNr = 16;
constexpr int64_t kKc = 256;
constexpr int64_t kMc = 16 * kMr;  // rows of A per L2 block
// the log-sum-exp is summed per vocabulary segment of about this many columns (whole blocks)
constexpr int64_t kSegmentColumns = 4096;
// the widest slice of B that oneDNN packs for the CPU's 16-bit dot products (see the native GEMM below)
constexpr int64_t kPackCols = 64;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// A 64-byte aligned buffer (packed panels are read a cache line per k).
template <typename T>
struct Buffer {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr;
  explicit Buffer(int64_t n = 0) {
    if (n > 0) ptr.reset(static_cast<T*>(std::aligned_alloc(64, round_up(n * sizeof(T), 64))));
  }
  T* get() const { return ptr.get(); }
};

// ---------------------------------------------------------------------------------------------------------------
// Rows in, as float32.

float to_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  }
}

// x rounded to dtype t (round to nearest even) and back
float round_to(DType t, float x) {
  switch (t) {
    case DType::kFloat32: return x;
    case DType::kBFloat16: return static_cast<float>(c10::BFloat16(x));
    default: return static_cast<float>(c10::Half(x));
  }
}

// Row i of m as float32 (exact: every input dtype fits).
void read_row(const Matrix& m, int64_t i, float* out) {
  const int64_t base = i * m.row_stride;
  if (m.dtype == DType::kFloat32 && m.col_stride == 1) {
    std::memcpy(out, static_cast<const float*>(m.data) + base, m.cols * sizeof(float));
    return;
  }
  for (int64_t j = 0; j < m.cols; ++j) out[j] = to_float(m.data, m.dtype, base + j * m.col_stride);
}

// Hidden row i as the GEMM sees it: the prologue (each operation rounded on its own, as torch computes it), then
// rounded to the weight dtype.
void prepare_row(const Matrix& hidden, int64_t i, const Prologue& p, DType weight_dtype, float* out) {
  read_row(hidden, i, out);
  const int64_t d = hidden.cols;
  if (p.a) {
    const float a = p.a[i], c = p.c ? p.c[i] : 0.f;
    for (int64_t k = 0; k < d; ++k) {
      float x = out[k] * a;
      x = x - c;
      if (p.norm_w) x = x * p.norm_w[k];
      if (p.norm_b) x = x + p.norm_b[k];
      out[k] = x;
    }
  }
  if (weight_dtype != DType::kFloat32)
    for (int64_t k = 0; k < d; ++k) out[k] = round_to(weight_dtype, out[k]);
}

// ---------------------------------------------------------------------------------------------------------------
// The exact GEMM: C[i][j] = chain over k of fma(A[i][k], B[j][k], acc). A is packed in panels of kMr rows
// ([k][kMr] floats), B in panels of kNr columns ([k][kNr] floats), both zero-padded; C has ldc >= the padded width.

float dot_chain_scalar(const float* x, const float* w, int64_t d) {
  float acc = 0.f;
  for (int64_t k = 0; k < d; ++k) acc = std::fma(x[k], w[k], acc);
  return acc;
}

template <int MR>
void micro_scalar(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, bool first) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNr; ++j) {
      float acc = first ? 0.f : c[i * ldc + j];
      for (int64_t k = 0; k < kc; ++k) acc = std::fma(a[k * kMr + i], b[k * kNr + j], acc);
      c[i * ldc + j] = acc;
    }
}

using Micro = void (*)(int64_t, const float*, const float*, float*, int64_t, bool);

#ifdef BLENS_X86
__attribute__((target("fma"))) float dot_chain_fma(const float* x, const float* w, int64_t d) {
  float acc = 0.f;
  for (int64_t k = 0; k < d; ++k) acc = std::fma(x[k], w[k], acc);
  return acc;
}

// The accumulators are named registers (an array of __m256 is kept on the stack by GCC, a store per FMA).
#define BLENS_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const float* a, const float* b, float* c,
                                                    int64_t ldc, bool first) {
  const __m256 zero = _mm256_setzero_ps();
#define BLENS_DECLARE(i)                                                        \
  __m256 lo##i = zero, hi##i = zero;                                            \
  if constexpr (MR > i) {                                                       \
    if (!first) lo##i = _mm256_loadu_ps(c + i * ldc), hi##i = _mm256_loadu_ps(c + i * ldc + 8); \
  }
  BLENS_ROWS(BLENS_DECLARE)
#undef BLENS_DECLARE
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNr), b1 = _mm256_load_ps(b + k * kNr + 8);
#define BLENS_STEP(i)                                          \
  if constexpr (MR > i) {                                      \
    const __m256 ai = _mm256_broadcast_ss(a + k * kMr + i);    \
    lo##i = _mm256_fmadd_ps(ai, b0, lo##i);                    \
    hi##i = _mm256_fmadd_ps(ai, b1, hi##i);                    \
  }
    BLENS_ROWS(BLENS_STEP)
#undef BLENS_STEP
  }
#define BLENS_STORE(i)                                                          \
  if constexpr (MR > i) {                                                       \
    _mm256_storeu_ps(c + i * ldc, lo##i);                                       \
    _mm256_storeu_ps(c + i * ldc + 8, hi##i);                                   \
  }
  BLENS_ROWS(BLENS_STORE)
#undef BLENS_STORE
}
#undef BLENS_ROWS

// 8 consecutive elements of a weight row from `p` as float32 (exact conversions).
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* p, DType t) {
  switch (t) {
    case DType::kFloat32: return _mm256_loadu_ps(static_cast<const float*>(p));
    case DType::kBFloat16: {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    default: return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  }
}

// Transposes the 8 x 8 block r[0..8) in place.
__attribute__((target("avx2,fma"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// pack_columns for weight rows with unit column stride: 16 rows x 8 columns at a time, two 8 x 8 transposes.
__attribute__((target("avx2,fma,f16c"))) void pack_columns_avx2(const Matrix& weight, int64_t v0, int64_t len,
                                                                 float* packed) {
  const int64_t d = weight.cols, elem = weight.dtype == DType::kFloat32 ? 4 : 2;
  const char* base = static_cast<const char*>(weight.data);
  const int64_t d8 = d - d % 8;
  for (int64_t panel = 0; panel * kNr < len; ++panel) {
    float* dst = packed + panel * d * kNr;
    const char* src[kNr];
    for (int64_t j = 0; j < kNr; ++j) {
      const int64_t v = panel * kNr + j;
      src[j] = v < len ? base + (v0 + v) * weight.row_stride * elem : nullptr;
    }
    for (int64_t k = 0; k < d8; k += 8) {
      for (int half = 0; half < 2; ++half) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) {
          const char* p = src[half * 8 + j];
          r[j] = p ? load8(p + k * elem, weight.dtype) : _mm256_setzero_ps();
        }
        transpose8(r);
        for (int t = 0; t < 8; ++t) _mm256_store_ps(dst + (k + t) * kNr + half * 8, r[t]);
      }
    }
    for (int64_t k = d8; k < d; ++k)
      for (int64_t j = 0; j < kNr; ++j)
        dst[k * kNr + j] = src[j] ? to_float(base, weight.dtype, (src[j] - base) / elem + k) : 0.f;
  }
}

// The exact GEMM for one panel of at most kMr rows, reading the weight rows where they are instead of packing them
// (packing would cost more than the multiply): 8 columns x 8 k at a time, transposed in registers. The same chains
// as micro_avx2, so the same bits. Columns past len repeat the last one (C's padded width takes them).
template <int MR>
__attribute__((target("avx2,fma,f16c"))) void few_rows_avx2(const float* a, const Matrix& weight, int64_t v0,
                                                             int64_t len, float* c, int64_t ldc) {
  const int64_t d = weight.cols, elem = weight.dtype == DType::kFloat32 ? 4 : 2, d8 = d - d % 8;
  const char* base = static_cast<const char*>(weight.data);
  for (int64_t j0 = 0; j0 < len; j0 += 8) {
    const char* src[8];
    for (int j = 0; j < 8; ++j) src[j] = base + (v0 + std::min<int64_t>(j0 + j, len - 1)) * weight.row_stride * elem;
    const __m256 zero = _mm256_setzero_ps();
    __m256 acc0 = zero, acc1 = zero, acc2 = zero, acc3 = zero, acc4 = zero, acc5 = zero;
#define BLENS_FMA(k, w)                                                                    \
  {                                                                                         \
    const float* ak = a + (k) * kMr;                                                        \
    acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak), w, acc0);                               \
    if constexpr (MR > 1) acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 1), w, acc1);     \
    if constexpr (MR > 2) acc2 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 2), w, acc2);     \
    if constexpr (MR > 3) acc3 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 3), w, acc3);     \
    if constexpr (MR > 4) acc4 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 4), w, acc4);     \
    if constexpr (MR > 5) acc5 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 5), w, acc5);     \
  }
    for (int64_t k = 0; k < d8; k += 8) {
      __m256 w[8];
      for (int j = 0; j < 8; ++j) w[j] = load8(src[j] + k * elem, weight.dtype);
      transpose8(w);
      for (int t = 0; t < 8; ++t) BLENS_FMA(k + t, w[t])
    }
    for (int64_t k = d8; k < d; ++k) {
      alignas(32) float column[8];
      for (int j = 0; j < 8; ++j) column[j] = to_float(base, weight.dtype, (src[j] - base) / elem + k);
      const __m256 w = _mm256_load_ps(column);
      BLENS_FMA(k, w)
    }
#undef BLENS_FMA
    float* out = c + j0;
    _mm256_storeu_ps(out, acc0);
    if constexpr (MR > 1) _mm256_storeu_ps(out + ldc, acc1);
    if constexpr (MR > 2) _mm256_storeu_ps(out + 2 * ldc, acc2);
    if constexpr (MR > 3) _mm256_storeu_ps(out + 3 * ldc, acc3);
    if constexpr (MR > 4) _mm256_storeu_ps(out + 4 * ldc, acc4);
    if constexpr (MR > 5) _mm256_storeu_ps(out + 5 * ldc, acc5);
  }
}

using FewRows = void (*)(const float*, const Matrix&, int64_t, int64_t, float*, int64_t);
const FewRows kFewRows[kMr] = {few_rows_avx2<1>, few_rows_avx2<2>, few_rows_avx2<3>,
                               few_rows_avx2<4>, few_rows_avx2<5>, few_rows_avx2<6>};

bool cpu_has_f16c() {
  static const bool ok = __builtin_cpu_supports("f16c");
  return ok;
}
bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_f16c() { return false; }
#endif

float dot_chain(const float* x, const float* w, int64_t d, bool simd) {
#ifdef BLENS_X86
  if (simd && cpu_has_avx2()) return dot_chain_fma(x, w, d);
#endif
  return dot_chain_scalar(x, w, d);
}

// micro-kernels for 1..kMr rows
const Micro* micro_kernels(bool simd) {
  static const Micro scalar[kMr] = {micro_scalar<1>, micro_scalar<2>, micro_scalar<3>,
                                    micro_scalar<4>, micro_scalar<5>, micro_scalar<6>};
#ifdef BLENS_X86
  static const Micro avx2[kMr] = {micro_avx2<1>, micro_avx2<2>, micro_avx2<3>,
                                  micro_avx2<4>, micro_avx2<5>, micro_avx2<6>};
  if (simd && cpu_has_avx2()) return avx2;
#endif
  return scalar;
}

// Rows [r0, r0 + rows) of hidden, prepared, into kMr-row panels.
void pack_rows(const Matrix& hidden, int64_t r0, int64_t rows, const Prologue& p, DType weight_dtype, float* row,
               float* packed) {
  const int64_t d = hidden.cols;
  for (int64_t panel = 0; panel * kMr < rows; ++panel) {
    float* dst = packed + panel * d * kMr;
    for (int64_t i = 0; i < kMr; ++i) {
      const int64_t r = panel * kMr + i;
      if (r < rows) prepare_row(hidden, r0 + r, p, weight_dtype, row);
      else std::fill(row, row + d, 0.f);
      for (int64_t k = 0; k < d; ++k) dst[k * kMr + i] = row[k];
    }
  }
}

// Weight rows (vocabulary columns) [v0, v0 + len), as float32, into kNr-column panels.
// `vector`: the AVX2 code may read the weight rows (see vector_weights in project()).
void pack_columns(const Matrix& weight, int64_t v0, int64_t len, float* row, float* packed, bool vector) {
#ifdef BLENS_X86
  if (vector) return pack_columns_avx2(weight, v0, len, packed);
#endif
  const int64_t d = weight.cols;
  for (int64_t panel = 0; panel * kNr < len; ++panel) {
    float* dst = packed + panel * d * kNr;
    for (int64_t j = 0; j < kNr; ++j) {
      const int64_t v = panel * kNr + j;
      if (v < len) read_row(weight, v0 + v, row);
      else std::fill(row, row + d, 0.f);
      for (int64_t k = 0; k < d; ++k) dst[k * kNr + j] = row[k];
    }
  }
}

// C (rows x len, leading dimension ldc) = packed rows times packed columns, K in blocks of kKc.
void exact_gemm(const float* a, int64_t rows, const float* b, int64_t len, int64_t d, float* c, int64_t ldc,
                const Micro* micro) {
  for (int64_t k0 = 0; k0 < d; k0 += kKc) {
    const int64_t kc = std::min(kKc, d - k0);
    for (int64_t i0 = 0; i0 < rows; i0 += kMc) {  // kMc rows x kc of A stay in L2
      const int64_t i1 = std::min(rows, i0 + kMc);
      for (int64_t q = 0; q * kNr < len; ++q) {  // kc x kNr of B stay in L1
        const float* bq = b + (q * d + k0) * kNr;
        for (int64_t p = i0 / kMr; p * kMr < i1; ++p) {
          const int64_t mr = std::min(kMr, rows - p * kMr);
          micro[mr - 1](kc, a + (p * d + k0) * kMr, bq, c + p * kMr * ldc + q * kNr, ldc, k0 == 0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Selection, counts and log-sum-exp of one block of logits.

struct Cand {
  float key;
  int32_t idx;
};

inline bool better(const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); }

// The running selection of one list (top or bottom) of one row.
struct List {
  Cand* buf;
  int64_t count;
  float thr;    // running k-th key (valid once `filled`)
  bool filled;  // compacted at least once: from then on only key > thr enters

  inline bool admits(float key) const { return filled ? key > thr : key >= thr; }
};

// Per-row running state inside one unit.
struct RowState {
  List top, bottom;
  bool nan;
  float m;  // online log-sum-exp of the current segment: max and sum of exp(x - m)
  float s;
  int64_t target;  // target column (-1: none) and its logit
  float tau;
  int64_t greater, less, equal_lower;
};

struct Selector {
  int64_t k;
  int64_t cap;

  inline void push(List& l, float key, int32_t idx) const {
    l.buf[l.count++] = Cand{key, idx};
    if (l.count == cap) compact(l);
  }
  inline void compact(List& l) const {
    std::nth_element(l.buf, l.buf + (k - 1), l.buf + l.count, better);
    l.count = k;
    // the k-th element sits at k-1; everything before it is at least as good
    l.thr = l.buf[k - 1].key;
    l.filled = true;
  }
  // Final sorted top-min(k, count) into buf[0..)
  inline int64_t finish(List& l) const {
    int64_t n = l.count;
    if (n > k) {
      std::nth_element(l.buf, l.buf + (k - 1), l.buf + n, better);
      n = k;
    }
    std::sort(l.buf, l.buf + n, better);
    return n;
  }
};

// What one pass asks for (template flags, so the inner loops carry no unused work).
template <bool TOP, bool BOTTOM, bool COUNT>
struct Want {};

// exp(x) for x <= ~88 (Cephes polynomial, ~1 ulp); inputs below -87.3 give ~1e-38 instead of 0. The scalar twin of
// exp256 below, operation for operation (so both give the same bits).
float exp_poly(float x) {
  x = std::min(std::max(x, -87.3365447505531f), 88.3762626647949f);
  float t = x * 1.44269504088896341f;
  const float fx = std::nearbyint(t);
  x = std::fma(-fx, 0.693359375f, x);
  x = std::fma(-fx, -2.12194440e-4f, x);
  float y = 1.9875691500E-4f;
  y = std::fma(y, x, 1.3981999507E-3f);
  y = std::fma(y, x, 8.3334519073E-3f);
  y = std::fma(y, x, 4.1665795894E-2f);
  y = std::fma(y, x, 1.6666665459E-1f);
  y = std::fma(y, x, 5.0000001201E-1f);
  const float xx = x * x, x1 = x + 1.f;
  y = std::fma(y, xx, x1);
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Sum of exp(x[j] (+ b[j]) - m) over a block: 8 lanes over the first len - len % 8 columns (lane j % 8), the lanes
// added in order, then the remaining columns in order -- the order of the AVX2 code.
float sum_exp_scalar(const float* x, const float* b, int64_t len, float m) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = lanes[l] + exp_poly((b ? x[j + l] + b[j + l] : x[j + l]) - m);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s = s + lanes[l];
  for (; j < len; ++j) s = s + exp_poly((b ? x[j] + b[j] : x[j]) - m);
  return s;
}

// Folds a block with maximum block_max and exp-sum sum_exp(m_new) into the row's running (m, s).
template <typename SumExp>
inline void lse_update(RowState& st, float block_max, SumExp sum_exp) {
  if (st.nan) return;
  const float m_new = std::max(st.m, block_max);
  if (m_new == kNegInf) return;  // everything -inf so far
  if (std::isinf(m_new)) {       // +inf logit: logsumexp is +inf (reported as an error upstream)
    st.m = m_new;
    st.s = 1.f;
    return;
  }
  const float s = sum_exp(m_new);
  st.s = st.s * std::exp(st.m - m_new) + s;
  st.m = m_new;
}

// Columns [from, len) one at a time; returns their maximum logit (NaNs flag the row).
template <bool TOP, bool BOTTOM, bool COUNT>
inline float scan_scalar(Want<TOP, BOTTOM, COUNT>, const Selector& sel, RowState& st, const float* x, const float* b,
                         int64_t from, int64_t len, int32_t base) {
  float bmax = kNegInf;
  for (int64_t j = from; j < len; ++j) {
    float v = b ? x[j] + b[j] : x[j];
    if (v != v) {
      st.nan = true;
      continue;
    }
    bmax = std::max(bmax, v);
    const int32_t idx = base + static_cast<int32_t>(j);
    if (TOP && st.top.admits(v)) sel.push(st.top, v, idx);
    if (BOTTOM && st.bottom.admits(-v)) sel.push(st.bottom, -v, idx);
    if (COUNT) {
      st.greater += v > st.tau;
      st.less += v < st.tau;
      st.equal_lower += (v == st.tau) & (idx < st.target);
    }
  }
  return bmax;
}

// The counts above include the target's own column when it lies in this block: take it out.
inline void uncount_target(RowState& st, const float* x, const float* b, int64_t len, int32_t base) {
  const int64_t j = st.target - base;
  if (j < 0 || j >= len) return;
  const float v = b ? x[j] + b[j] : x[j];
  st.greater -= v > st.tau;
  st.less -= v < st.tau;
}

template <bool TOP, bool BOTTOM, bool COUNT>
void scan_row_scalar(Want<TOP, BOTTOM, COUNT> want, const Selector& sel, RowState& st, const float* x,
                     const float* b, int64_t len, int32_t base) {
  const float bmax = scan_scalar(want, sel, st, x, b, 0, len, base);
  if (COUNT) uncount_target(st, x, b, len, base);
  lse_update(st, bmax, [&](float m) { return sum_exp_scalar(x, b, len, m); });
}

#ifdef BLENS_X86
// exp_poly on 8 lanes
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447505531f);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i n = _mm256_cvtps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

__attribute__((target("avx2,fma"))) float sum_exp_avx2(const float* x, const float* b, int64_t len, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
    acc = _mm256_add_ps(acc, exp256(_mm256_sub_ps(v, vm)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s = s + lanes[l];
  for (; j < len; ++j) s = s + exp_poly((b ? x[j] + b[j] : x[j]) - m);
  return s;
}

// Offer the lanes of `key` (8 consecutive columns from `col`) that pass the list's threshold.
__attribute__((target("avx2,fma"))) inline void offer8(const Selector& sel, List& l, __m256 key, __m256& vthr,
                                                       int32_t col) {
  const int mask = l.filled ? _mm256_movemask_ps(_mm256_cmp_ps(key, vthr, _CMP_GT_OQ))
                            : _mm256_movemask_ps(_mm256_cmp_ps(key, vthr, _CMP_GE_OQ));
  if (__builtin_expect(mask == 0, 1)) return;
  alignas(32) float keys[8];
  _mm256_store_ps(keys, key);
  for (int bits = mask; bits; bits &= bits - 1) {
    const int lane = __builtin_ctz(bits);
    // the threshold may have risen inside this vector (a compaction): re-check
    if (l.admits(keys[lane])) sel.push(l, keys[lane], col + lane);
  }
  vthr = _mm256_set1_ps(l.thr);
}

__attribute__((target("avx2,fma"))) inline int64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

template <bool TOP, bool BOTTOM, bool COUNT>
__attribute__((target("avx2,fma"))) void scan_row_avx2(Want<TOP, BOTTOM, COUNT> want, const Selector& sel,
                                                       RowState& st, const float* x, const float* b, int64_t len,
                                                       int32_t base) {
  const __m256 negate = _mm256_set1_ps(-0.f);
  __m256 vtop = _mm256_set1_ps(st.top.thr), vbottom = _mm256_set1_ps(st.bottom.thr);
  __m256 vmax = _mm256_set1_ps(kNegInf);
  __m256 vnan = _mm256_setzero_ps();
  // counts in int32 lanes (a cmp mask is -1 per true lane: subtracting it counts)
  const __m256 vtau = _mm256_set1_ps(st.tau);
  const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(
      std::max<int64_t>(st.target - base, 0), len)));  // local columns < below lie before the target
  __m256i lane_col = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i n_greater = _mm256_setzero_si256(), n_less = n_greater, n_equal_lower = n_greater;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(v, vmax);  // a NaN in v yields vmax (second operand): NaN never enters vmax
    const int32_t col = base + static_cast<int32_t>(j);
    if (TOP) offer8(sel, st.top, v, vtop, col);
    if (BOTTOM) offer8(sel, st.bottom, _mm256_xor_ps(v, negate), vbottom, col);
    if (COUNT) {
      n_greater = _mm256_sub_epi32(n_greater, _mm256_castps_si256(_mm256_cmp_ps(v, vtau, _CMP_GT_OQ)));
      n_less = _mm256_sub_epi32(n_less, _mm256_castps_si256(_mm256_cmp_ps(v, vtau, _CMP_LT_OQ)));
      const __m256i eq = _mm256_castps_si256(_mm256_cmp_ps(v, vtau, _CMP_EQ_OQ));
      n_equal_lower = _mm256_sub_epi32(n_equal_lower, _mm256_and_si256(eq, _mm256_cmpgt_epi32(below, lane_col)));
      lane_col = _mm256_add_epi32(lane_col, _mm256_set1_epi32(8));
    }
  }
  if (COUNT) {
    st.greater += hsum_epi32(n_greater);
    st.less += hsum_epi32(n_less);
    st.equal_lower += hsum_epi32(n_equal_lower);
  }
  if (_mm256_movemask_ps(vnan)) st.nan = true;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float bmax = kNegInf;
  for (int i = 0; i < 8; ++i) bmax = std::max(bmax, lanes[i]);
  bmax = std::max(bmax, scan_scalar(want, sel, st, x, b, j, len, base));  // tail
  if (COUNT) uncount_target(st, x, b, len, base);
  lse_update(st, bmax, [&](float m) { return sum_exp_avx2(x, b, len, m); });
}
#endif

// Runs one unit's rows over a block of logits (row r at logits + r * ldc) with the pass's flags fixed at compile
// time.
template <bool TOP, bool BOTTOM, bool COUNT, bool SIMD>
void scan_block(const Selector& sel, RowState* states, int64_t rows, const float* logits, int64_t ldc,
                const float* bias, int64_t len, int32_t v0) {
  const Want<TOP, BOTTOM, COUNT> want;
  for (int64_t r = 0; r < rows; ++r) {
#ifdef BLENS_X86
    if (SIMD) {
      scan_row_avx2(want, sel, states[r], logits + r * ldc, bias, len, v0);
      continue;
    }
#endif
    scan_row_scalar(want, sel, states[r], logits + r * ldc, bias, len, v0);
  }
}

using ScanBlock = void (*)(const Selector&, RowState*, int64_t, const float*, int64_t, const float*, int64_t,
                           int32_t);

template <bool SIMD>
ScanBlock pick_scan_for(bool top, bool bottom, bool count) {
  static const ScanBlock table[8] = {
      scan_block<false, false, false, SIMD>, scan_block<false, false, true, SIMD>,
      scan_block<false, true, false, SIMD>,  scan_block<false, true, true, SIMD>,
      scan_block<true, false, false, SIMD>,  scan_block<true, false, true, SIMD>,
      scan_block<true, true, false, SIMD>,   scan_block<true, true, true, SIMD>};
  return table[(top ? 4 : 0) + (bottom ? 2 : 0) + (count ? 1 : 0)];
}

ScanBlock pick_scan(bool top, bool bottom, bool count, bool simd) {
  return simd && cpu_has_avx2() ? pick_scan_for<true>(top, bottom, count) : pick_scan_for<false>(top, bottom, count);
}

// ---------------------------------------------------------------------------------------------------------------
// Finishing rows and merging splits.

// Where a finished list goes: the output (sorted values/indices) or a split's part buffer (keys/indices).
void write_list(const Selector& sel, List& l, float sign, int64_t k, float* values, int64_t* indices, float* part_key,
                int32_t* part_idx) {
  const int64_t got = sel.finish(l);
  for (int64_t i = 0; i < k; ++i) {
    if (values) {
      values[i] = i < got ? l.buf[i].key * sign : kNaN;
      indices[i] = i < got ? l.buf[i].idx : -1;
    } else {
      part_key[i] = i < got ? l.buf[i].key : kNegInf;
      part_idx[i] = i < got ? l.buf[i].idx : -1;
    }
  }
}

// Merges the S splits' lists of one row (part buffers [S, N, k]) into sorted output.
void merge_list(const float* pk, const int32_t* pi, int64_t S, int64_t N, int64_t k, int64_t row, float sign,
                std::vector<Cand>& all, float* values, int64_t* indices) {
  int64_t n = 0;
  for (int64_t sp = 0; sp < S; ++sp)
    for (int64_t i = 0; i < k; ++i) {
      const int32_t idx = pi[(sp * N + row) * k + i];
      if (idx >= 0) all[n++] = Cand{pk[(sp * N + row) * k + i], idx};
    }
  const int64_t got = std::min(n, k);
  std::partial_sort(all.begin(), all.begin() + got, all.begin() + n, better);
  for (int64_t i = 0; i < k; ++i) {
    values[i] = i < got ? all[i].key * sign : kNaN;
    indices[i] = i < got ? all[i].idx : -1;
  }
}

// The log-sum-exp of a row from its segments' (max, exp-sum) pairs m[i * stride], s[i * stride], in segment order
// (a NaN max marks a row with NaN logits).
float merge_segments(const float* m, const float* s, int64_t n, int64_t stride) {
  float top = kNegInf;
  for (int64_t i = 0; i < n; ++i) {
    const float mi = m[i * stride];
    if (mi != mi) return kNaN;
    top = std::max(top, mi);
  }
  if (std::isinf(top)) return top;  // all -inf, or a +inf logit
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float mi = m[i * stride];
    if (mi != kNegInf) sum += static_cast<double>(s[i * stride]) * std::exp(static_cast<double>(mi) - top);
  }
  return top + static_cast<float>(std::log(sum));
}

at::ScalarType scalar_type(DType t) {
  switch (t) {
    case DType::kFloat32: return at::kFloat;
    case DType::kBFloat16: return at::kBFloat16;
    default: return at::kHalf;
  }
}

// Whether B can be packed for the CPU's 16-bit dot products: torch says so (AMX, AVX512-BF16), and K is even
// (VNNI pairs rows of K; oneDNN's bf16 AMX kernel for an odd K executes an illegal instruction).
bool packable(DType dtype, int64_t K) {
  return dtype != DType::kFloat32 && K % 2 == 0 && at::native::cpublas::could_pack(scalar_type(dtype));
}

// The native 16-bit GEMM of one block: C (rows x len, ldc) = A16 (rows x d, 16-bit) times the weight rows
// [v0, v0 + len) transposed into b_t (d x len), packed slice by slice when vnni.
void native_gemm_block(const Matrix& weight, int64_t v0, int64_t len, const uint16_t* a16, int64_t rows, bool vnni,
                       uint16_t* b_t, uint16_t* packed, float* c, int64_t ldc) {
  const int64_t d = weight.cols;
  const DType dtype = weight.dtype;
  for (int64_t v = 0; v < len; ++v) {  // B = the block transposed, d x len, in the weight dtype
    const int64_t base = (v0 + v) * weight.row_stride;
    if (weight.col_stride == 1) {
      const uint16_t* src = static_cast<const uint16_t*>(weight.data) + base;
      for (int64_t k = 0; k < d; ++k) b_t[k * len + v] = src[k];
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(weight.data);
      for (int64_t k = 0; k < d; ++k) b_t[k * len + v] = src[base + k * weight.col_stride];
    }
  }
  // oneDNN's packed B holds at most kPackCols columns with a leading dimension of 16, 32, 48 or 64: pack and
  // multiply the block slice by slice, each into its own columns of C. Without native support, torch's fallback
  // GEMM is called one row at a time (its results for a row depend on the other rows of the call).
  const int64_t slice = vnni ? kPackCols : len;
  const int64_t row_step = vnni ? rows : 1;
  for (int64_t c0 = 0; c0 < len; c0 += slice) {
    const int64_t n = std::min(slice, len - c0);
    const uint16_t* b_ptr = b_t + c0;
    int64_t ld_b = len;
    if (vnni) {
      ld_b = round_up(n, 16);
      at::native::cpublas::pack(d, n, len, ld_b, scalar_type(dtype), scalar_type(dtype), b_ptr, packed);
      b_ptr = packed;
    }
    for (int64_t r = 0; r < rows; r += row_step) {
      const int64_t m = std::min(row_step, rows - r);
      if (dtype == DType::kBFloat16) {
        at::native::cpublas::brgemm(m, n, d, d, ld_b, ldc, false,
                                    reinterpret_cast<const at::BFloat16*>(a16 + r * d),
                                    reinterpret_cast<const at::BFloat16*>(b_ptr), c + r * ldc + c0, vnni);
      } else {
        at::native::cpublas::brgemm(m, n, d, d, ld_b, ldc, false, reinterpret_cast<const at::Half*>(a16 + r * d),
                                    reinterpret_cast<const at::Half*>(b_ptr), c + r * ldc + c0, vnni);
      }
    }
  }
}

uint16_t to_bits16(DType t, float x) {
  if (t == DType::kBFloat16) return c10::BFloat16(x).x;
  return c10::Half(x).x;
}

}  // namespace

void target_logits(const Matrix& hidden, const Matrix& weight, const float* bias, const Prologue& prologue,
                   const int64_t* target_ids, bool simd, float* out) {
  const int64_t N = hidden.rows, d = hidden.cols;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> x(d), w(d);
    for (int64_t r = begin; r < end; ++r) {
      prepare_row(hidden, r, prologue, weight.dtype, x.data());
      read_row(weight, target_ids[r], w.data());
      const float logit = dot_chain(x.data(), w.data(), d, simd);
      out[r] = bias ? logit + bias[target_ids[r]] : logit;
    }
  });
}

void project(const Matrix& hidden, const Matrix& weight, const float* bias, const Prologue& prologue,
             const int64_t* target_ids, const float* target_logits, const Plan& plan, const Outputs& out) {
  const int64_t N = hidden.rows, d = hidden.cols, V = weight.rows, k = plan.k;
  if (N == 0) return;
  const bool top = out.top_values != nullptr, bottom = out.bottom_values != nullptr;
  const bool count = out.target_counts != nullptr;
  const DType wdtype = weight.dtype;
  bool native = false;
  if (wdtype != DType::kFloat32) {
    if (plan.gemm_mode == 2) native = true;
    else if (plan.gemm_mode == 0) native = packable(wdtype, d);
  }
  const bool vnni = native && packable(wdtype, d);

  // Block sizes: BV vocabulary columns x BN rows of float32 logits per thread. The defaults keep a block (plus a
  // packed weight block) within a few MiB: the GEMM stays efficient and the selection pass reads the block from
  // L2/L3 right after it is written.
  const int64_t T = std::max<int64_t>(1, plan.threads);
  int64_t BV = plan.block_vocab > 0
                   ? plan.block_vocab
                   : std::max<int64_t>(256, std::min<int64_t>(1024, round_up((1 << 20) / std::max<int64_t>(d, 1), 64)));
  BV = std::min(BV, V);
  const int64_t BN = std::min(plan.block_rows > 0 ? plan.block_rows : 512, N);
  const int64_t ldc_max = round_up(BV, kNr);
  const int64_t n_rb = ceil_div(N, BN);
  // log-sum-exp segments: whole blocks, fixed by BV alone; splits: whole segments, as many as the threads need
  const int64_t seg_cols = std::max<int64_t>(1, kSegmentColumns / BV) * BV;
  const int64_t n_seg = ceil_div(V, seg_cols);
  int64_t S = std::min<int64_t>(n_seg, std::max<int64_t>(1, ceil_div(2 * T, n_rb)));
  const int64_t segs_per_split = ceil_div(n_seg, S);
  S = ceil_div(n_seg, segs_per_split);
  const int64_t n_units = n_rb * S;

  Selector sel;
  sel.k = k;
  sel.cap = k + std::min<int64_t>(std::max<int64_t>(k, 128), 8192);
  const ScanBlock scan = pick_scan(top, bottom, count, plan.simd);
  const Micro* micro = micro_kernels(plan.simd);
  // the AVX2 code reads weight rows of unit column stride; with it, a block of at most kMr rows multiplies the
  // weight rows where they lie
  bool vector_weights = false;
#ifdef BLENS_X86
  vector_weights = plan.simd && cpu_has_avx2() && cpu_has_f16c() && weight.col_stride == 1;
#endif
  const int64_t lists = (top ? 1 : 0) + (bottom ? 1 : 0);

  // per-split results when the vocabulary is split (merged below); otherwise the output is written directly
  std::vector<float> part_key, part_m, part_s;
  std::vector<int32_t> part_idx;
  std::vector<int64_t> part_counts;
  if (S > 1) {
    part_key.resize(2 * S * N * k);
    part_idx.resize(2 * S * N * k);
    part_m.resize(n_seg * N);
    part_s.resize(n_seg * N);
    if (count) part_counts.assign(S * N * 3, 0);
  }

  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      // thread-local buffers, sized once
      std::vector<float> row(d);
      Buffer<float> logits(BN * ldc_max);
      Buffer<float> a_packed(native ? 0 : round_up(BN, kMr) * d);
      Buffer<float> b_packed(native || (BN <= kMr && vector_weights) ? 0 : round_up(BV, kNr) * d);
      Buffer<uint16_t> a16(native ? BN * d : 0), b_t(native ? d * BV : 0), packed(vnni ? (d + 2) * kPackCols : 0);
      std::vector<Cand> cands(static_cast<size_t>(BN * sel.cap * std::max<int64_t>(lists, 1)));
      std::vector<RowState> states(static_cast<size_t>(BN));
      std::vector<float> seg_m(BN * segs_per_split), seg_s(BN * segs_per_split);
      for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1)) {
        const int64_t rb = u / S, sp = u % S;
        const int64_t r0 = rb * BN, rows = std::min(BN, N - r0);
        const int64_t g0 = sp * segs_per_split, g1 = std::min(n_seg, g0 + segs_per_split);

        if (native) {
          for (int64_t r = 0; r < rows; ++r) {
            prepare_row(hidden, r0 + r, prologue, wdtype, row.data());
            for (int64_t c = 0; c < d; ++c) a16.get()[r * d + c] = to_bits16(wdtype, row[c]);
          }
        } else {
          pack_rows(hidden, r0, rows, prologue, wdtype, row.data(), a_packed.get());
        }
        const bool few_rows = !native && rows <= kMr && vector_weights;
        for (int64_t r = 0; r < rows; ++r) {
          RowState& st = states[r];
          Cand* own = cands.data() + r * sel.cap * std::max<int64_t>(lists, 1);
          st.top = List{own, 0, kNegInf, false};
          st.bottom = List{own + (top ? sel.cap : 0), 0, kNegInf, false};
          st.nan = false;
          st.target = count ? target_ids[r0 + r] : -1;
          st.tau = count ? target_logits[r0 + r] : 0.f;
          st.greater = st.less = st.equal_lower = 0;
        }
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t r = 0; r < rows; ++r) states[r].m = kNegInf, states[r].s = 0.f;
          const int64_t seg_end = std::min(V, (g + 1) * seg_cols);
          for (int64_t v0 = g * seg_cols; v0 < seg_end; v0 += BV) {
            const int64_t len = std::min(BV, seg_end - v0), ldc = round_up(len, kNr);
            if (native) {
              native_gemm_block(weight, v0, len, a16.get(), rows, vnni, b_t.get(), packed.get(), logits.get(), ldc);
#ifdef BLENS_X86
            } else if (few_rows) {
              kFewRows[rows - 1](a_packed.get(), weight, v0, len, logits.get(), ldc);
#endif
            } else {
              pack_columns(weight, v0, len, row.data(), b_packed.get(), vector_weights);
              exact_gemm(a_packed.get(), rows, b_packed.get(), len, d, logits.get(), ldc, micro);
            }
            scan(sel, states.data(), rows, logits.get(), ldc, bias ? bias + v0 : nullptr, len,
                 static_cast<int32_t>(v0));
          }
          for (int64_t r = 0; r < rows; ++r) {
            seg_m[r * segs_per_split + g - g0] = states[r].nan ? kNaN : states[r].m;
            seg_s[r * segs_per_split + g - g0] = states[r].s;
          }
        }
        const bool whole = S == 1;
        for (int64_t r = 0; r < rows; ++r) {
          RowState& st = states[r];
          const int64_t row_id = r0 + r;
          for (int which = 0; which < 2; ++which) {
            if (!(which == 0 ? top : bottom)) continue;
            float* values = which == 0 ? out.top_values : out.bottom_values;
            int64_t* indices = which == 0 ? out.top_indices : out.bottom_indices;
            const int64_t part = ((which * S + sp) * N + row_id) * k;
            write_list(sel, which == 0 ? st.top : st.bottom, which == 0 ? 1.f : -1.f, k,
                       whole ? values + row_id * k : nullptr, whole ? indices + row_id * k : nullptr,
                       whole ? nullptr : part_key.data() + part, whole ? nullptr : part_idx.data() + part);
          }
          if (count) {
            int64_t* c = whole ? out.target_counts + row_id * 3 : part_counts.data() + (sp * N + row_id) * 3;
            c[0] = st.greater, c[1] = st.less, c[2] = st.equal_lower;
          }
          const float* m = seg_m.data() + r * segs_per_split;
          const float* s = seg_s.data() + r * segs_per_split;
          if (whole) {
            out.logsumexp[row_id] = merge_segments(m, s, g1 - g0, 1);
          } else {
            for (int64_t g = g0; g < g1; ++g) {
              part_m[g * N + row_id] = m[g - g0];
              part_s[g * N + row_id] = s[g - g0];
            }
          }
        }
      }
      if (vnni) at::native::cpublas::brgemm_release(vnni);
    }
  });

  if (S > 1) {  // merge the vocabulary splits of each row
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      std::vector<Cand> all(static_cast<size_t>(S * k));
      for (int64_t row_id = b; row_id < e; ++row_id) {
        if (top)
          merge_list(part_key.data(), part_idx.data(), S, N, k, row_id, 1.f, all, out.top_values + row_id * k,
                     out.top_indices + row_id * k);
        if (bottom)
          merge_list(part_key.data() + S * N * k, part_idx.data() + S * N * k, S, N, k, row_id, -1.f, all,
                     out.bottom_values + row_id * k, out.bottom_indices + row_id * k);
        out.logsumexp[row_id] = merge_segments(part_m.data() + row_id, part_s.data() + row_id, n_seg, N);
        if (count) {
          int64_t* c = out.target_counts + row_id * 3;
          c[0] = c[1] = c[2] = 0;
          for (int64_t sp = 0; sp < S; ++sp)
            for (int i = 0; i < 3; ++i) c[i] += part_counts[(sp * N + row_id) * 3 + i];
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace blens_fast
