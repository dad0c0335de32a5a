// rnnflow's CPU training kernels, compiled on first use by rnnflow/model/fused.py: the
// recurrence of nn.RNN (tanh, relu), nn.GRU and nn.LSTM, one layer and one direction, forward
// and backward; below it, max pooling over the valid steps, dropout's mask, the n-gram bag and
// a switch that flushes denormal floats to zero on every thread.
//
// Why: torch's CPU RNN runs every step as a dozen small ops with their autograd nodes, each
// a few microseconds of dispatch, so at batch 64 and hidden 128 the step is mostly overhead.
// Here a step is one matrix product (h @ W_hh^T, ATen's) and one loop over the batch that
// does every gate's arithmetic; the backward step is one loop and one product, and the
// recurrent weights' gradient is one large product after the loop.
//
// Layout: batch first. xp [B, T, G*H] is the input projection x @ W_ih^T + b_ih of every step
// (for RNN and LSTM with b_hh added too, since both biases only add), G gates in torch's
// order (GRU r, z, n; LSTM i, f, g, o). Rows of a batch never meet in a recurrence, so the
// threads split the batch and each runs its rows through every step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

// glibc's vector versions (libmvec) of the two functions, so the gate loops vectorise
// without -ffast-math (which glibc requires to declare them itself).
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
}

namespace {

enum Kind : int64_t { RNN_TANH = 0, RNN_RELU = 1, GRU = 2, LSTM = 3 };

int64_t gates(int64_t kind) { return kind == LSTM ? 4 : kind == GRU ? 3 : 1; }
int64_t saved_width(int64_t kind) { return kind == LSTM ? 5 : kind == GRU ? 4 : 0; }

inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Each thread's share of the batch: [b0, b1), all of it for one thread or a small batch.
template <typename F>
void over_rows(int64_t batch, const F& f) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(8, (batch + threads - 1) / threads);
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;  // grad mode is per thread; these are raw kernels
    f(b0, b1);
  });
}

void check(const at::Tensor& xp, const at::Tensor& w_hh, const at::Tensor& b_hh, int64_t kind) {
  TORCH_CHECK(kind >= RNN_TANH && kind <= LSTM, "recurrence: unknown kind ", kind);
  TORCH_CHECK(xp.dim() == 3 && xp.is_contiguous() && xp.scalar_type() == at::kFloat,
              "recurrence: xp must be a contiguous float32 [B, T, G*H] tensor");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates(kind) * H && xp.size(2) == w_hh.size(0),
              "recurrence: w_hh must be [G*H, H] and match xp");
  TORCH_CHECK(b_hh.numel() == gates(kind) * H, "recurrence: b_hh must have G*H values");
}

// out [B, T, H]: the state after every step; prev [B, T, H]: the state before every step (0
// before the first), so that the backward's weight gradient is one product of contiguous
// tensors; saved [B, T, S*H]: what else the backward reads (GRU r, z, n, h @ W_hn + b_hn;
// LSTM i, f, g, o and the cell state c).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& xp,
                                                       const at::Tensor& w_hh,
                                                       const at::Tensor& b_hh, int64_t kind) {
  check(xp, w_hh, b_hh, kind);
  const int64_t B = xp.size(0), T = xp.size(1), H = w_hh.size(1), GH = gates(kind) * H;
  const int64_t SH = saved_width(kind) * H;
  auto out = at::empty({B, T, H}, xp.options());
  auto prev = at::empty({B, T, H}, xp.options());
  prev.select(1, 0).zero_();
  auto saved = at::empty({B, T, SH}, xp.options());
  auto bias = b_hh.contiguous();
  const float* bh = bias.data_ptr<float>();
  auto wt = w_hh.t();
  const std::vector<float> zeros(H, 0.f);  // LSTM: the cell state before the first step
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    auto gh = at::zeros({rows, GH}, xp.options());  // h @ W_hh^T; h = 0 before the first step
    for (int64_t t = 0; t < T; ++t) {
      if (t) at::mm_out(gh, prev.select(1, t).narrow(0, b0, rows), wt);
      for (int64_t b = b0; b < b1; ++b) {
        const float* __restrict__ x = xp.data_ptr<float>() + (b * T + t) * GH;
        const float* __restrict__ g = gh.data_ptr<float>() + (b - b0) * GH;
        float* __restrict__ h = out.data_ptr<float>() + (b * T + t) * H;
        float* __restrict__ s = saved.data_ptr<float>() + (b * T + t) * SH;
        const float* __restrict__ hp = prev.data_ptr<float>() + (b * T + t) * H;
        if (kind == RNN_TANH) {
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) h[j] = tanhf(x[j] + g[j]);
        } else if (kind == RNN_RELU) {
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) h[j] = std::max(x[j] + g[j], 0.f);
        } else if (kind == LSTM) {
          const float* __restrict__ cp = t ? s - SH + 4 * H : zeros.data();
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) {
            const float i = sigmoid(x[j] + g[j]);
            const float f = sigmoid(x[H + j] + g[H + j]);
            const float n = tanhf(x[2 * H + j] + g[2 * H + j]);
            const float o = sigmoid(x[3 * H + j] + g[3 * H + j]);
            const float c = f * cp[j] + i * n;
            h[j] = o * tanhf(c);
            s[j] = i, s[H + j] = f, s[2 * H + j] = n, s[3 * H + j] = o, s[4 * H + j] = c;
          }
        } else {
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) {
            const float r = sigmoid(x[j] + g[j] + bh[j]);
            const float z = sigmoid(x[H + j] + g[H + j] + bh[H + j]);
            const float hn = g[2 * H + j] + bh[2 * H + j];
            const float n = tanhf(x[2 * H + j] + r * hn);
            h[j] = (1.f - z) * n + z * hp[j];
            s[j] = r, s[H + j] = z, s[2 * H + j] = n, s[3 * H + j] = hn;
          }
        }
        if (t + 1 < T) std::copy(h, h + H, prev.data_ptr<float>() + (b * T + t + 1) * H);
      }
    }
  });
  return {out, prev, saved};
}

