// Decode kernels for CPUs: matrix-vector products that read weights at memory speed.
//
// At decode time a step multiplies a few token vectors by every weight matrix once: the work is
// reading the weights. PyTorch's CPU GEMM (MKL) runs such skinny products at ~11 GB/s on the 2-core
// machine this was written on, a fifth of what the memory gives. These kernels stream each weight
// row once, four rows at a time (four independent accumulators hide the FMA latency), for all the
// tokens at once, split over threads by rows with at::parallel_for (torch's own OpenMP pool).
//
//   gasungbi::linear(x [M, K] f32, w [N, K] f32|i8, scale [N] f32?) -> [M, N] f32
//       y = x w^T (times scale[n] per row for int8 weights: w ~ q * s)
//   gasungbi::experts(x [M, d] f32, gate [E, I, d], up [E, I, d], down [E, d, I] (f32|i8, rows
//       contiguous, any expert stride), gate_s [E, I]?, up_s [E, I]?, down_s [E, d]?,
//       idx [M, K] i64, weights [M, K] f32) -> [M, d] f32
//       y_m = sum_k weights[m, k] * down_e (silu(gate_e x_m) * up_e x_m), e = idx[m, k]:
//       DeepSeekMoE's routed experts (V3 eq. 12) with each chosen expert's weights read once for
//       all the tokens that chose it.
//
// Plain C++ with `omp simd` reductions: the compiler vectorizes for the machine it builds on
// (-march=native; AVX2, AVX-512 or NEON). The pure-PyTorch modules are the reference in tests.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

// y[t * ldy + r] = scale[r] * dot(x[t * ldx ..], w[r * ldw ..]) for rows r0..r1, tokens 0..T-1.
template <typename W>
void rows_dot(const float* x, int64_t T, int64_t ldx, const W* w, int64_t ldw, int64_t K,
              const float* scale, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const W* w0 = w + r * ldw;
    const W* w1 = w0 + ldw;
    const W* w2 = w1 + ldw;
    const W* w3 = w2 + ldw;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * ldx;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xt[k];
        a0 += xv * static_cast<float>(w0[k]);
        a1 += xv * static_cast<float>(w1[k]);
        a2 += xv * static_cast<float>(w2[k]);
        a3 += xv * static_cast<float>(w3[k]);
      }
      float* yt = y + t * ldy + r;
      if (scale) {
        a0 *= scale[r]; a1 *= scale[r + 1]; a2 *= scale[r + 2]; a3 *= scale[r + 3];
      }
      yt[0] = a0; yt[1] = a1; yt[2] = a2; yt[3] = a3;
    }
  }
  for (; r < r1; ++r) {
    const W* wr = w + r * ldw;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * ldx;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < K; ++k) a += xt[k] * static_cast<float>(wr[k]);
      y[t * ldy + r] = scale ? a * scale[r] : a;
    }
  }
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
        at::parallel_for(0, N, grain(K), [&](int64_t r0, int64_t r1) {
          rows_dot(xp, M, K, wp, K, K, s, r0, r1, yp, N);
        });
      }));
  return y;
}

// One matrix per expert, applied to the tokens that chose it: rows 0..R of expert u, tokens
// [start[u], start[u+1]) of xs (ld = K), outputs into out (ld = R). Parallel over all (u, row).
template <typename W>
void per_expert(const std::vector<int64_t>& experts, const std::vector<int64_t>& start, const float* xs,
                const W* w, int64_t expert_stride, const float* s, int64_t s_stride, int64_t R, int64_t K,
                float* out) {
  const int64_t U = static_cast<int64_t>(experts.size());
  at::parallel_for(0, U * R, grain(K * static_cast<int64_t>(sizeof(W))), [&](int64_t b, int64_t e) {
    while (b < e) {
      const int64_t u = b / R, r0 = b % R, r1 = std::min(R, r0 + (e - b));
      const int64_t ex = experts[u], t0 = start[u];
      rows_dot(xs + t0 * K, start[u + 1] - t0, K, w + ex * expert_stride, K, K,
               s ? s + ex * s_stride : nullptr, r0, r1, out + t0 * R, R);
      b += r1 - r0;
    }
  });
}

template <typename W>
void experts_impl(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down, const float* gs,
                  const float* us, const float* ds, int64_t gs_stride, int64_t us_stride, int64_t ds_stride,
                  const std::vector<int64_t>& experts, const std::vector<int64_t>& start, const float* xs,
                  float* g, float* u, float* o, int64_t P, int64_t I, int64_t d) {
  per_expert(experts, start, xs, gate.data_ptr<W>(), gate.stride(0), gs, gs_stride, I, d, g);
  per_expert(experts, start, xs, up.data_ptr<W>(), up.stride(0), us, us_stride, I, d, u);
  at::parallel_for(0, P * I, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  });
  per_expert(experts, start, g, down.data_ptr<W>(), down.stride(0), ds, ds_stride, d, I, o);
}

