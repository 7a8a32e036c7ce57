// Decode kernels for CPUs: matrix-vector products that read weights at memory speed.
//
// At decode time a step multiplies a few token vectors by every weight matrix once: the work is
// reading the weights, and PyTorch's CPU GEMM (MKL) runs such skinny products well below the
// memory's speed. These kernels read each weight row once, front to back, row after row, for all
// the tokens at once, split over threads by rows with at::parallel_for (torch's own OpenMP pool):
// each thread's share is one sequential stream, which the hardware prefetchers follow without
// help, so there are no software prefetches. Rows go four at a time, each still read whole before
// the next, so that their four sums are reduced together: short rows otherwise spend much of their
// time in the horizontal reductions.
//
//   gasungbi::linear(x [M, K] f32, w [N, K] f32|i8, scale [N] f32?) -> [M, N] f32
//       y = x w^T (times scale[n] per row for int8 weights: w ~ q * s). On CPUs with AVX512-VNNI,
//       int8 products of a width that is a multiple of 64 quantize the tokens per block of 32 to
//       int8 (scale amax/127), as llama.cpp's Q8_0 path does, and multiply in integers: the
//       deviation from fp32 activations is that quantization (q8_activations() says whether).
//   gasungbi::experts(x [M, d] f32, routed [gate [E, I, d], up [E, I, d], down [E, d, I] (f32|i8,
//       rows contiguous, any expert stride), + gate_s [E, I], up_s [E, I], down_s [E, d] for int8],
//       shared [] or [gate [Is, d], up, down (, scales)], idx [M, K] i64, weights [M, K] f32) -> [M, d]
//       y_m = sum_k weights[m, k] * down_e (silu(gate_e x_m) * up_e x_m), e = idx[m, k]
//             (+ the shared expert's SwiGLU of x_m):
//       DeepSeekMoE's FFN (V3 eq. 12) with each chosen expert's weights read once for all the
//       tokens that chose it, all experts' rows in one parallel pass per projection.
//   gasungbi::mla_attend(q_nope [B, T, H, dn], q_pe [B, T, H, dr], kv [B, S, r], k_pe [B, S, dr],
//       w_uk [H, dn, r], w_uv [H, dv, r], mask [B, 1, T, S] bool, scale) -> [B, T, H, dv] f32
//       MLA's absorbed attention (V2 Sec. 2.1.2) against the latent cache, one (token, head) per
//       task: q_lat = q^C W^UK, p = softmax(scale (q_lat c^KV_s + q^R k^R_s)) over the slots the
//       mask shows, out = W^UV (sum_s p_s c^KV_s). One call where PyTorch runs four batched matmuls,
//       a mask and a softmax; masked slots are skipped, not computed and zeroed.
//
// Plain C++ with `omp simd` loops: the compiler vectorizes for the machine it builds on
// (-march=native; AVX2, AVX-512 or NEON), with AVX-512 and VNNI loops where the CPU has them, so a
// build runs only on CPUs with the same instruction-set flags (native.py keys its name by them).
// The pure-PyTorch modules are the reference in tests.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
#include <immintrin.h>
// One fp32 row against one token (K % 16 == 0), read front to back: the lanes' partial sums.
inline __m512 acc_avx512(const float* xt, const float* w, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xt + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xt + k + 16), _mm512_loadu_ps(w + k + 16), a1);
  }
  if (k < K) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xt + k), _mm512_loadu_ps(w + k), a0);
  return _mm512_add_ps(a0, a1);
}

inline float row_avx512(const float* xt, const float* w, int64_t K) {
  return _mm512_reduce_add_ps(acc_avx512(xt, w, K));
}

// [sum of a0's lanes, a1's, a2's, a3's]: four rows' sums in 8 shuffles and adds where four
// separate reductions take about 36 (short rows spend much of their time there otherwise).
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x01, x23, 0x44), _mm512_shuffle_ps(x01, x23, 0xEE));
  const __m256 z = _mm256_add_ps(_mm512_castps512_ps256(y),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
}
#endif