// The gradients of xp [B, T, G*H], of w_hh [G*H, H] and of b_hh [G*H] (GRU; for RNN and
// LSTM b_hh's gradient is xp's summed, which autograd gives through the projection).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                                        const at::Tensor& out,
                                                        const at::Tensor& prev,
                                                        const at::Tensor& saved,
                                                        const at::Tensor& w_hh, int64_t kind) {
  const int64_t B = out.size(0), T = out.size(1), H = out.size(2), GH = gates(kind) * H;
  const int64_t SH = saved_width(kind) * H;
  auto dout = grad_out.contiguous();
  auto dxp = at::empty({B, T, GH}, out.options());
  const std::vector<float> zeros(H, 0.f);  // LSTM: the cell state before the first step
  // the pre-activations' gradient as the recurrent product sees it (GRU: n's is r times it)
  auto dgh = kind == GRU ? at::empty({B, T, GH}, out.options()) : dxp;
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    auto dh = at::zeros({rows, H}, out.options());  // from step t + 1 through W_hh
    // the gradient from step t + 1 through GRU's z, or through LSTM's cell state
    auto carry = kind >= GRU ? at::zeros({rows, H}, out.options()) : at::Tensor();
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t at_bt = b * T + t, k = (b - b0) * H;
        const float* __restrict__ d = dout.data_ptr<float>() + at_bt * H;
        const float* __restrict__ h = out.data_ptr<float>() + at_bt * H;
        const float* __restrict__ hp = prev.data_ptr<float>() + at_bt * H;
        const float* __restrict__ s = saved.data_ptr<float>() + at_bt * SH;
        const float* __restrict__ dhr = dh.data_ptr<float>() + k;
        float* __restrict__ dx = dxp.data_ptr<float>() + at_bt * GH;
        if (kind == RNN_TANH) {
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) dx[j] = (dhr[j] + d[j]) * (1.f - h[j] * h[j]);
        } else if (kind == RNN_RELU) {
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) dx[j] = h[j] > 0.f ? dhr[j] + d[j] : 0.f;
        } else if (kind == LSTM) {
          float* __restrict__ cr = carry.data_ptr<float>() + k;  // through c: d c_{t+1} * f_{t+1}
          const float* __restrict__ cp = t ? s - SH + 4 * H : zeros.data();
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) {
            const float g = dhr[j] + d[j];
            const float i = s[j], f = s[H + j], n = s[2 * H + j], o = s[3 * H + j];
            const float tc = tanhf(s[4 * H + j]);
            const float dc = cr[j] + g * o * (1.f - tc * tc);
            dx[j] = dc * n * i * (1.f - i);
            dx[H + j] = dc * cp[j] * f * (1.f - f);
            dx[2 * H + j] = dc * i * (1.f - n * n);
            dx[3 * H + j] = g * tc * o * (1.f - o);
            cr[j] = dc * f;
          }
        } else {
          float* __restrict__ dg = dgh.data_ptr<float>() + at_bt * GH;
          float* __restrict__ cr = carry.data_ptr<float>() + k;
#pragma GCC ivdep
          for (int64_t j = 0; j < H; ++j) {
            const float g = dhr[j] + cr[j] + d[j];
            const float r = s[j], z = s[H + j], n = s[2 * H + j], hn = s[3 * H + j];
            const float dn = g * (1.f - z) * (1.f - n * n);
            const float dz = g * (hp[j] - n) * z * (1.f - z);
            const float dr = dn * hn * r * (1.f - r);
            cr[j] = g * z;
            dx[j] = dr, dx[H + j] = dz, dx[2 * H + j] = dn;
            dg[j] = dr, dg[H + j] = dz, dg[2 * H + j] = dn * r;
          }
        }
      }
      if (t) at::mm_out(dh, dgh.select(1, t).narrow(0, b0, rows), w_hh);
    }
  });
  // dW_hh: the sum over all steps of dgh_t^T @ h_{t-1}, as one product
  auto dw = at::mm(dgh.view({B * T, GH}).t(), prev.view({B * T, H}));
  auto db = kind == GRU ? dgh.sum({0, 1}) : at::Tensor();
  return {dxp, dw, db};
}

