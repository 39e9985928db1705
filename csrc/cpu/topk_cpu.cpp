// Fused top-k vocabulary projection on the CPU: topk(norm(h) @ W^T + b) without the N x V logits.
//
// Work is cut into units of (row block, vocabulary split). A thread takes a unit, and for each
// vocabulary block of it runs one GEMM through torch's BLAS (at::mm_out into a BN x BV float32
// buffer, cache-sized), then -- while that block is still in cache -- one pass per row that
//   * keeps a candidate buffer per row: an element enters only if it beats the row's running k-th
//     key (one vector compare per 8 logits; almost everything is rejected after the first block),
//     and the buffer is compacted with nth_element when it fills, which raises the threshold;
//   * tracks NaN, the block max, and the online log-sum-exp (vectorised exp).
// Memory is bounded by the per-thread blocks (never N x V). Units are handed out dynamically
// (an atomic counter) so a thread slowed by other work on the machine does not hold up the rest.
// When there are fewer row blocks than 2 x threads, the vocabulary is split too and the splits'
// top-k lists and (max, sum-exp) pairs are merged at the end.
//
// Selection rule: keys are the logits (largest) or their negation (smallest); a candidate beats
// another if its key is larger, or equal with a lower vocabulary index. NaN never enters a buffer
// (comparisons with NaN are false); it is flagged and the row's logsumexp becomes NaN, which the
// Python layer reports as an error.
//
// Low-precision inputs: by default bf16/fp16 blocks are upcast to float32 and multiplied with the
// float32 GEMM (exact float32 logits of the low-precision inputs). gemm_mode=2 uses the input
// dtype's own GEMM instead (its output is rounded to that dtype); auto picks it for bf16 only when
// the CPU has native bf16 dot products (AVX512-BF16 / AMX), where that GEMM is the faster one.
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

// Per-row running state inside one unit.
struct RowState {
  Cand* buf;
  int64_t count;
  float thr;     // running k-th key (valid once `filled`)
  bool filled;   // compacted at least once: from then on only key > thr enters
  bool nan;
  float m;       // online log-sum-exp: max and sum of exp(x - m)
  float s;
};

struct Selector {
  int64_t k;
  int64_t cap;

  inline void push(RowState& st, float key, int32_t idx) const {
    st.buf[st.count++] = Cand{key, idx};
    if (st.count == cap) compact(st);
  }
  inline void compact(RowState& st) const {
    std::nth_element(st.buf, st.buf + (k - 1), st.buf + st.count, better);
    st.count = k;
    // the k-th element sits at k-1; everything before it is at least as good
    st.thr = st.buf[k - 1].key;
    st.filled = true;
  }
  // Final sorted top-min(k, count) into buf[0..)
  inline int64_t finish(RowState& st) const {
    int64_t n = st.count;
    if (n > k) {
      std::nth_element(st.buf, st.buf + (k - 1), st.buf + n, better);
      n = k;
    }
    std::sort(st.buf, st.buf + n, better);
    return n;
  }
};

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

// Selection over columns [from, len) one at a time; returns their maximum logit (NaNs flag the row).
inline float select_scalar(const Selector& sel, RowState& st, const float* x, const float* b, int64_t from,
                           int64_t len, int32_t base, float sign) {
  float bmax = kNegInf;
  for (int64_t j = from; j < len; ++j) {
    float v = b ? x[j] + b[j] : x[j];
    if (v != v) {
      st.nan = true;
      continue;
    }
    bmax = std::max(bmax, v);
    float key = v * sign;
    if (st.filled ? key > st.thr : key >= st.thr) sel.push(st, key, base + static_cast<int32_t>(j));
  }
  return bmax;
}