// Tokens quantized to Q8 for the VNNI kernel (see quantize_tokens).
struct QTokens {
  int64_t T, K, chunks;
  std::vector<uint8_t> mag;
  std::vector<uint64_t> neg;
  std::vector<float> scale;  // 16 per chunk: 8 x scale of block 2c, 8 x scale of block 2c+1
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GASUNGBI_VNNI 1
// int8 weights against int8 activations (VNNI), as llama.cpp's Q8_0 path does: each token is
// quantized per block of 32 (scale amax/127, round to nearest even), kept as |q| (u8), the sign of
// each q as a mask and the scales broadcast per 64-byte chunk (two blocks).

QTokens quantize_tokens(const float* x, int64_t T, int64_t ldx, int64_t K) {
  QTokens q{T, K, K / 64, std::vector<uint8_t>(T * K), std::vector<uint64_t>(T * (K / 64)),
            std::vector<float>(T * (K / 64) * 16)};
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    for (int64_t b = 0; b < K / 32; ++b) {  // one block of 32: two vectors
      const __m512 v0 = _mm512_loadu_ps(xt + b * 32), v1 = _mm512_loadu_ps(xt + b * 32 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      const __m512 inv = _mm512_set1_ps(id), zero = _mm512_setzero_ps();
      constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // half to even
      const __m512 r0 = _mm512_roundscale_ps(_mm512_mul_ps(v0, inv), nearest);
      const __m512 r1 = _mm512_roundscale_ps(_mm512_mul_ps(v1, inv), nearest);
      uint8_t* mag = q.mag.data() + t * K + b * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(mag), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_abs_ps(r0))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(mag + 16),
                       _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_abs_ps(r1))));
      const uint64_t neg = uint64_t{_mm512_cmp_ps_mask(r0, zero, _CMP_LT_OQ)} |
                           uint64_t{_mm512_cmp_ps_mask(r1, zero, _CMP_LT_OQ)} << 16;
      q.neg[t * q.chunks + b / 2] |= neg << ((b % 2) * 32);
      for (int64_t j = 0; j < 8; ++j) q.scale[(t * q.chunks + b / 2) * 16 + (b % 2) * 8 + j] = d;
    }
  }
  return q;
}

inline __m512 acc_vnni(const QTokens& q, int64_t t, int64_t chunks, const int8_t* w) {
  const __m512i zero = _mm512_setzero_si512();
  const uint8_t* mag = q.mag.data() + t * q.K;
  const uint64_t* negs = q.neg.data() + t * q.chunks;
  const float* scales = q.scale.data() + t * q.chunks * 16;
  // chunk c: 64 weights against 64 tokens' |q| with their signs moved onto w; dpbusd sums groups of
  // four, so lanes 0-7 hold block 2c and lanes 8-15 block 2c+1, each times its block's scale
  const auto chunk = [&](int64_t c, __m512 acc) {
    const __m512i wv = _mm512_mask_sub_epi8(_mm512_loadu_si512(w + c * 64), static_cast<__mmask64>(negs[c]), zero,
                                            _mm512_loadu_si512(w + c * 64));
    const __m512i p = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(mag + c * 64), wv);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(scales + c * 16), acc);
  };
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    a0 = chunk(c, a0);
    a1 = chunk(c + 1, a1);
  }
  if (c < chunks) a0 = chunk(c, a0);
  return _mm512_add_ps(a0, a1);
}

inline float row_vnni(const QTokens& q, int64_t t, int64_t chunks, const int8_t* w) {
  return _mm512_reduce_add_ps(acc_vnni(q, t, chunks, w));
}
#endif

// One row against one token: dot(xt, w). The portable loop keeps 16 partial sums, which the compiler
// vectorizes for the machine; fp32 rows take the AVX-512 loop where there is one.
template <typename W>
inline float row_dot(const float* xt, const W* w, int64_t K) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<W, float>) {
    if (K % 16 == 0) return row_avx512(xt, w, K);
  }
#endif
  float acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
#pragma omp simd
    for (int j = 0; j < 16; ++j) acc[j] += xt[k + j] * static_cast<float>(w[k + j]);
  float a = 0.f;
  for (; k < K; ++k) a += xt[k] * static_cast<float>(w[k]);
  for (int j = 0; j < 16; ++j) a += acc[j];
  return a;
}