// Max pooling over each sequence's valid steps: states [B, T, F], lengths [B] -> the
// maximum [B, F] and the step it came from [B, F] (the first of equal maxima; a NaN wins, as
// in torch.max; no valid step: -inf and -1). One pass over the valid steps, where torch's
// masked max makes a masked copy of the states and reduces across a non-inner dimension.
std::tuple<at::Tensor, at::Tensor> max_pool(const at::Tensor& states, const at::Tensor& lengths) {
  TORCH_CHECK(states.dim() == 3 && states.scalar_type() == at::kFloat,
              "max_pool: states must be a float32 [B, T, F] tensor");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == states.size(0),
              "max_pool: lengths must be [B]");
  auto x = states.contiguous();
  auto len = lengths.to(at::kLong).contiguous();
  const int64_t B = x.size(0), T = x.size(1), F = x.size(2);
  auto values = at::empty({B, F}, x.options());
  auto index = at::empty({B, F}, x.options().dtype(at::kInt));
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* __restrict__ v = values.data_ptr<float>() + b * F;
      int32_t* __restrict__ i = index.data_ptr<int32_t>() + b * F;
      const int64_t steps = std::min<int64_t>(len.data_ptr<int64_t>()[b], T);
      const float* first = x.data_ptr<float>() + b * T * F;
      if (steps > 0) {  // step 0 holds every maximum so far
        std::copy(first, first + F, v);
        std::fill(i, i + F, 0);
      } else {
        std::fill(v, v + F, -INFINITY);
        std::fill(i, i + F, -1);
      }
      for (int64_t t = 1; t < steps; ++t) {
        const float* __restrict__ s = first + t * F;
        const int32_t step = static_cast<int32_t>(t);
#pragma GCC ivdep
        for (int64_t j = 0; j < F; ++j) {
          const bool wins = (s[j] > v[j]) | ((s[j] != s[j]) & (v[j] == v[j]));
          v[j] = wins ? s[j] : v[j];
          i[j] = wins ? step : i[j];
        }
      }
    }
  });
  return {values, index};
}

// max_pool's gradient: grad [B, F] goes to the step each maximum came from, zeros elsewhere.
at::Tensor max_pool_backward(const at::Tensor& grad, const at::Tensor& index, int64_t steps) {
  auto g = grad.contiguous();
  const int64_t B = g.size(0), F = g.size(1);
  auto out = at::zeros({B, steps, F}, g.options());
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* __restrict__ d = g.data_ptr<float>() + b * F;
      const int32_t* __restrict__ i = index.data_ptr<int32_t>() + b * F;
      float* __restrict__ o = out.data_ptr<float>() + b * steps * F;
      for (int64_t j = 0; j < F; ++j)
        if (i[j] >= 0) o[i[j] * F + j] = d[j];
    }
  });
  return out;
}