at::Tensor experts(const at::Tensor& x_, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                   const c10::optional<at::Tensor>& gate_s, const c10::optional<at::Tensor>& up_s,
                   const c10::optional<at::Tensor>& down_s, const at::Tensor& idx_, const at::Tensor& weights_) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "experts: x must be float32 [M, d]");
  TORCH_CHECK(gate.dim() == 3 && up.sizes() == gate.sizes() && down.dim() == 3 && down.size(0) == gate.size(0) &&
              down.size(1) == gate.size(2) && down.size(2) == gate.size(1) && gate.size(2) == x_.size(1),
              "experts: gate/up [E, I, d] and down [E, d, I] expected, got ", gate.sizes(), ", ", up.sizes(),
              ", ", down.sizes(), " for x ", x_.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.scalar_type() == down.scalar_type(),
              "experts: gate, up and down must share a dtype");
  check_weight(gate, "experts: gate");
  check_weight(up, "experts: up");
  check_weight(down, "experts: down");
  TORCH_CHECK(idx_.dim() == 2 && idx_.size(0) == x_.size(0) && weights_.sizes() == idx_.sizes(),
              "experts: idx and weights [M, K] expected");
  const at::Tensor x = x_.contiguous();
  const at::Tensor idx = idx_.to(at::kLong).contiguous();
  const at::Tensor weights = weights_.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = idx.size(1), E = gate.size(0), I = gate.size(1), d = gate.size(2);
  const int64_t P = M * K;
  // group the (token, choice) pairs by expert: pair slots [start[u], start[u+1]) go to experts[u]
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> count(E, 0), first(E, -1), experts_used, start{0}, pair_token(P), pair_choice(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "experts: expert id ", ip[p], " out of range [0, ", E, ")");
    ++count[ip[p]];
  }
  std::vector<int64_t> fill(E, 0);
  for (int64_t e = 0; e < E; ++e) {
    if (!count[e]) continue;
    first[e] = start.back();
    experts_used.push_back(e);
    start.push_back(start.back() + count[e]);
  }
  at::Tensor xs = at::empty({P, d}, x.options());
  float* xsp = xs.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = ip[p], slot = first[e] + fill[e]++;
    pair_token[slot] = p / K;
    pair_choice[slot] = p;
    std::copy(xp + (p / K) * d, xp + (p / K + 1) * d, xsp + slot * d);
  }
  at::Tensor g = at::empty({P, I}, x.options()), u = at::empty({P, I}, x.options()), o = at::empty({P, d}, x.options());
  const float* gs = scale_ptr(gate_s, gate, "experts: gate_s");
  const float* us = scale_ptr(up_s, up, "experts: up_s");
  const float* ds = scale_ptr(down_s, down, "experts: down_s");
  const int64_t gss = gs ? gate_s->stride(0) : 0, uss = us ? up_s->stride(0) : 0, dss = ds ? down_s->stride(0) : 0;
  if (gate.scalar_type() == at::kFloat) {
    experts_impl<float>(gate, up, down, gs, us, ds, gss, uss, dss, experts_used, start, xsp,
                        g.data_ptr<float>(), u.data_ptr<float>(), o.data_ptr<float>(), P, I, d);
  } else {
    experts_impl<int8_t>(gate, up, down, gs, us, ds, gss, uss, dss, experts_used, start, xsp,
                         g.data_ptr<float>(), u.data_ptr<float>(), o.data_ptr<float>(), P, I, d);
  }
  // combine in expert order per token (as the PyTorch reference does)
  at::Tensor y = at::zeros({M, d}, x.options());
  float* yp = y.data_ptr<float>();
  const float* op = o.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  for (int64_t slot = 0; slot < P; ++slot) {
    float* yt = yp + pair_token[slot] * d;
    const float* os = op + slot * d;
    const float wt = wp[pair_choice[slot]];
    for (int64_t j = 0; j < d; ++j) yt[j] += wt * os[j];
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(gasungbi, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? scale) -> Tensor");
  m.def("experts(Tensor x, Tensor gate, Tensor up, Tensor down, Tensor? gate_s, Tensor? up_s, Tensor? down_s, "
        "Tensor idx, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(gasungbi, CPU, m) {
  m.impl("linear", &linear);
  m.impl("experts", &experts);
}