// y[t * ldy + r] = scale[r] * dot(x[t * ldx ..], w[r * ldw ..]) for rows r0..r1, tokens 0..T-1.
// Row by row, each read front to back for all the tokens (it stays in L1 after the first): a
// thread's share of the weights is one sequential stream, which the hardware prefetchers follow.
// int8 rows of a width that is a multiple of 64 go through VNNI with the tokens quantized to Q8
// (``q``, prepared once per call); everything else is exact fp32 arithmetic.
template <typename W>
void rows_dot(const float* x, int64_t T, int64_t ldx, const W* w, int64_t ldw, int64_t K, const float* scale,
              int64_t r0, int64_t r1, float* y, int64_t ldy, const QTokens* q = nullptr, int64_t qt0 = 0) {
  int64_t r = r0;
#if defined(__AVX512F__)
  // four rows at a time, still each read whole before the next, their sums reduced together
  constexpr bool fp32 = std::is_same_v<W, float>;
  bool four = fp32 && K % 16 == 0;
#ifdef GASUNGBI_VNNI
  four = four || (!fp32 && q != nullptr);
#endif
  for (; four && r + 4 <= r1; r += 4) {
    const W* wr = w + r * ldw;
    for (int64_t t = 0; t < T; ++t) {
      __m512 a[4];
      for (int i = 0; i < 4; ++i) {
        if constexpr (fp32) {
          a[i] = acc_avx512(x + t * ldx, wr + i * ldw, K);
        } else {
#ifdef GASUNGBI_VNNI
          a[i] = acc_vnni(*q, qt0 + t, K / 64, reinterpret_cast<const int8_t*>(wr + i * ldw));
#endif
        }
      }
      __m128 s4 = reduce4(a[0], a[1], a[2], a[3]);
      if (scale) s4 = _mm_mul_ps(s4, _mm_loadu_ps(scale + r));
      _mm_storeu_ps(y + t * ldy + r, s4);  // rows r..r+3 of token t are adjacent in y
    }
  }
#endif
  for (; r < r1; ++r) {
    const W* wr = w + r * ldw;
    for (int64_t t = 0; t < T; ++t) {
      float a;
#ifdef GASUNGBI_VNNI
      if constexpr (std::is_same_v<W, int8_t>) {
        a = q ? row_vnni(*q, qt0 + t, K / 64, wr) : row_dot(x + t * ldx, wr, K);
      } else
#endif
      a = row_dot(x + t * ldx, wr, K);
      y[t * ldy + r] = scale ? a * scale[r] : a;
    }
  }
}

// The tokens quantized for VNNI when the weights are int8 rows of a width that is a multiple of 64.
std::unique_ptr<QTokens> maybe_quantize(bool int8, const float* x, int64_t T, int64_t ldx, int64_t K) {
#ifdef GASUNGBI_VNNI
  if (int8 && K % 64 == 0) return std::make_unique<QTokens>(quantize_tokens(x, T, ldx, K));
#endif
  return nullptr;
}

// Rows per parallel chunk: enough bytes that a thread's share outweighs waking it.
int64_t grain(int64_t row_bytes) { return std::max<int64_t>(4, (64 * 1024) / std::max<int64_t>(row_bytes, 1)); }

void check_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kChar,
              name, " must be float32 or int8, got ", w.scalar_type());
  TORCH_CHECK(w.stride(-1) == 1 && w.stride(-2) == w.size(-1), name, " rows must be contiguous");
}

const float* scale_ptr(const c10::optional<at::Tensor>& s, const at::Tensor& w, const char* name) {
  if (w.scalar_type() == at::kFloat) return nullptr;
  TORCH_CHECK(s.has_value() && s->scalar_type() == at::kFloat && s->stride(-1) == 1,
              name, ": int8 weights need float32 scales with contiguous rows");
  return s->data_ptr<float>();
}

at::Tensor linear(const at::Tensor& x_, const at::Tensor& w, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x_.dim() == 2 && w.dim() == 2 && x_.size(1) == w.size(1),
              "linear: x [M, K] and w [N, K] expected, got ", x_.sizes(), " and ", w.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat, "linear: x must be float32");
  check_weight(w, "linear: w");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* s = scale_ptr(scale, w, "linear");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  AT_DISPATCH_SWITCH(w.scalar_type(), "linear",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        const float* wp = w.data_ptr<float>();
        at::parallel_for(0, N, grain(K * 4), [&](int64_t r0, int64_t r1) {
          rows_dot(xp, M, K, wp, K, K, s, r0, r1, yp, N);
        });
      })
      AT_DISPATCH_CASE(at::kChar, [&] {
        const int8_t* wp = w.data_ptr<int8_t>();
        const auto q = maybe_quantize(true, xp, M, K, K);
        at::parallel_for(0, N, grain(K), [&](int64_t r0, int64_t r1) {
          rows_dot(xp, M, K, wp, K, K, s, r0, r1, yp, N, q.get());
        });
      }));
  return y;
}