// Dropout multipliers m[2q], m[2q + 1] for q in [q0, q1): 0 where the uniform draw is below
// `drop`, else `keep`. Draw q is SplitMix64 (Steele et al. 2014) of base + q times the golden
// ratio, whose bits 40-63 and 8-31 give the two uniforms in [0, 1). A plain function of
// restrict pointers and values, so that it vectorises (inside a lambda it does not).
void dropout_pairs(float* __restrict__ m, int64_t q0, int64_t q1, uint64_t base, float drop,
                   float keep) {
  for (int64_t q = q0; q < q1; ++q) {
    uint64_t z = base + static_cast<uint64_t>(q) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u0 = static_cast<float>(static_cast<int32_t>(z >> 40)) * 0x1p-24f;
    const float u1 = static_cast<float>(static_cast<int32_t>((z >> 8) & 0xFFFFFFu)) * 0x1p-24f;
    m[2 * q] = u0 < drop ? 0.f : keep;
    m[2 * q + 1] = u1 < drop ? 0.f : keep;
  }
}

// Inverted dropout's multiplier, float32 [size]: every element 0 with probability p, else
// 1 / (1 - p), from dropout_pairs. A function of the seed and the position only, so the same
// on any number of threads, and computed in vector lanes, where torch's bernoulli_ draws
// element after element from one Mersenne Twister.
at::Tensor dropout_mask(at::IntArrayRef size, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_mask: p must be in [0, 1), got ", p);
  auto mask = at::empty(size, at::TensorOptions().dtype(at::kFloat));
  const int64_t n = mask.numel(), pairs = (n + 1) / 2;
  const float keep = static_cast<float>(1.0 / (1.0 - p)), drop = static_cast<float>(p);
  auto draws = n == 2 * pairs ? mask : at::empty({2 * pairs}, mask.options());
  float* m = draws.data_ptr<float>();
  at::parallel_for(0, pairs, 8192, [&](int64_t q0, int64_t q1) {
    dropout_pairs(m, q0, q1, static_cast<uint64_t>(seed), drop, keep);
  });
  if (n < 2 * pairs) mask.view(-1).copy_(draws.narrow(0, 0, n));
  return mask;
}

// The divisor of each text's mean, [B, 1] float: its n-grams counted, at least 1 (NgramBag's
// valid.sum((1, 2)).clamp(min=1), as masked_mean takes it).
at::Tensor bag_counts(const at::Tensor& valid) {
  return valid.sum(1).clamp_min(1).unsqueeze(1).to(at::kFloat);
}

// The n-gram bag (network.py's NgramBag) in one call: tokens [B, T], lengths [B], the table
// [K, D] -> the mean row of each text's n-grams [B, D], with the bucket ids [B, M] and the
// n-grams counted [B, M] (bool) that the backward reads (M = T times the number of lengths).
// An n-gram of length n starting at step t hashes as NgramBag.ids does: h = n, then
// h = (h * base + token) % buckets for each of its n tokens (PAD_ID, 0, past the end); it
// counts where t + n - 1 < length and, training with n-gram dropout, where its draw from
// torch.rand is >= p. The mean is taken with the same ATen ops as NgramBag's (embedding,
// where, sum, division by the count clamped to 1), so it has the same bits; what is saved is
// the forty-odd small ops that hash, mask and count, and their backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_bag(const at::Tensor& tokens,
                                                         const at::Tensor& lengths,
                                                         const at::Tensor& table,
                                                         at::IntArrayRef ngrams, int64_t base,
                                                         const c10::optional<at::Tensor>& draws,
                                                         double p) {
  TORCH_CHECK(tokens.dim() == 2 && at::isIntegralType(tokens.scalar_type(), false),
              "ngram_bag: tokens must be an integer [B, T] tensor");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == tokens.size(0),
              "ngram_bag: lengths must be [B]");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == at::kFloat,
              "ngram_bag: table must be a float32 [K, D] tensor");
  const int64_t B = tokens.size(0), T = tokens.size(1), N = ngrams.size(), M = N * T;
  const int64_t K = table.size(0);
  TORCH_CHECK(!draws || draws->numel() == B * M, "ngram_bag: draws must have B * M values");
  auto tok = tokens.to(at::kLong).contiguous();
  auto len = lengths.to(at::kLong).contiguous();
  auto ids = at::empty({B, M}, tok.options());
  auto valid = at::empty({B, M}, tok.options().dtype(at::kBool));
  auto drawn = draws ? draws->contiguous() : at::Tensor();
  const int64_t* tk = tok.data_ptr<int64_t>();
  const float* u = draws ? drawn.data_ptr<float>() : nullptr;
  int64_t* id = ids.data_ptr<int64_t>();
  bool* ok = valid.data_ptr<bool>();
  const int64_t* sizes = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t size = sizes[b];
    for (int64_t g = 0; g < N; ++g) {
      const int64_t n = ngrams[g];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t at_m = b * M + g * T + t;
        int64_t h = n;
        for (int64_t k = t; k < t + n; ++k) h = (h * base + (k < T ? tk[b * T + k] : 0)) % K;
        id[at_m] = h;
        ok[at_m] = t + n - 1 < size && !(u && u[at_m] < static_cast<float>(p));
      }
    }
  }
  // NgramBag: masked_mean(self.table(ids), valid, valid.sum((1, 2)))
  auto mask = valid.unsqueeze(-1);
  auto rows = at::embedding(table, ids);
  auto total = at::where(mask, rows, at::zeros_like(rows)).sum(1);
  return {total / bag_counts(valid), ids, valid};
}