void scan_row_scalar(const Selector& sel, RowState& st, const float* x, const float* b, int64_t len,
                     int32_t base, float sign) {
  lse_update_scalar(st, select_scalar(sel, st, x, b, 0, len, base, sign), x, b, len);
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

__attribute__((target("avx2,fma"))) void scan_row_avx2(const Selector& sel, RowState& st, const float* x,
                                                       const float* b, int64_t len, int32_t base, float sign) {
  const __m256 vsign = _mm256_set1_ps(sign);
  __m256 vthr = _mm256_set1_ps(st.thr);
  __m256 vmax = _mm256_set1_ps(kNegInf);
  __m256 vnan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(v, vmax);  // a NaN in v yields vmax (second operand): NaN never enters vmax
    __m256 key = _mm256_mul_ps(v, vsign);
    int mask = st.filled ? _mm256_movemask_ps(_mm256_cmp_ps(key, vthr, _CMP_GT_OQ))
                         : _mm256_movemask_ps(_mm256_cmp_ps(key, vthr, _CMP_GE_OQ));
    if (__builtin_expect(mask != 0, 0)) {
      alignas(32) float keys[8];
      _mm256_store_ps(keys, key);
      while (mask) {
        int lane = __builtin_ctz(mask);
        mask &= mask - 1;
        // the threshold may have risen inside this vector (a compaction): re-check
        if (st.filled ? keys[lane] > st.thr : keys[lane] >= st.thr)
          sel.push(st, keys[lane], base + static_cast<int32_t>(j + lane));
      }
      vthr = _mm256_set1_ps(st.thr);
    }
  }
  if (_mm256_movemask_ps(vnan)) st.nan = true;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float bmax = kNegInf;
  for (int i = 0; i < 8; ++i) bmax = std::max(bmax, lanes[i]);
  bmax = std::max(bmax, select_scalar(sel, st, x, b, j, len, base, sign));  // tail
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

inline void scan_row(const Selector& sel, RowState& st, const float* x, const float* b, int64_t len, int32_t base,
                     float sign) {
#ifdef BLENS_X86
  if (cpu_has_avx2()) return scan_row_avx2(sel, st, x, b, len, base, sign);
#endif
  scan_row_scalar(sel, st, x, b, len, base, sign);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

// hidden: N x d (any float dtype, any strides); weight: V x d (float32/bf16/fp16, any strides);
// bias: V or undefined; row_a/row_c (N, float32) + norm_w/norm_b (d) = the optional norm prologue
// x = (h * a - c) * norm_w + norm_b, rounded to weight's dtype. Returns values [N,k] float32,
// indices [N,k] int64, logsumexp [N] float32.
std::vector<at::Tensor> topk_logits_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias_opt,
                                        const c10::optional<at::Tensor>& row_a_opt,
                                        const c10::optional<at::Tensor>& row_c_opt,
                                        const c10::optional<at::Tensor>& norm_w_opt,
                                        const c10::optional<at::Tensor>& norm_b_opt, int64_t k, bool largest,
                                        int64_t block_rows, int64_t block_vocab, int64_t gemm_mode) {
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

  at::NoGradGuard no_grad;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor values = at::empty({N, k}, f32);
  at::Tensor indices = at::empty({N, k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor lse = at::empty({N}, f32);
  if (N == 0) return {values, indices, lse};

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

  // GEMM precision: 1 = float32 GEMM (upcast low-precision blocks), 2 = the weight dtype's own GEMM.
  bool native = false;
  if (wdtype != at::kFloat) {
    if (gemm_mode == 2) native = true;
    else if (gemm_mode == 0) native = (wdtype == at::kBFloat16 && cpu_has_native_bf16());
  }

  // Block sizes: BV vocabulary columns x BN rows of float32 logits per thread. The defaults keep a
  // block (plus an upcast weight block) within a few MiB: the GEMM stays efficient (M, N >= 256)
  // and the selection pass reads the block from L2/L3 right after it is written.
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  int64_t BV = block_vocab > 0 ? block_vocab : std::max<int64_t>(256, std::min<int64_t>(1024, round_up((1 << 20) / std::max<int64_t>(d, 1), 64)));
  int64_t BN = block_rows > 0 ? block_rows : 256;
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
  const float sign = largest ? 1.f : -1.f;

  // per-split results when the vocabulary is split (merged below); otherwise write the output
  at::Tensor part_key, part_idx, part_m, part_s;
  if (S > 1) {
    part_key = at::empty({S, N, k}, f32);
    part_idx = at::empty({S, N, k}, at::TensorOptions().dtype(at::kInt));
    part_m = at::empty({S, N}, f32);
    part_s = at::empty({S, N}, f32);
  }
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  float* out_l = lse.data_ptr<float>();
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;

  const bool h_direct = !prologue && !native && hidden.scalar_type() == at::kFloat && hidden.stride(1) == 1;
  const bool w_direct = native ? true : wdtype == at::kFloat;
  const at::ScalarType gemm_dtype = native ? wdtype : at::kFloat;

  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    at::NoGradGuard no_grad_worker;  // grad mode is thread-local
    for (int64_t t = tb; t < te; ++t) {
      // thread-local buffers, sized once
      at::Tensor lbuf = at::empty({BN * BV}, f32);
      at::Tensor lbuf_native = native ? at::empty({BN * BV}, at::TensorOptions().dtype(wdtype)) : at::Tensor();
      at::Tensor wbuf = w_direct ? at::Tensor() : at::empty({BV * d}, f32);
      std::vector<Cand> cands(static_cast<size_t>(BN * sel.cap));
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
        for (int64_t r = 0; r < rows; ++r) {
          RowState& st = states[r];
          st.buf = cands.data() + r * sel.cap;
          st.count = 0;
          st.thr = kNegInf;
          st.filled = false;
          st.nan = false;
          st.m = kNegInf;
          st.s = 0.f;
        }
        for (int64_t v0 = sv0; v0 < sv1; v0 += BV) {
          const int64_t L = std::min(BV, sv1 - v0);
          at::Tensor wb = weight.narrow(0, v0, L);
          if (!w_direct) wb = wbuf.narrow(0, 0, L * d).view({L, d}).copy_(wb);
          at::Tensor lb = lbuf.narrow(0, 0, rows * L).view({rows, L});
          if (native) {
            at::Tensor lbn = lbuf_native.narrow(0, 0, rows * L).view({rows, L});
            at::mm_out(lbn, hb, wb.t());
            lb.copy_(lbn);
          } else {
            at::mm_out(lb, hb, wb.t());
          }
          const float* lp = lb.data_ptr<float>();
          const float* bp = bias_p ? bias_p + v0 : nullptr;
          for (int64_t r = 0; r < rows; ++r)
            scan_row(sel, states[r], lp + r * L, bp, L, static_cast<int32_t>(v0), sign);
        }
        for (int64_t r = 0; r < rows; ++r) {
          RowState& st = states[r];
          const int64_t got = sel.finish(st);
          const int64_t row = r0 + r;
          const float l = st.nan ? std::numeric_limits<float>::quiet_NaN()
                          : (st.m == kNegInf || std::isinf(st.m)) ? st.m
                                                                  : st.m + std::log(st.s);
          if (S == 1) {
            float* ov = out_v + row * k;
            int64_t* oi = out_i + row * k;
            for (int64_t i = 0; i < k; ++i) {
              ov[i] = i < got ? st.buf[i].key * sign : std::numeric_limits<float>::quiet_NaN();
              oi[i] = i < got ? st.buf[i].idx : -1;
            }
            out_l[row] = l;
          } else {
            float* pk = part_key.data_ptr<float>() + (sp * N + row) * k;
            int32_t* pi = part_idx.data_ptr<int32_t>() + (sp * N + row) * k;
            for (int64_t i = 0; i < k; ++i) {
              pk[i] = i < got ? st.buf[i].key : kNegInf;
              pi[i] = i < got ? st.buf[i].idx : -1;
            }
            part_m.data_ptr<float>()[sp * N + row] = st.nan ? std::numeric_limits<float>::quiet_NaN() : st.m;
            part_s.data_ptr<float>()[sp * N + row] = st.s;
          }
        }
      }
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
        int64_t n = 0;
        bool nan = false;
        float M = kNegInf;
        for (int64_t sp = 0; sp < S; ++sp) {
          for (int64_t i = 0; i < k; ++i) {
            int32_t idx = pi[(sp * N + row) * k + i];
            if (idx >= 0) all[n++] = Cand{pk[(sp * N + row) * k + i], idx};
          }
          float m = pm[sp * N + row];
          if (m != m) nan = true;
          else M = std::max(M, m);
        }
        const int64_t got = std::min(n, k);
        std::partial_sort(all.begin(), all.begin() + got, all.begin() + n, better);
        for (int64_t i = 0; i < k; ++i) {
          out_v[row * k + i] = i < got ? all[i].key * sign : std::numeric_limits<float>::quiet_NaN();
          out_i[row * k + i] = i < got ? all[i].idx : -1;
        }
        float l;
        if (nan) l = std::numeric_limits<float>::quiet_NaN();
        else if (M == kNegInf || std::isinf(M)) l = M;
        else {
          double s = 0.0;
          for (int64_t sp = 0; sp < S; ++sp) {
            float m = pm[sp * N + row];
            if (m != kNegInf) s += static_cast<double>(ps[sp * N + row]) * std::exp(static_cast<double>(m - M));
          }
          l = M + static_cast<float>(std::log(s));
        }
        out_l[row] = l;
      }
    });
  }
  return {values, indices, lse};
}

std::string cpu_features() {
  std::string out;
  out += cpu_has_avx2() ? "avx2+fma" : "scalar";
  out += cpu_has_native_bf16() ? ",native-bf16" : "";
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blens_fast CPU kernels: fused top-k vocabulary projection";
  m.def("topk_logits", &topk_logits_cpu, "fused top-k of hidden @ weight.T (+ bias) with online logsumexp",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("row_a"), py::arg("row_c"),
        py::arg("norm_w"), py::arg("norm_b"), py::arg("k"), py::arg("largest"), py::arg("block_rows") = 0,
        py::arg("block_vocab") = 0, py::arg("gemm_mode") = 0);
  m.def("cpu_features", &cpu_features, "SIMD paths this build uses on this CPU");
}
