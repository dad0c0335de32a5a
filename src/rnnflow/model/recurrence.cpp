// The recurrence of nn.RNN (tanh, relu) and nn.GRU for CPU training, one layer and one
// direction, forward and backward; compiled on first use by rnnflow/model/fused.py.
//
// Why: torch's CPU RNN runs every step as a dozen small ops with their autograd nodes, each
// a few microseconds of dispatch, so at batch 64 and hidden 128 the step is mostly overhead.
// Here a step is one matrix product (h @ W_hh^T, ATen's) and one loop over the batch that
// does every gate's arithmetic; the backward step is one loop and one product, and the
// recurrent weights' gradient is one large product after the loop.
//
// Layout: batch first. xp [B, T, G*H] is the input projection x @ W_ih^T + b_ih of every step
// (for RNN with b_hh added too, since both biases only add), G gates in torch's order (GRU
// r, z, n). Rows of a batch never meet in a recurrence, so the threads split the batch and
// each runs its rows through every step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

// glibc's vector versions (libmvec) of the two functions, so the gate loops vectorise
// without -ffast-math (which glibc requires to declare them itself).
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
}

namespace {

enum Kind : int64_t { RNN_TANH = 0, RNN_RELU = 1, GRU = 2 };

int64_t gates(int64_t kind) { return kind == GRU ? 3 : 1; }
int64_t saved_width(int64_t kind) { return kind == GRU ? 4 : 0; }

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
  TORCH_CHECK(kind >= RNN_TANH && kind <= GRU, "recurrence: unknown kind ", kind);
  TORCH_CHECK(xp.dim() == 3 && xp.is_contiguous() && xp.scalar_type() == at::kFloat,
              "recurrence: xp must be a contiguous float32 [B, T, G*H] tensor");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates(kind) * H && xp.size(2) == w_hh.size(0),
              "recurrence: w_hh must be [G*H, H] and match xp");
  TORCH_CHECK(b_hh.numel() == gates(kind) * H, "recurrence: b_hh must have G*H values");
}

// out [B, T, H]: the state after every step; prev [B, T, H]: the state before every step (0
// before the first), so that the backward's weight gradient is one product of contiguous
// tensors; saved [B, T, S*H]: what else the backward reads (GRU r, z, n, h @ W_hn + b_hn).
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

// The gradients of xp [B, T, G*H], of w_hh [G*H, H] and of b_hh [G*H] (GRU; for RNN
// b_hh's gradient is xp's summed, which autograd gives through the projection).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                                        const at::Tensor& out,
                                                        const at::Tensor& prev,
                                                        const at::Tensor& saved,
                                                        const at::Tensor& w_hh, int64_t kind) {
  const int64_t B = out.size(0), T = out.size(1), H = out.size(2), GH = gates(kind) * H;
  const int64_t SH = saved_width(kind) * H;
  auto dout = grad_out.contiguous();
  auto dxp = at::empty({B, T, GH}, out.options());
  // the pre-activations' gradient as the recurrent product sees it (GRU: n's is r times it)
  auto dgh = kind == GRU ? at::empty({B, T, GH}, out.options()) : dxp;
  over_rows(B, [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    auto dh = at::zeros({rows, H}, out.options());  // from step t + 1 through W_hh
    auto carry = at::zeros({rows, H}, out.options());  // GRU: from step t + 1 through z
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

}  // namespace

TORCH_LIBRARY(rnnflow_recurrence, m) {
  m.def("forward(Tensor xp, Tensor w_hh, Tensor b_hh, int kind) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor out, Tensor prev, Tensor saved, Tensor w_hh, int kind)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnflow_recurrence, CPU, m) {
  m.impl("forward", forward);
  m.impl("backward", backward);
}