// One expert's work: its matrices (rows contiguous; routed experts point into the stacked tensors),
// int8 scales or null, its width I and the pair slots [t0, t1) of the tokens it runs on.
struct Job {
  const void *gate, *up, *down;
  const float *gs, *us, *ds;
  int64_t I, t0, t1;
};

// Calls f(job, r0, r1) for the row ranges of a parallel chunk [b, e) over all jobs' rows laid end to
// end (rows(job) of them each), so that every thread streams a contiguous share of the weights.
template <typename Rows, typename F>
void over_job_rows(const std::vector<Job>& jobs, const std::vector<int64_t>& first_row, Rows rows, int64_t b,
                   int64_t e, F f) {
  size_t j = std::upper_bound(first_row.begin(), first_row.end(), b) - first_row.begin() - 1;
  while (b < e) {
    const int64_t r0 = b - first_row[j], r1 = std::min(rows(jobs[j]), r0 + (e - b));
    f(jobs[j], r0, r1);
    b += r1 - r0;
    ++j;
  }
}

template <typename W>
void run_jobs(const std::vector<Job>& jobs, const float* xs, int64_t d, int64_t ldh, float* g, float* u, float* o) {
  std::vector<int64_t> first_row{0}, first_out{0};
  for (const Job& jb : jobs) {
    first_row.push_back(first_row.back() + jb.I);
    first_out.push_back(first_out.back() + d);
  }
  const bool int8 = std::is_same_v<W, int8_t>;
  bool whole_chunks = ldh % 64 == 0;
  for (const Job& jb : jobs) whole_chunks = whole_chunks && jb.I % 64 == 0;
  const int64_t slots = jobs.empty() ? 0 : jobs.back().t1;
  const auto qx = maybe_quantize(int8, xs, slots, d, d);
  // gate and up rows, then silu(gate) * up for those rows, in one pass over the rows
  at::parallel_for(0, first_row.back(), grain(2 * d * static_cast<int64_t>(sizeof(W))), [&](int64_t b, int64_t e) {
    over_job_rows(jobs, first_row, [](const Job& jb) { return jb.I; }, b, e, [&](const Job& jb, int64_t r0, int64_t r1) {
      const int64_t T = jb.t1 - jb.t0;
      rows_dot(xs + jb.t0 * d, T, d, static_cast<const W*>(jb.gate), d, d, jb.gs, r0, r1, g + jb.t0 * ldh, ldh,
               qx.get(), jb.t0);
      rows_dot(xs + jb.t0 * d, T, d, static_cast<const W*>(jb.up), d, d, jb.us, r0, r1, u + jb.t0 * ldh, ldh,
               qx.get(), jb.t0);
      for (int64_t t = jb.t0; t < jb.t1; ++t)
        for (int64_t r = r0; r < r1; ++r) {
          const float a = g[t * ldh + r];
          g[t * ldh + r] = a / (1.f + std::exp(-a)) * u[t * ldh + r];
        }
    });
  });
  // down rows: out[slot] = down h[slot]
  const auto qh = maybe_quantize(int8 && whole_chunks, g, slots, ldh, ldh);
  at::parallel_for(0, first_out.back(), grain(ldh * static_cast<int64_t>(sizeof(W))), [&](int64_t b, int64_t e) {
    over_job_rows(jobs, first_out, [d](const Job&) { return d; }, b, e, [&](const Job& jb, int64_t r0, int64_t r1) {
      rows_dot(g + jb.t0 * ldh, jb.t1 - jb.t0, ldh, static_cast<const W*>(jb.down), jb.I, jb.I, jb.ds, r0, r1,
               o + jb.t0 * d, d, qh.get(), jb.t0);
    });
  });
}

const float* opt_scale(const std::vector<at::Tensor>& t, size_t i) {
  return t.size() == 6 ? t[i + 3].data_ptr<float>() : nullptr;
}

