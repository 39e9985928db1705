// Fused vocabulary projection on the CPU, one pass: for norm(h) @ W^T + b, per row, any of the top-k list,
// the bottom-k list, the log-sum-exp and a target token's counts (for its rank), without the N x V logits.
//
// Work is cut into units of (row block, vocabulary split). A thread takes a unit, and for each
// vocabulary block of it runs one GEMM through torch's BLAS (at::mm_out into a BN x BV float32
// buffer, cache-sized), then -- while that block is still in cache -- one pass per row that
//   * keeps a candidate buffer per row and list: an element enters only if it beats the list's running
//     k-th key (one vector compare per 8 logits and list; almost everything is rejected after the first
//     block), and the buffer is compacted with nth_element when it fills, which raises the threshold;
//   * counts the logits above, below and equal to (with a lower index) the row's target logit, in vector
//     lanes (the target's own column is taken out afterwards);
//   * tracks NaN, the block max, and the online log-sum-exp (vectorised exp).
// Memory is bounded by the per-thread blocks (never N x V). Units are handed out dynamically
// (an atomic counter) so a thread slowed by other work on the machine does not hold up the rest.
// When there are fewer row blocks than 2 x threads, the vocabulary is split too and the splits'
// lists, (max, sum-exp) pairs and counts are merged at the end.
//
// Selection rule: keys are the logits (top) or their negation (bottom); a candidate beats another if its
// key is larger, or equal with a lower vocabulary index. NaN never enters a buffer (comparisons with NaN
// are false); it is flagged and the row's logsumexp becomes NaN, which the Python layer reports as an error.
//
// Low-precision inputs: the logits are always the float32 sums of the exact products of the 16-bit inputs
// (one contract for every implementation). gemm_mode=1 upcasts bf16/fp16 blocks to float32 and uses the
// float32 GEMM; gemm_mode=2 runs torch's batch-reduce GEMM (at::native::cpublas::brgemm, 16-bit inputs,
// float32 output, never rounded to 16 bits) on the weight block packed for the CPU's native 16-bit dot
// products (AMX / AVX512-BF16 through oneDNN) where torch can use them, and on torch's reference brgemm
// otherwise. Auto (0) picks 2 exactly when the native path exists (cpublas::could_pack, and an even d).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BLENS_X86 1
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Cand {
  float key;
  int32_t idx;
};

inline bool better(const Cand& a, const Cand& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

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
  float m;  // online log-sum-exp: max and sum of exp(x - m)
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

inline void lse_update_scalar(RowState& st, float block_max, const float* x, const float* b, int64_t len) {
  if (st.nan) return;
  float m_new = std::max(st.m, block_max);
  if (m_new == kNegInf) return;  // everything -inf so far
  if (std::isinf(m_new)) {       // +inf logit: logsumexp is +inf (reported as an error upstream)
    st.m = m_new;
    st.s = 1.f;
    return;
  }
  float s = st.s * std::exp(st.m - m_new);
  for (int64_t j = 0; j < len; ++j) s += std::exp((b ? x[j] + b[j] : x[j]) - m_new);
  st.s = s;
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
  lse_update_scalar(st, scan_scalar(want, sel, st, x, b, 0, len, base), x, b, len);
  if (COUNT) uncount_target(st, x, b, len, base);
}

#ifdef BLENS_X86
// exp for x <= ~88 (Cephes polynomial, ~1 ulp); inputs below -87.3 give ~1e-38 instead of 0.
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
  // online log-sum-exp over the block
  if (st.nan) return;
  float m_new = std::max(st.m, bmax);
  if (m_new == kNegInf) return;
  if (std::isinf(m_new)) {
    st.m = m_new;
    st.s = 1.f;
    return;
  }
  const __m256 vm = _mm256_set1_ps(m_new);
  __m256 acc = _mm256_setzero_ps();
  j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
    acc = _mm256_add_ps(acc, exp256(_mm256_sub_ps(v, vm)));
  }
  _mm256_store_ps(lanes, acc);
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  for (; j < len; ++j) s += std::exp((b ? x[j] + b[j] : x[j]) - m_new);
  st.s = st.s * std::exp(st.m - m_new) + s;
  st.m = m_new;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