// ngram_bag's gradient for the table [K, D]: each counted n-gram's row gets the output's
// gradient over its text's count, in the order of the n-grams, as autograd's embedding
// backward adds them (it also adds the zeros of the n-grams not counted).
at::Tensor ngram_bag_backward(const at::Tensor& grad, const at::Tensor& ids,
                              const at::Tensor& valid, int64_t buckets) {
  const int64_t B = ids.size(0), M = ids.size(1), D = grad.size(1);
  auto g = (grad / bag_counts(valid)).contiguous();  // the division's gradient, as autograd's
  auto out = at::zeros({buckets, D}, g.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  const bool* ok = valid.data_ptr<bool>();
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* __restrict__ d = g.data_ptr<float>() + b * D;
    for (int64_t m = 0; m < M; ++m) {
      if (!ok[b * M + m]) continue;
      float* __restrict__ row = o + id[b * M + m] * D;
#pragma GCC ivdep
      for (int64_t j = 0; j < D; ++j) row[j] += d[j];
    }
  }
  return out;
}

// Denormal floats (below 1.2e-38) to zero on the calling thread, as results (flush to zero)
// and as inputs (denormals are zero), or back to IEEE's gradual underflow; returns whether
// both were on before. x86's MXCSR bits FTZ and DAZ, AArch64's FPCR.FZ; elsewhere nothing.
bool set_flush(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned bits = 0x8040;  // FTZ (bit 15), DAZ (bit 6)
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(on ? csr | bits : csr & ~bits);
  return (csr & bits) == bits;
#elif defined(__aarch64__)
  const uint64_t fz = uint64_t{1} << 24;
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  asm volatile("msr fpcr, %0" : : "r"(on ? fpcr | fz : fpcr & ~fz));
  return (fpcr & fz) != 0;
#else
  return false;
#endif
}

// set_flush on the calling thread and on every thread of the intra-op pool, which ATen's
// kernels, MKL's products and oneDNN share (torch.set_flush_denormal sets the calling thread
// alone). A float mode is per thread: a parallel region of one index per thread reaches
// each. Returns whether the calling thread's flush was on before.
bool flush_denormals(bool on) {
  const bool before = set_flush(on);
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { set_flush(on); });
  return before;
}

}  // namespace

TORCH_LIBRARY(rnnflow_recurrence, m) {
  m.def("forward(Tensor xp, Tensor w_hh, Tensor b_hh, int kind) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor out, Tensor prev, Tensor saved, Tensor w_hh, int kind)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("max_pool(Tensor states, Tensor lengths) -> (Tensor, Tensor)");
  m.def("max_pool_backward(Tensor grad, Tensor index, int steps) -> Tensor");
  m.def("dropout_mask(int[] size, float p, int seed) -> Tensor");
  m.def(
      "ngram_bag(Tensor tokens, Tensor lengths, Tensor table, int[] ngrams, int base,"
      " Tensor? draws, float p) -> (Tensor, Tensor, Tensor)");
  m.def("ngram_bag_backward(Tensor grad, Tensor ids, Tensor valid, int buckets) -> Tensor");
  m.def("flush_denormals(bool on) -> bool");
}

TORCH_LIBRARY_IMPL(rnnflow_recurrence, CPU, m) {
  m.impl("forward", forward);
  m.impl("backward", backward);
  m.impl("max_pool", max_pool);
  m.impl("max_pool_backward", max_pool_backward);
  m.impl("ngram_bag", ngram_bag);
  m.impl("ngram_bag_backward", ngram_bag_backward);
}

// No tensor goes in, so the dispatcher finds no backend: the mask is the CPU's.
TORCH_LIBRARY_IMPL(rnnflow_recurrence, CompositeExplicitAutograd, m) {
  m.impl("dropout_mask", dropout_mask);
  m.impl("flush_denormals", flush_denormals);
}