void check_mlp(const std::vector<at::Tensor>& t, int64_t d, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.size() == 3 || t.size() == 6, name, ": [gate, up, down] or [gate, up, down, gate_s, up_s, down_s]");
  const int64_t I = t[0].size(-2);
  TORCH_CHECK(t[0].size(-1) == d && t[1].sizes() == t[0].sizes() && t[2].size(-2) == d && t[2].size(-1) == I,
              name, ": gate/up [.., I, d] and down [.., d, I] expected for d = ", d, ", got ", t[0].sizes(), ", ",
              t[1].sizes(), ", ", t[2].sizes());
  for (int i = 0; i < 3; ++i) {
    check_weight(t[i], name);
    TORCH_CHECK(t[i].scalar_type() == dtype, name, ": all weights must share one dtype");
  }
  TORCH_CHECK((dtype == at::kChar) == (t.size() == 6), name, ": int8 weights need scales, float32 ones none");
  for (size_t i = 3; i < t.size(); ++i)
    TORCH_CHECK(t[i].scalar_type() == at::kFloat && t[i].stride(-1) == 1, name, ": scales must be float32 rows");
}

at::Tensor experts(const at::Tensor& x_, const std::vector<at::Tensor>& routed, const std::vector<at::Tensor>& shared,
                   const at::Tensor& idx_, const at::Tensor& weights_) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "experts: x must be float32 [M, d]");
  const int64_t d = x_.size(1);
  check_mlp(routed, d, routed.at(0).scalar_type(), "experts: routed");
  TORCH_CHECK(routed[0].dim() == 3 && routed[2].dim() == 3, "experts: routed weights are stacked [E, .., ..]");
  if (!shared.empty()) check_mlp(shared, d, routed[0].scalar_type(), "experts: shared");
  TORCH_CHECK(idx_.dim() == 2 && idx_.size(0) == x_.size(0) && weights_.sizes() == idx_.sizes(),
              "experts: idx and weights [M, K] expected");
  const at::Tensor x = x_.contiguous();
  const at::Tensor idx = idx_.to(at::kLong).contiguous();
  const at::Tensor weights = weights_.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = idx.size(1), E = routed[0].size(0), I = routed[0].size(1);
  const int64_t P = M * K, S = shared.empty() ? 0 : M, Is = shared.empty() ? 0 : shared[0].size(0);
  const size_t w = routed[0].element_size();
  // pair slots grouped by expert, then the shared expert's M slots
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> count(E, 0), first(E, 0), slot_token(P + S), slot_weight(P + S);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "experts: expert id ", ip[p], " out of range [0, ", E, ")");
    ++count[ip[p]];
  }
  std::vector<Job> jobs;
  int64_t next = 0;
  const char* base[3] = {static_cast<const char*>(routed[0].data_ptr()), static_cast<const char*>(routed[1].data_ptr()),
                         static_cast<const char*>(routed[2].data_ptr())};
  for (int64_t e = 0; e < E; ++e) {
    if (!count[e]) continue;
    first[e] = next;
    const float* gs = opt_scale(routed, 0);
    const float* us = opt_scale(routed, 1);
    const float* ds = opt_scale(routed, 2);
    jobs.push_back({base[0] + e * routed[0].stride(0) * w, base[1] + e * routed[1].stride(0) * w,
                    base[2] + e * routed[2].stride(0) * w, gs ? gs + e * routed[3].stride(0) : nullptr,
                    us ? us + e * routed[4].stride(0) : nullptr, ds ? ds + e * routed[5].stride(0) : nullptr,
                    I, next, next + count[e]});
    next += count[e];
  }
  at::Tensor xs = at::empty({P + S, d}, x.options());
  float* xsp = xs.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  std::vector<int64_t> fill(E, 0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = ip[p], slot = first[e] + fill[e]++;
    slot_token[slot] = p / K;
    slot_weight[slot] = p;
    std::copy(xp + (p / K) * d, xp + (p / K + 1) * d, xsp + slot * d);
  }
  if (S) {
    jobs.push_back({shared[0].data_ptr(), shared[1].data_ptr(), shared[2].data_ptr(), opt_scale(shared, 0),
                    opt_scale(shared, 1), opt_scale(shared, 2), Is, P, P + S});
    for (int64_t m = 0; m < M; ++m) {
      slot_token[P + m] = m;
      slot_weight[P + m] = -1;
      std::copy(xp + m * d, xp + (m + 1) * d, xsp + (P + m) * d);
    }
  }
  const int64_t ldh = std::max(I, Is);
  at::Tensor g = at::zeros({P + S, ldh}, x.options()), u = at::empty({P + S, ldh}, x.options());
  at::Tensor o = at::empty({P + S, d}, x.options());
  if (routed[0].scalar_type() == at::kFloat)
    run_jobs<float>(jobs, xsp, d, ldh, g.data_ptr<float>(), u.data_ptr<float>(), o.data_ptr<float>());
  else
    run_jobs<int8_t>(jobs, xsp, d, ldh, g.data_ptr<float>(), u.data_ptr<float>(), o.data_ptr<float>());
  // combine: routed experts in expert order per token (as the PyTorch reference), then the shared one
  at::Tensor y = at::zeros({M, d}, x.options());
  float* yp = y.data_ptr<float>();
  const float* op = o.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  for (int64_t slot = 0; slot < P + S; ++slot) {
    float* yt = yp + slot_token[slot] * d;
    const float* os = op + slot * d;
    if (slot_weight[slot] < 0) {
      for (int64_t j = 0; j < d; ++j) yt[j] += os[j];
    } else {
      const float wt = wp[slot_weight[slot]];
      for (int64_t j = 0; j < d; ++j) yt[j] += wt * os[j];
    }
  }
  return y;
}