bool cpu_has_native_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_native_bf16() { return false; }
#endif

template <bool TOP, bool BOTTOM, bool COUNT>
void scan_row(Want<TOP, BOTTOM, COUNT> want, const Selector& sel, RowState& st, const float* x, const float* b,
              int64_t len, int32_t base) {
#ifdef BLENS_X86
  if (cpu_has_avx2()) return scan_row_avx2(want, sel, st, x, b, len, base);
#endif
  scan_row_scalar(want, sel, st, x, b, len, base);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// the widest slice of B that oneDNN packs for the CPU's 16-bit dot products (see the native GEMM below)
constexpr int64_t kPackCols = 64;

// Whether B can be packed for the CPU's 16-bit dot products: torch says so (AMX, AVX512-BF16), and K is even
// (VNNI pairs rows of K; oneDNN's bf16 AMX kernel for an odd K executes an illegal instruction).
bool packable(at::ScalarType dtype, int64_t K) {
  return K % 2 == 0 && at::native::cpublas::could_pack(dtype);
}

}  // namespace

namespace {

// Runs one unit's rows over its vocabulary range with the pass's flags fixed at compile time.
template <bool TOP, bool BOTTOM, bool COUNT>
void scan_block(Want<TOP, BOTTOM, COUNT> want, const Selector& sel, RowState* states, int64_t rows, const float* lp,
                const float* bp, int64_t L, int32_t v0) {
  for (int64_t r = 0; r < rows; ++r) scan_row(want, sel, states[r], lp + r * L, bp, L, v0);
}

using ScanBlock = void (*)(const Selector&, RowState*, int64_t, const float*, const float*, int64_t, int32_t);

template <bool TOP, bool BOTTOM, bool COUNT>
void scan_block_fn(const Selector& sel, RowState* states, int64_t rows, const float* lp, const float* bp, int64_t L,
                   int32_t v0) {
  scan_block(Want<TOP, BOTTOM, COUNT>{}, sel, states, rows, lp, bp, L, v0);
}

ScanBlock pick_scan(bool top, bool bottom, bool count) {
  static const ScanBlock table[8] = {
      scan_block_fn<false, false, false>, scan_block_fn<false, false, true>, scan_block_fn<false, true, false>,
      scan_block_fn<false, true, true>,   scan_block_fn<true, false, false>, scan_block_fn<true, false, true>,
      scan_block_fn<true, true, false>,   scan_block_fn<true, true, true>};
  return table[(top ? 4 : 0) + (bottom ? 2 : 0) + (count ? 1 : 0)];
}

// Where a finished list goes: the output (sorted values/indices) or a split's part buffer (keys/indices).
void write_list(const Selector& sel, List& l, float sign, int64_t k, float* values, int64_t* indices, float* part_key,
                int32_t* part_idx) {
  const int64_t got = sel.finish(l);
  for (int64_t i = 0; i < k; ++i) {
    if (values) {
      values[i] = i < got ? l.buf[i].key * sign : std::numeric_limits<float>::quiet_NaN();
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
    values[i] = i < got ? all[i].key * sign : std::numeric_limits<float>::quiet_NaN();
    indices[i] = i < got ? all[i].idx : -1;
  }
}

float finish_lse(bool nan, float m, float s) {
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (m == kNegInf || std::isinf(m)) return m;
  return m + std::log(s);
}

}  // namespace

// hidden: N x d (any float dtype, any strides); weight: V x d (float32/bf16/fp16, any strides);
// bias: V or undefined; row_a/row_c (N, float32) + norm_w/norm_b (d) = the optional norm prologue
// x = (h * a - c) * norm_w + norm_b, rounded to weight's dtype; target_ids (N, int64) + target_logits (N,
// float32) or undefined. Returns [top values [N,k] float32, top indices [N,k] int64, the same two for the
// bottom list, logsumexp [N] float32, target counts [N,3] int64 (greater, less, equal with a lower index)];
// lists not asked for and the counts without targets are undefined tensors (None in Python).
std::vector<at::Tensor> topk_logits_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias_opt,
                                        const c10::optional<at::Tensor>& row_a_opt,
                                        const c10::optional<at::Tensor>& row_c_opt,
                                        const c10::optional<at::Tensor>& norm_w_opt,
                                        const c10::optional<at::Tensor>& norm_b_opt, int64_t k, bool top, bool bottom,
                                        const c10::optional<at::Tensor>& target_ids_opt,
                                        const c10::optional<at::Tensor>& target_logits_opt, int64_t block_rows,
                                        int64_t block_vocab, int64_t gemm_mode) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "topk_logits_cpu: tensors must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "topk_logits_cpu: hidden must be N x d and weight V x d, got ",
              hidden.sizes(), " and ", weight.sizes());
  const int64_t N = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, "topk_logits_cpu: hidden has ", d, " features but weight has ", weight.size(1),
              " columns");
  TORCH_CHECK(k >= 1 && k <= V, "topk_logits_cpu: k=", k, " must be between 1 and V=", V);
  TORCH_CHECK(V < (int64_t(1) << 31), "topk_logits_cpu: V=", V, " must be below 2^31");
  const auto wdtype = weight.scalar_type();
  TORCH_CHECK(wdtype == at::kFloat || wdtype == at::kBFloat16 || wdtype == at::kHalf,
              "topk_logits_cpu: weight must be float32, bfloat16 or float16, got ", wdtype);
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "topk_logits_cpu: hidden must be floating point");
  const bool count = target_ids_opt.has_value() && target_ids_opt->defined();

  at::NoGradGuard no_grad;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor top_v, top_i, bottom_v, bottom_i, counts;
  if (top) top_v = at::empty({N, k}, f32), top_i = at::empty({N, k}, i64);
  if (bottom) bottom_v = at::empty({N, k}, f32), bottom_i = at::empty({N, k}, i64);
  at::Tensor lse = at::empty({N}, f32);
  at::Tensor target_ids, target_logits;
  if (count) {
    TORCH_CHECK(target_logits_opt.has_value() && target_logits_opt->defined(),
                "topk_logits_cpu: target_ids needs target_logits");
    target_ids = target_ids_opt->to(at::kLong).contiguous();
    target_logits = target_logits_opt->to(at::kFloat).contiguous();
    TORCH_CHECK(target_ids.numel() == N && target_logits.numel() == N,
                "topk_logits_cpu: target_ids and target_logits must have N elements");
    counts = at::zeros({N, 3}, i64);
  }
  if (N == 0) return {top_v, top_i, bottom_v, bottom_i, lse, counts};

  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    TORCH_CHECK(bias_opt->numel() == V, "topk_logits_cpu: bias has ", bias_opt->numel(), " elements but weight has ",
                V, " rows");
    bias = bias_opt->to(at::kFloat).contiguous();
  }
  const bool prologue = row_a_opt.has_value() && row_a_opt->defined();
  at::Tensor row_a, row_c, norm_w, norm_b;
  if (prologue) {
    row_a = row_a_opt->to(at::kFloat).contiguous();
    row_c = row_c_opt.has_value() && row_c_opt->defined() ? row_c_opt->to(at::kFloat).contiguous()
                                                          : at::zeros({N}, f32);
    TORCH_CHECK(row_a.numel() == N && row_c.numel() == N, "topk_logits_cpu: row coefficients must have N elements");
    if (norm_w_opt.has_value() && norm_w_opt->defined()) norm_w = norm_w_opt->to(at::kFloat).contiguous();
    if (norm_b_opt.has_value() && norm_b_opt->defined()) norm_b = norm_b_opt->to(at::kFloat).contiguous();
  }

  // GEMM: 1 = float32 GEMM on upcast blocks, 2 = 16-bit brgemm with float32 output (see the top of the file).
  TORCH_CHECK(gemm_mode >= 0 && gemm_mode <= 2, "topk_logits_cpu: gemm_mode must be 0, 1 or 2, got ", gemm_mode);
  bool native = false;
  if (wdtype != at::kFloat) {
    if (gemm_mode == 2) native = true;
    else if (gemm_mode == 0) native = packable(wdtype, d);
  }
  const bool vnni = native && packable(wdtype, d);

  // Block sizes: BV vocabulary columns x BN rows of float32 logits per thread. The defaults keep a
  // block (plus an upcast weight block) within a few MiB: the GEMM stays efficient (M, N >= 256)
  // and the selection pass reads the block from L2/L3 right after it is written.
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  int64_t BV = block_vocab > 0 ? block_vocab : std::max<int64_t>(256, std::min<int64_t>(1024, round_up((1 << 20) / std::max<int64_t>(d, 1), 64)));
  int64_t BN = block_rows > 0 ? block_rows : 512;
  BV = std::min(BV, V);
  BN = std::min(BN, N);
  const int64_t n_rb = (N + BN - 1) / BN;
  const int64_t n_vb = (V + BV - 1) / BV;
  int64_t S = std::min<int64_t>(n_vb, std::max<int64_t>(1, (2 * T + n_rb - 1) / n_rb));
  const int64_t vb_per_split = (n_vb + S - 1) / S;
  S = (n_vb + vb_per_split - 1) / vb_per_split;
  const int64_t n_units = n_rb * S;

  Selector sel;
  sel.k = k;
  sel.cap = k + std::min<int64_t>(std::max<int64_t>(k, 128), 8192);
  const ScanBlock scan = pick_scan(top, bottom, count);
  const int64_t lists = (top ? 1 : 0) + (bottom ? 1 : 0);

  // per-split results when the vocabulary is split (merged below); otherwise write the output
  at::Tensor part_key, part_idx, part_m, part_s, part_counts;
  if (S > 1) {
    part_key = at::empty({2, S, N, k}, f32);
    part_idx = at::empty({2, S, N, k}, at::TensorOptions().dtype(at::kInt));
    part_m = at::empty({S, N}, f32);
    part_s = at::empty({S, N}, f32);
    if (count) part_counts = at::zeros({S, N, 3}, i64);
  }
  float* out_l = lse.data_ptr<float>();
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t* target_p = count ? target_ids.data_ptr<int64_t>() : nullptr;
  const float* tau_p = count ? target_logits.data_ptr<float>() : nullptr;

  const bool h_direct = !prologue && !native && hidden.scalar_type() == at::kFloat && hidden.stride(1) == 1;
  const bool w_direct = native ? true : wdtype == at::kFloat;
  const at::ScalarType gemm_dtype = native ? wdtype : at::kFloat;

  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    at::NoGradGuard no_grad_worker;  // grad mode is thread-local
    for (int64_t t = tb; t < te; ++t) {
      // thread-local buffers, sized once
      at::Tensor lbuf = at::empty({BN * BV}, f32);
      // native: the weight block transposed to d x L (and packed for the CPU's dot products when vnni)
      at::Tensor wt = native ? at::empty({d * BV}, at::TensorOptions().dtype(wdtype)) : at::Tensor();
      at::Tensor wpacked = vnni ? at::empty({(d + 2) * kPackCols}, at::TensorOptions().dtype(wdtype)) : at::Tensor();
      at::Tensor wbuf = w_direct ? at::Tensor() : at::empty({BV * d}, f32);
      std::vector<Cand> cands(static_cast<size_t>(BN * sel.cap * std::max<int64_t>(lists, 1)));
      std::vector<RowState> states(static_cast<size_t>(BN));
      for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1)) {
        const int64_t rb = u / S, sp = u % S;
        const int64_t r0 = rb * BN, rows = std::min(BN, N - r0);
        const int64_t sv0 = sp * vb_per_split * BV, sv1 = std::min(V, (sp + 1) * vb_per_split * BV);

        // hidden block: as is, or normalised (prologue) and rounded to the weight dtype
        at::Tensor hb = hidden.narrow(0, r0, rows);
        if (!h_direct) {
          at::Tensor hf = hb.to(at::kFloat);
          if (prologue) {
            hf = hf * row_a.narrow(0, r0, rows).unsqueeze(1) - row_c.narrow(0, r0, rows).unsqueeze(1);
            if (norm_w.defined()) hf.mul_(norm_w);
            if (norm_b.defined()) hf.add_(norm_b);
            if (wdtype != at::kFloat && !native) hf = hf.to(wdtype).to(at::kFloat);
          }
          hb = hf.to(gemm_dtype);
        }
        if (native) hb = hb.contiguous();
        for (int64_t r = 0; r < rows; ++r) {
          RowState& st = states[r];
          Cand* own = cands.data() + r * sel.cap * std::max<int64_t>(lists, 1);
          st.top = List{own, 0, kNegInf, false};
          st.bottom = List{own + (top ? sel.cap : 0), 0, kNegInf, false};
          st.nan = false;
          st.m = kNegInf;
          st.s = 0.f;
          st.target = count ? target_p[r0 + r] : -1;
          st.tau = count ? tau_p[r0 + r] : 0.f;
          st.greater = st.less = st.equal_lower = 0;
        }
        for (int64_t v0 = sv0; v0 < sv1; v0 += BV) {
          const int64_t L = std::min(BV, sv1 - v0);
          at::Tensor wb = weight.narrow(0, v0, L);
          if (!w_direct) wb = wbuf.narrow(0, 0, L * d).view({L, d}).copy_(wb);
          at::Tensor lb = lbuf.narrow(0, 0, rows * L).view({rows, L});
          if (native) {
            at::Tensor b_t = wt.narrow(0, 0, d * L).view({d, L}).copy_(wb.t());
            const int64_t elem = b_t.element_size();
            const char* b_all = static_cast<const char*>(b_t.data_ptr());
            // oneDNN's packed B holds at most kPackCols columns with a leading dimension of 16, 32, 48 or 64:
            // pack and multiply the block slice by slice, each into its own columns of the logits (ld_c = L).
            const int64_t slice = vnni ? kPackCols : L;
            for (int64_t c0 = 0; c0 < L; c0 += slice) {
              const int64_t n = std::min(slice, L - c0);
              const void* b_ptr = b_all + c0 * elem;
              int64_t ld_b = L;
              if (vnni) {
                ld_b = round_up(n, 16);
                at::native::cpublas::pack(d, n, L, ld_b, wdtype, wdtype, b_ptr, wpacked.data_ptr());
                b_ptr = wpacked.data_ptr();
              }
              if (wdtype == at::kBFloat16) {
                at::native::cpublas::brgemm(rows, n, d, d, ld_b, L, false, hb.data_ptr<at::BFloat16>(),
                                            static_cast<const at::BFloat16*>(b_ptr), lb.data_ptr<float>() + c0,
                                            vnni);
              } else {
                at::native::cpublas::brgemm(rows, n, d, d, ld_b, L, false, hb.data_ptr<at::Half>(),
                                            static_cast<const at::Half*>(b_ptr), lb.data_ptr<float>() + c0, vnni);
              }
            }
          } else {
            at::mm_out(lb, hb, wb.t());
          }
          scan(sel, states.data(), rows, lb.data_ptr<float>(), bias_p ? bias_p + v0 : nullptr, L,
               static_cast<int32_t>(v0));
        }
        for (int64_t r = 0; r < rows; ++r) {
          RowState& st = states[r];
          const int64_t row = r0 + r;
          const bool whole = S == 1;
          for (int which = 0; which < 2; ++which) {
            if (!(which == 0 ? top : bottom)) continue;
            at::Tensor& ov = which == 0 ? top_v : bottom_v;
            at::Tensor& oi = which == 0 ? top_i : bottom_i;
            const int64_t part = ((which * S + sp) * N + row) * k;
            write_list(sel, which == 0 ? st.top : st.bottom, which == 0 ? 1.f : -1.f, k,
                       whole ? ov.data_ptr<float>() + row * k : nullptr,
                       whole ? oi.data_ptr<int64_t>() + row * k : nullptr,
                       whole ? nullptr : part_key.data_ptr<float>() + part,
                       whole ? nullptr : part_idx.data_ptr<int32_t>() + part);
          }
          int64_t* c = count ? (whole ? counts.data_ptr<int64_t>() + row * 3
                                      : part_counts.data_ptr<int64_t>() + (sp * N + row) * 3)
                             : nullptr;
          if (c) c[0] = st.greater, c[1] = st.less, c[2] = st.equal_lower;
          if (whole) {
            out_l[row] = finish_lse(st.nan, st.m, st.s);
          } else {
            part_m.data_ptr<float>()[sp * N + row] = st.nan ? std::numeric_limits<float>::quiet_NaN() : st.m;
            part_s.data_ptr<float>()[sp * N + row] = st.s;
          }
        }
      }
      if (vnni) at::native::cpublas::brgemm_release(vnni);
    }
  });

  if (S > 1) {  // merge the vocabulary splits of each row
    const float* pk = part_key.data_ptr<float>();
    const int32_t* pi = part_idx.data_ptr<int32_t>();
    const float* pm = part_m.data_ptr<float>();
    const float* ps = part_s.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
      std::vector<Cand> all(static_cast<size_t>(S * k));
      for (int64_t row = b; row < e; ++row) {
        if (top) merge_list(pk, pi, S, N, k, row, 1.f, all, top_v.data_ptr<float>() + row * k,
                            top_i.data_ptr<int64_t>() + row * k);
        if (bottom) merge_list(pk + S * N * k, pi + S * N * k, S, N, k, row, -1.f, all,
                               bottom_v.data_ptr<float>() + row * k, bottom_i.data_ptr<int64_t>() + row * k);
        bool nan = false;
        float M = kNegInf;
        for (int64_t sp = 0; sp < S; ++sp) {
          const float m = pm[sp * N + row];
          if (m != m) nan = true;
          else M = std::max(M, m);
        }
        if (nan || M == kNegInf || std::isinf(M)) {
          out_l[row] = finish_lse(nan, M, 1.f);
          continue;
        }
        double s = 0.0;
        for (int64_t sp = 0; sp < S; ++sp) {
          const float m = pm[sp * N + row];
          if (m != kNegInf) s += static_cast<double>(ps[sp * N + row]) * std::exp(static_cast<double>(m - M));
        }
        out_l[row] = M + static_cast<float>(std::log(s));
      }
    });
    if (count) counts.copy_(part_counts.sum(0));
  }
  return {top_v, top_i, bottom_v, bottom_i, lse, counts};
}

std::string cpu_features() {
  std::string out;
  out += cpu_has_avx2() ? "avx2+fma" : "scalar";
  out += cpu_has_native_bf16() ? ",native-bf16" : "";
  out += at::native::cpublas::could_pack(at::kBFloat16) ? ",brgemm-bf16-packed" : "";
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blens_fast CPU kernels: fused one-pass vocabulary projection (top-k, bottom-k, target ranks)";
  m.def("topk_logits", &topk_logits_cpu,
        "one pass over hidden @ weight.T (+ bias): top-k, bottom-k, logsumexp and target counts",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("k"), py::arg("top"), py::arg("bottom"),
        py::arg("target_ids"), py::arg("target_logits"), py::arg("block_rows") = 0, py::arg("block_vocab") = 0,
        py::arg("gemm_mode") = 0);
  m.def("cpu_features", &cpu_features, "SIMD paths this build uses on this CPU");
}