// y[0..n) = sum_i a[i] * row(i)[0..n), rows with a[i] == 0 skipped: in column blocks of 64, so that
// the partial sums stay in registers while the rows stream past.
template <typename Row>
inline void weighted_rows(int64_t count, const float* a, Row row, int64_t n, float* y) {
  for (int64_t c0 = 0; c0 < n; c0 += 64) {
    const int64_t w = std::min<int64_t>(64, n - c0);
#if defined(__AVX512F__)
    if (w == 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t i = 0; i < count; ++i) {
        if (a[i] == 0.f) continue;
        const __m512 ai = _mm512_set1_ps(a[i]);
        const float* ri = row(i) + c0;
        a0 = _mm512_fmadd_ps(ai, _mm512_loadu_ps(ri), a0);
        a1 = _mm512_fmadd_ps(ai, _mm512_loadu_ps(ri + 16), a1);
        a2 = _mm512_fmadd_ps(ai, _mm512_loadu_ps(ri + 32), a2);
        a3 = _mm512_fmadd_ps(ai, _mm512_loadu_ps(ri + 48), a3);
      }
      _mm512_storeu_ps(y + c0, a0);
      _mm512_storeu_ps(y + c0 + 16, a1);
      _mm512_storeu_ps(y + c0 + 32, a2);
      _mm512_storeu_ps(y + c0 + 48, a3);
      continue;
    }
#endif
    float acc[64] = {};
    for (int64_t i = 0; i < count; ++i) {
      if (a[i] == 0.f) continue;
      const float ai = a[i], *ri = row(i) + c0;
      if (w == 64) {
#pragma omp simd
        for (int j = 0; j < 64; ++j) acc[j] += ai * ri[j];
      } else {
        for (int64_t j = 0; j < w; ++j) acc[j] += ai * ri[j];
      }
    }
    std::copy(acc, acc + w, y + c0);
  }
}

// Absorbed MLA attention of a few query tokens against the latent cache (see the header).
at::Tensor mla_attend(const at::Tensor& q_nope_, const at::Tensor& q_pe_, const at::Tensor& kv, const at::Tensor& k_pe,
                      const at::Tensor& w_uk, const at::Tensor& w_uv, const at::Tensor& mask, double scale) {
  for (const at::Tensor* t : {&q_nope_, &q_pe_, &kv, &k_pe, &w_uk, &w_uv})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "mla_attend: float32 tensors expected, got ", t->scalar_type());
  TORCH_CHECK(q_nope_.dim() == 4 && q_pe_.dim() == 4 && kv.dim() == 3 && k_pe.dim() == 3 && w_uk.dim() == 3 &&
              w_uv.dim() == 3 && mask.dim() == 4 && mask.scalar_type() == at::kBool,
              "mla_attend: q_nope/q_pe [B, T, H, .], kv/k_pe [B, S, .], w_uk/w_uv [H, ., r], mask [B, 1, T, S] bool");
  // q_nope and q_pe are usually views of one [B, T, H, dn + dr] tensor: any strides, rows contiguous
  const at::Tensor qn = q_nope_.stride(3) == 1 ? q_nope_ : q_nope_.contiguous();
  const at::Tensor qp = q_pe_.stride(3) == 1 ? q_pe_ : q_pe_.contiguous();
  const int64_t B = qn.size(0), T = qn.size(1), H = qn.size(2), dn = qn.size(3), dr = qp.size(3);
  const int64_t S = kv.size(1), r = kv.size(2), dv = w_uv.size(1);
  TORCH_CHECK(qp.sizes() == at::IntArrayRef({B, T, H, dr}) && kv.size(0) == B &&
              k_pe.sizes() == at::IntArrayRef({B, S, dr}) && w_uk.sizes() == at::IntArrayRef({H, dn, r}) &&
              w_uv.size(0) == H && w_uv.size(2) == r && mask.sizes() == at::IntArrayRef({B, 1, T, S}),
              "mla_attend: mismatched shapes ", qn.sizes(), " ", qp.sizes(), " ", kv.sizes(), " ", k_pe.sizes(), " ",
              w_uk.sizes(), " ", w_uv.sizes(), " ", mask.sizes());
  TORCH_CHECK(kv.stride(2) == 1 && k_pe.stride(2) == 1 && w_uk.stride(2) == 1 && w_uv.stride(2) == 1,
              "mla_attend: the last dimension of kv, k_pe, w_uk and w_uv must be contiguous");
  at::Tensor out = at::empty({B, T, H, dv}, qn.options());
  const float *qnp = qn.data_ptr<float>(), *qpp = qp.data_ptr<float>(), *kvp = kv.data_ptr<float>();
  const float *kpp = k_pe.data_ptr<float>(), *ukp = w_uk.data_ptr<float>(), *uvp = w_uv.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t kv0 = kv.stride(0), kv1 = kv.stride(1), kp0 = k_pe.stride(0), kp1 = k_pe.stride(1);
  const int64_t uk0 = w_uk.stride(0), uk1 = w_uk.stride(1), uv0 = w_uv.stride(0), uv1 = w_uv.stride(1);
  const int64_t m0 = mask.stride(0), m2 = mask.stride(2), m3 = mask.stride(3);
  const int64_t qn0 = qn.stride(0), qn1 = qn.stride(1), qn2 = qn.stride(2);
  const int64_t qp0 = qp.stride(0), qp1 = qp.stride(1), qp2 = qp.stride(2);
  at::parallel_for(0, B * T * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q_lat(r), o_lat(r), p(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * H), t = (i / H) % T, h = i % H;
      const float *q = qnp + b * qn0 + t * qn1 + h * qn2, *qr = qpp + b * qp0 + t * qp1 + h * qp2;
      const float *kvb = kvp + b * kv0, *kpb = kpp + b * kp0;
      const float *uk = ukp + h * uk0, *uv = uvp + h * uv0;
      const bool* m = mp + b * m0 + t * m2;
      // q^C W^UK: the query in the latent space
      weighted_rows(dn, q, [&](int64_t j) { return uk + j * uk1; }, r, q_lat.data());
      float top = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (!m[s * m3]) continue;
        p[s] = sc * (row_dot(q_lat.data(), kvb + s * kv1, r) + row_dot(qr, kpb + s * kp1, dr));
        top = std::max(top, p[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {  // softmax; hidden slots weigh 0
        p[s] = m[s * m3] ? std::exp(p[s] - top) : 0.f;
        total += p[s];
      }
      for (int64_t s = 0; s < S; ++s) p[s] /= total;
      weighted_rows(S, p.data(), [&](int64_t s) { return kvb + s * kv1; }, r, o_lat.data());  // P c^KV
      float* o = op + i * dv;
      for (int64_t j = 0; j < dv; ++j) o[j] = row_dot(o_lat.data(), uv + j * uv1, r);  // W^UV
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(gasungbi, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? scale) -> Tensor");
  m.def("experts(Tensor x, Tensor[] routed, Tensor[] shared, Tensor idx, Tensor weights) -> Tensor");
  m.def("mla_attend(Tensor q_nope, Tensor q_pe, Tensor kv, Tensor k_pe, Tensor w_uk, Tensor w_uv, Tensor mask, "
        "float scale) -> Tensor");
  m.def("q8_activations() -> bool");
}

TORCH_LIBRARY_IMPL(gasungbi, CPU, m) {
  m.impl("linear", &linear);
  m.impl("experts", &experts);
  m.impl("mla_attend", &mla_attend);
}

// Whether int8 products quantize their tokens to Q8 (the VNNI path) on this build.
TORCH_LIBRARY_IMPL(gasungbi, CompositeExplicitAutograd, m) {
  m.impl("q8_activations", []() -> bool {
#ifdef GASUNGBI_VNNI
    return true;
#else
    return false;
#endif
  });
}
