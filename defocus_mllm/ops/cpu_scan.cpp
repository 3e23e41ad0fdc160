// Native CPU kernels of the De-focus Mamba mixer, forward and backward, fp32 accumulation: the selective scan
// (Mamba's S6 recurrence), the fused mixer core around it (time step, rotation of B / C, scan, group RMS norm,
// D skip, SiLU gate: the "fused mixer" section) and the causal depthwise conv + SiLU ("causal conv" section).
//
// Built at run time by defocus_mllm/ops/cpu_scan.py and called through ctypes: plain C entry points on raw
// contiguous fp32 buffers, so the build needs only a C++ compiler and ATen's small parallel header (no pybind11,
// no torch/extension.h), which keeps the one-off build to a few seconds.
//
// Layouts (row-major; Np = the number of states padded to a multiple of 8):
//   u, delta, y                             : [B, D, L] with any element strides (forward only; see Strides)
//   grad_y, grad_u, grad_delta, and u, delta of the backward pass : [B, D, L] contiguous
//   A, grad_A                               : [D, Np]
//   Bt, Ct, grad_Bt, grad_Ct                : [B, L, Np]  (time-major per batch: one step reads Np floats)
//
// Recurrence, per batch b, channel d and state n:
//   s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t,  s_{-1} = 0;   y_t = sum_n C_t * s_t
//
// Work is split over the flattened (b, d) rows. The states of one row are up to eight 8-lane vectors held in
// registers; more than 64 states are done in blocks of 64, whose contributions to y (and to grad_u, grad_delta)
// simply add up because the states do not interact.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace {

// Eight fp32 lanes with GCC/Clang vector extensions: one AVX register where the build enables AVX2 (two SSE
// registers otherwise, NEON on ARM). Written explicitly because GCC does not reliably auto-vectorise the state
// loops once it has fully unrolled them for a compile-time N.
constexpr int kLanes = 8;
constexpr int kMaxVecs = 8;  // states kept in registers per row: 8 vectors = 64 states; larger N goes in blocks
constexpr int kPairMaxVecs = 4;  // up to 32 states, the forward pass runs two rows at once
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));  // unsigned: the shift below may wrap

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vf v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  typedef float v4 __attribute__((vector_size(16)));
  v4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  a = a + __builtin_shufflevector(a, a, 2, 3, 0, 1);
  return a[0] + a[1];
#else
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#endif
}

// The lane sums of eight vectors at once, as one vector: out[j] = sum(a[j]). A transpose-and-add tree (about
// 2.5 shuffles/adds per sum instead of 6 for one hsum); the scan defers its per-step sums into blocks of 8 steps.
inline vf hsum8(const vf* a) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  auto pair = [](vf x, vf y) {  // [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7]
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vf h01 = pair(a[0], a[1]), h23 = pair(a[2], a[3]), h45 = pair(a[4], a[5]), h67 = pair(a[6], a[7]);
  const vf q0 = pair(h01, h23), q1 = pair(h45, h67);  // [s0 s1 s2 s3 | s0' s1' s2' s3'] halves of each sum
  return __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
#else
  vf out;
  for (int j = 0; j < kLanes; ++j) out[j] = hsum(a[j]);
  return out;
#endif
}

// y[j * st] = v[j] for j < n (or += when accumulate): the sums of a block of steps, st = y's time stride.
inline void put_sums(float* y, int64_t st, vf v, int n, bool accumulate) {
  if (n == kLanes && st == 1) {
    store(y, accumulate ? load(y) + v : v);
  } else {
    for (int j = 0; j < n; ++j) y[j * st] = accumulate ? y[j * st] + v[j] : v[j];
  }
}

// Element strides (batch, channel, time) of a [B, D, L] operand: the forward pass reads u / delta and writes y in
// any layout, e.g. channels-last [B, L, D] memory seen as [B, D, L], so callers need no transposed copies.
struct Strides {
  int64_t b, d, t;
};

inline vf vmax(vf a, vf b) {
#if defined(__AVX__)
  return _mm256_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}

inline vf vmin(vf a, vf b) {
#if defined(__AVX__)
  return _mm256_min_ps(a, b);
#else
  return a < b ? a : b;
#endif
}

// 2^x of eight lanes; the decays exp(delta A) are computed as 2^(delta * A log2(e)) with A log2(e) formed once
// per row (libm's expf is a scalar call, and this is most of the scan's work). x = k + f with k = round(x),
// |f| <= 1/2: adding 1.5 * 2^23 rounds x and leaves k (two's complement) in the low mantissa bits of t, so t << 23
// is k << 23 modulo 2^32, and adding that to the bits of p = 2^f multiplies p by 2^k (an integer add instead of a
// multiply, which would compete with the polynomial's FMAs). 2^f = 1 + f q(f) with q of degree 5, fitted here for
// relative error (about 1e-7; exact at f = 0, so that decays close to 1 carry no bias over long memories). x is
// clamped to [-126, 127]: at k = -126 a p < 1 gets an exponent field of 0, which the kernel's DAZ mode reads as 0
// (the true value is below 2^-126; see FlushDenormals).
inline vf vexp2(vf x) {
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23
  x = vmin(vmax(x, vf{} - 126.0f), vf{} + 127.0f);
  const vf t = x + magic;
  const vf f = x - (t - magic);
  vf q = vf{} + 1.326481724e-3f;
  q = q * f + 9.671512679e-3f;
  q = q * f + 5.550733433e-2f;
  q = q * f + 2.402224208e-1f;
  q = q * f + 6.931469778e-1f;
  const vf p = q * f + 1.0f;
  return (vf)((vu)p + ((vu)t << 23));
}

constexpr float kLog2e = 1.44269504088896341f;

// Sets flush-to-zero / denormals-are-zero on the calling thread for the kernel's duration (x86): tiny decays then
// give exact zeros instead of denormal states, whose arithmetic is slow. Restores the caller's mode afterwards.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Rows per thread: a parallel region costs microseconds (far more on a loaded machine, where waking a worker
// may wait for a time slice), so small scans stay on the calling thread, like torch's own small CPU ops.
constexpr int64_t kGrain = int64_t(1) << 16;  // state updates (rows x L x Np) per chunk, at least

int64_t num_chunks(int64_t rows, int64_t L, int64_t Np, int64_t threads) {
  const int64_t by_work = rows * L * Np / kGrain;
  return std::max<int64_t>(1, std::min({threads, rows, by_work}));
}

// Split rows [0, rows) into `chunks` near-equal contiguous ranges and run fn(chunk, begin, end) on ATen's
// intra-op thread pool (the one torch's own CPU ops use, so no second OpenMP runtime competes for the cores).
template <typename F>
void run_chunks(int64_t rows, int64_t chunks, const F& fn) {
  if (chunks == 1) {
    FlushDenormals ftz;
    fn(0, 0, rows);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    FlushDenormals ftz;
    for (int64_t c = c0; c < c1; ++c) fn(c, rows * c / chunks, rows * (c + 1) / chunks);
  });
}

// R channels (rows of one batch element, R <= 2) for one block of NV * 8 states: the rows share each step's B and C
// loads and give the core R * NV independent recurrences to overlap. Bt / Ct point at the block's first state of
// step 0 (row stride Np); u / delta / y point at row 0 (time stride ist / dst / yst; row r at r * isd / r * dsd /
// r * ysd), A of row r at r * Np. The sums y_t are kept as vectors for 8 steps and reduced together (hsum8).
// accumulate: add to y (later state blocks) instead of writing it.
template <int NV, int R>
void forward_rows(const float* u, const float* delta, int64_t isd, int64_t ist, int64_t dsd, int64_t dst,
                  const float* a, const float* Bt,
                  const float* Ct, float* y, int64_t ysd, int64_t yst, int64_t L, int64_t Np, bool accumulate,
                  const float* s0, float* sf) {
  vf s[R][NV], av[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      s[r][v] = s0 ? load(s0 + r * Np + v * kLanes) : vf{};
      av[r][v] = load(a + r * Np + v * kLanes) * kLog2e;
    }
  }
  vf acc[R][kLanes];
  for (int64_t t0 = 0; t0 < L; t0 += kLanes) {
    const int nt = static_cast<int>(std::min<int64_t>(kLanes, L - t0));
    for (int j = 0; j < nt; ++j) {
      const int64_t t = t0 + j;
      vf b[NV], c[NV];
      for (int v = 0; v < NV; ++v) {
        b[v] = load(Bt + t * Np + v * kLanes);
        c[v] = load(Ct + t * Np + v * kLanes);
      }
      for (int r = 0; r < R; ++r) {
        const float dt = delta[r * dsd + t * dst], du = dt * u[r * isd + t * ist];
        vf sum = vf{};
        for (int v = 0; v < NV; ++v) {
          const vf x = du * b[v];  // off the loop-carried chain, which is then one FMA per step
          s[r][v] = vexp2(dt * av[r][v]) * s[r][v] + x;
          sum += c[v] * s[r][v];
        }
        acc[r][j] = sum;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = nt; j < kLanes; ++j) acc[r][j] = vf{};
      put_sums(y + r * ysd + t0 * yst, yst, hsum8(acc[r]), nt, accumulate);
    }
  }
  if (sf) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) store(sf + r * Np + v * kLanes, s[r][v]);
  }
}

// Backward of one (b, d) row for one block of states: a forward sweep that stores this row's states and decays in
// `work` ((L + 1) * NV vectors each; state row 0 is s_{-1}: the initial state s0, or 0), then the reverse-time
// adjoint recurrence (starting from the gradient of the final state, gfin, or 0)
//   g_t = grad_y_t C_t + exp(delta_{t+1} A) g_{t+1}          (g = dLoss/ds_t)
// which gives every gradient of step t from g_t, s_{t-1} and the decay of step t. grad_u / grad_delta of the row
// are written (first block) or accumulated; gA / gBt / gCt are accumulated; gs0 (dLoss/ds_{-1}) is written.
template <int NV>
void backward_row(const float* u, const float* delta, const float* a, const float* Bt, const float* Ct,
                  const float* gy, float* gu, float* gdelta, float* gA, float* gBt, float* gCt, vf* work,
                  int64_t L, int64_t Np, bool accumulate, const float* s0, const float* gfin, float* gs0) {
  vf* S = work;                 // S[(t + 1) * NV + v] = s_t
  vf* E = work + (L + 1) * NV;  // E[t * NV + v] = exp(delta_t A)
  vf av[NV], av2[NV], s[NV];
  for (int v = 0; v < NV; ++v) {
    av[v] = load(a + v * kLanes);
    av2[v] = av[v] * kLog2e;
    S[v] = s[v] = s0 ? load(s0 + v * kLanes) : vf{};
  }
  for (int64_t t = 0; t < L; ++t) {
    const float dt = delta[t], du = dt * u[t];
    const float* bt = Bt + t * Np;
    for (int v = 0; v < NV; ++v) {
      const vf decay = vexp2(dt * av2[v]);
      s[v] = decay * s[v] + du * load(bt + v * kLanes);
      E[t * NV + v] = decay;
      S[(t + 1) * NV + v] = s[v];
    }
  }
  vf g[NV], ga[NV];
  for (int v = 0; v < NV; ++v) {
    g[v] = gfin ? load(gfin + v * kLanes) : vf{};
    ga[v] = vf{};
  }
  for (int64_t t = L - 1; t >= 0; --t) {
    const float dy = gy[t], dt = delta[t], ut = u[t], du = dt * ut;
    const float* bt = Bt + t * Np;
    const float* ct = Ct + t * Np;
    float* gbt = gBt + t * Np;
    float* gct = gCt + t * Np;
    vf sum_gb = vf{}, sum_da = vf{};
    for (int v = 0; v < NV; ++v) {
      const int o = v * kLanes;
      const vf gn = g[v] + dy * load(ct + o);
      const vf e = E[t * NV + v];
      store(gct + o, load(gct + o) + dy * S[(t + 1) * NV + v]);
      store(gbt + o, load(gbt + o) + du * gn);
      sum_gb += gn * load(bt + o);
      const vf gd = gn * S[t * NV + v] * e;  // dLoss / d(delta_t A) through exp(delta_t A) s_{t-1}
      sum_da += gd * av[v];
      ga[v] += gd * dt;
      g[v] = gn * e;
    }
    const float gb = hsum(sum_gb);
    const float gu_t = gb * dt, gd_t = gb * ut + hsum(sum_da);
    gu[t] = accumulate ? gu[t] + gu_t : gu_t;
    gdelta[t] = accumulate ? gdelta[t] + gd_t : gd_t;
  }
  for (int v = 0; v < NV; ++v) {
    store(gA + v * kLanes, load(gA + v * kLanes) + ga[v]);
    if (gs0) store(gs0 + v * kLanes, g[v]);
  }
}

// Calls row(n0, nv, accumulate) for each block of at most kMaxVecs vectors of the Np (padded) states.
template <typename Row>
void for_each_block(int64_t Np, const Row& row) {
  for (int64_t n0 = 0; n0 < Np; n0 += kMaxVecs * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kMaxVecs, (Np - n0) / kLanes));
    row(n0, nv, n0 > 0);
  }
}

// Dispatches a runtime vector count 1..8 to the template instantiation (states then stay in registers).
template <template <int> class Fn, typename... Args>
void dispatch_nv(int nv, Args... args) {
  switch (nv) {
    case 1: Fn<1>::run(args...); break;
    case 2: Fn<2>::run(args...); break;
    case 3: Fn<3>::run(args...); break;
    case 4: Fn<4>::run(args...); break;
    case 5: Fn<5>::run(args...); break;
    case 6: Fn<6>::run(args...); break;
    case 7: Fn<7>::run(args...); break;
    default: Fn<8>::run(args...); break;
  }
}

template <int NV>
struct Forward {  // pair: two rows at once (only while both rows' states fit in registers, NV <= 4)
  template <typename... Args>
  static void run(bool pair, Args... args) {
    if constexpr (NV <= kPairMaxVecs) {
      if (pair) return forward_rows<NV, 2>(args...);
    }
    forward_rows<NV, 1>(args...);
  }
};

template <int NV>
struct Backward {
  template <typename... Args>
  static void run(Args... args) { backward_row<NV>(args...); }
};


// Vector forms of the mixer's elementwise functions (libm's are scalar calls, and there is one per element):
// exp(x) = 2^(x log2 e) through vexp2; softplus(v) = max(v, 0) + log1p(exp(-|v|)) with log1p(e) = 2 atanh(e / (2 + e))
// as its odd series (e <= 1, so e / (2 + e) <= 1/3 and six terms reach fp32 precision; no cancellation for tiny e).
// F.softplus's threshold (the identity above 20) gives the same fp32 value: log1p(exp(-20)) is below half an ulp.
inline vf vexp(vf x) { return vexp2(x * kLog2e); }
inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(vf{} - x)); }
inline vf vsoftplus(vf v) {
  const vf e = vexp(vf{} - vmax(v, vf{} - v));
  const vf s = e / (2.0f + e), s2 = s * s;
  vf q = vf{} + (1.0f / 11.0f);
  q = q * s2 + (1.0f / 9.0f);
  q = q * s2 + (1.0f / 7.0f);
  q = q * s2 + (1.0f / 5.0f);
  q = q * s2 + (1.0f / 3.0f);
  q = q * s2 + 1.0f;
  return vmax(v, vf{}) + 2.0f * s * q;
}

// n <= 8 elements at stride st as one vector (zeros past n), and back
inline vf load_n(const float* p, int64_t st, int n) {
  if (n == kLanes && st == 1) return load(p);
  vf v = vf{};
  for (int j = 0; j < n; ++j) v[j] = p[j * st];
  return v;
}

inline void store_n(float* p, int64_t st, vf v, int n) {
  if (n == kLanes && st == 1) return store(p, v);
  for (int j = 0; j < n; ++j) p[j * st] = v[j];
}

// fn(c, n) for the channels c .. c + n of a unit of g, n <= 8
template <typename F>
inline void for_lanes(int64_t g, const F& fn) {
  for (int64_t c = 0; c < g; c += kLanes) fn(c, static_cast<int>(std::min<int64_t>(kLanes, g - c)));
}

// Per-chunk partial sums of the gradients that are sums over rows of several batches (grad_Bt / grad_Ct over the
// channels of a batch, grad_A and the per-channel vectors over batches), reduced afterwards in chunk order so that
// the result does not depend on thread timing.
struct Partials {
  int64_t chunks, batch, ln, per_dim;
  std::vector<int64_t> first_b, last_b;
  std::vector<std::vector<float>> bc, dim;  // [grad_Bt | grad_Ct] of the chunk's batches; per-channel sums

  Partials(int64_t chunks_, int64_t units, int64_t units_per_batch, int64_t batch_, int64_t ln_, int64_t per_dim_)
      : chunks(chunks_), batch(batch_), ln(ln_), per_dim(per_dim_), first_b(chunks_), last_b(chunks_),
        bc(chunks_), dim(chunks_) {
    for (int64_t c = 0; c < chunks; ++c) {
      first_b[c] = (units * c / chunks) / units_per_batch;
      last_b[c] = std::max(first_b[c], (units * (c + 1) / chunks - 1) / units_per_batch);
    }
  }
  void init(int64_t c) {
    bc[c].assign(2 * (last_b[c] - first_b[c] + 1) * ln, 0.0f);
    dim[c].assign(per_dim, 0.0f);
  }
  float* b_of(int64_t c, int64_t b) { return bc[c].data() + (b - first_b[c]) * ln; }
  float* c_of(int64_t c, int64_t b) { return b_of(c, b) + (last_b[c] - first_b[c] + 1) * ln; }

  // writes gBt, gCt [batch, ln] and the per-channel sums `out` [per_dim]
  void reduce(float* gBt, float* gCt, float* out) {
    const int64_t red_chunks = chunks == 1 ? 1 : std::min(batch, chunks);
    run_chunks(batch, red_chunks, [&](int64_t, int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* ob = gBt + b * ln;
        float* oc = gCt + b * ln;
        std::fill(ob, ob + ln, 0.0f);
        std::fill(oc, oc + ln, 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          if (b < first_b[c] || b > last_b[c]) continue;
          const float* pb = b_of(c, b);
          const float* pc = c_of(c, b);
          for (int64_t i = 0; i < ln; ++i) ob[i] += pb[i];
          for (int64_t i = 0; i < ln; ++i) oc[i] += pc[i];
        }
      }
    });
    std::fill(out, out + per_dim, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = dim[c].data();
      for (int64_t i = 0; i < per_dim; ++i) out[i] += p[i];
    }
  }
};

// ------------------------------------------------------------------------------------------------- fused mixer
//
// The Mamba mixer between its projections, per batch b, position t and channel d (G = group_norm_size):
//   u = x[b, t, d];  delta = softplus(dt[b, t, d] + dt_bias[d]) * inv_dsf
//     (given dt_proj's weight W [D, R], dt is dt_proj's input [B, L, R] and dt[b, t] . W[d] takes dt[b, t, d]'s place)
//   y = the scan of (u, delta, A, rotated B, rotated C) from the initial state s0[b, d]
//   n = y * rsqrt(mean over the G channels of d's group of y^2 + 1e-6)      (n = y without group norm)
//   out[b, t, d] = (n + u * Dskip[d]) * silu(z[b, t, d])
// x, z, dt are read in place with any element strides (b, t, d): the projections' channels-last outputs and views
// of them. The work unit is one group of channels of one batch element: its delta and y live in per-thread
// buffers of G x L floats (u is read from x in place), so the norm over the group is done right after the group's
// scans and `out` ([B, L, D], contiguous) is written once. B and C arrive rotated and padded ([B, L, Np], from
// defocus_mixer_rotate).

struct MixerShape {
  int64_t batch, dim, L, Np, group;  // group: channels per unit (the norm's group, or a block when there is none)
  bool norm;
  float inv_dsf;
  Strides xs, zs, ds;  // (b, t, d) strides of x, z, dt; dt's are (b, t, r) when the kernel applies dt_proj
  int64_t R = 0;  // dt_proj's rank when the kernel applies it (dtw [R, D], W transposed), else 0
  const float* dtw = nullptr;
};

inline MixerShape mixer_shape(const int64_t* shape, const int64_t* strides, float delta_scale_factor,
                              const float* dt_weight = nullptr) {
  MixerShape m;
  m.R = dt_weight ? shape[5] : 0;
  m.dtw = dt_weight;
  m.batch = shape[0];
  m.dim = shape[1];
  m.L = shape[2];
  m.Np = shape[3];
  m.norm = shape[4] > 0;
  m.group = m.norm ? shape[4] : std::min<int64_t>(16, m.dim);
  m.inv_dsf = 1.0f / delta_scale_factor;
  // Strides holds (b, d, t); the caller passes (b, t, d), the order of [B, L, D]
  m.xs = {strides[0], strides[2], strides[1]};
  m.zs = {strides[3], strides[5], strides[4]};
  m.ds = {strides[6], strides[8], strides[7]};
  return m;
}

// dt_proj in the kernel: out[c] = sum_r lr[r * sr] w[r * D + c] for c < g, the g channels of W's transpose that
// start at w, one row of dt_proj's input lr (stride sr). 64 channels of accumulators at a time share each r's
// broadcast; the sum runs over r in order, in fp32.
inline void project_row(const float* lr, int64_t sr, int64_t R, const float* w, int64_t D, int64_t g, float* out) {
  constexpr int kAcc = 8;  // vectors of accumulators per pass
  for (int64_t c0 = 0; c0 < g; c0 += kAcc * kLanes) {
    vf acc[kAcc] = {};
    if (g - c0 >= kAcc * kLanes) {  // whole: the loop unrolls and the accumulators stay in registers
      for (int64_t r = 0; r < R; ++r) {
        const vf l = vf{} + lr[r * sr];
        for (int i = 0; i < kAcc; ++i) acc[i] += l * load(w + r * D + c0 + i * kLanes);
      }
      for (int i = 0; i < kAcc; ++i) store(out + c0 + i * kLanes, acc[i]);
      continue;
    }
    for_lanes(g - c0, [&](int64_t c, int n) {
      vf a = vf{};
      for (int64_t r = 0; r < R; ++r) a += (vf{} + lr[r * sr]) * load_n(w + r * D + c0 + c, 1, n);
      store_n(out + c0 + c, 1, a, n);
    });
  }
}

// delta of channels d0 .. d0 + g of batch b at the steps t0 .. t1: element (c, t) at Dl[c * cs + (t - t0) * ts];
// SG (optional, same layout): d delta / d dt. When the kernel applies dt_proj (m.dtw; the forward, cs = 1), each
// step's projected dt is formed in its row of Dl first, then turned into delta in place.
inline void gather_delta(const MixerShape& m, const float* dt, const float* dt_bias, int64_t b, int64_t d0,
                         int64_t g, float* Dl, float* SG, int64_t cs, int64_t ts, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    // dt of the step's channels at stride sd: projected into the step's row of Dl, or read in place
    float* row = Dl + (t - t0) * ts;
    if (m.dtw) project_row(dt + b * m.ds.b + t * m.ds.t, m.ds.d, m.R, m.dtw + d0, m.dim, g, row);
    const float* dr = m.dtw ? row : dt + b * m.ds.b + t * m.ds.t + d0 * m.ds.d;
    const int64_t sd = m.dtw ? 1 : m.ds.d;
    for_lanes(g, [&](int64_t c, int n) {
      const vf v = load_n(dr + c * sd, sd, n) + load_n(dt_bias + d0 + c, 1, n);
      store_n(Dl + c * cs + (t - t0) * ts, cs, vsoftplus(v) * m.inv_dsf, n);
      if (SG) store_n(SG + c * cs + (t - t0) * ts, cs, vsigmoid(v) * m.inv_dsf, n);
    });
  }
}

// The scans of the unit's channels (two at a time while their states fit in registers): channel c reads u at
// u + c * isd (time stride ist), delta at delta + c * dsd (dst) and writes y at y + c * ysd (yst).
inline void scan_unit(const MixerShape& m, const float* A, const float* Bt, const float* Ct, const float* s0,
                      float* sf, int64_t b, int64_t d0, int64_t g, const float* u, int64_t isd, int64_t ist,
                      const float* delta, int64_t dsd, int64_t dst, float* y, int64_t ysd, int64_t yst) {
  const int64_t L = m.L, Np = m.Np;
  const bool pairs = Np <= kPairMaxVecs * kLanes;
  for (int64_t c = 0; c < g;) {
    const bool pair = pairs && c + 1 < g;
    const int64_t row = b * m.dim + d0 + c;
    for_each_block(Np, [&](int64_t n0, int nv, bool acc) {
      dispatch_nv<Forward>(nv, pair, u + c * isd, delta + c * dsd, isd, ist, dsd, dst, A + (d0 + c) * Np + n0,
                           Bt + b * L * Np + n0, Ct + b * L * Np + n0, y + c * ysd, ysd, yst, L, Np, acc,
                           s0 ? s0 + row * Np + n0 : nullptr, sf ? sf + row * Np + n0 : nullptr);
    });
    c += pair ? 2 : 1;
  }
}

// The forward scan of eight channels, one per vector lane, over one block of at most kStepBlock steps t0 .. t0 + nt
// (the lane-parallel forward, used where the norm's groups are whole vectors of channels). Each step's u (x read in
// place: u + t * ist, lane j at j * isd), delta and y (the block's rows of the caller's buffers: Dl + j * rs,
// Y + j * rs for step t0 + j) are vectors, so y needs no sum across lanes. The kernel first forms every decay
// exp(delta A) of the block into `E` (kStepBlock * Np vectors of scratch), then runs the recurrence over the block
// kPass states at a time, which stay in registers: the decays do not depend on the states, so their polynomials
// run at the SIMD units' throughput, and the loop-carried path is one multiply-add per state and step. `an`: A log2 e
// of the eight channels, `s`: their states, carried from block to block; Np vectors each. bt, ct: the batch's
// rotated B, C ([L, Np]). NPC: Np when known at compile time (the loops unroll), else 0.
constexpr int kStepBlock = 16;
constexpr int kPass = 4;  // states per pass of the recurrence (measured: 4 beats 8 and 16, which GCC spills)

template <int NPC>
void scan_block_lanes(int64_t np, const vf* an, vf* s, vf* E, const float* u, int64_t isd, int64_t ist,
                      const float* bt, const float* ct, int64_t t0, int64_t nt, const float* Dl, float* Y,
                      int64_t rs) {
  const int64_t Np = NPC ? NPC : np;
  for (int64_t j = 0; j < nt; ++j) {
    const vf dv = load(Dl + j * rs);
    vf* e = E + j * Np;
#pragma GCC unroll 16
    for (int64_t n = 0; n < Np; ++n) e[n] = vexp2(dv * an[n]);
  }
  for (int64_t h = 0; h < Np; h += kPass) {
    vf sr[kPass];
    for (int i = 0; i < kPass; ++i) sr[i] = s[h + i];
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t t = t0 + j;
      const vf du = load(Dl + j * rs) * load_n(u + t * ist, isd, kLanes);
      const vf* e = E + j * Np + h;
      const float *bn = bt + t * Np + h, *cn = ct + t * Np + h;
      vf y0 = h ? load(Y + j * rs) : vf{}, y1 = vf{};  // two partial sums: a shorter dependent chain
      for (int i = 0; i < kPass; i += 2) {
        sr[i] = e[i] * sr[i] + du * bn[i];
        y0 += cn[i] * sr[i];
        sr[i + 1] = e[i + 1] * sr[i + 1] + du * bn[i + 1];
        y1 += cn[i + 1] * sr[i + 1];
      }
      store(Y + j * rs, y0 + y1);
    }
    for (int i = 0; i < kPass; ++i) s[h + i] = sr[i];
  }
}

// rsqrt(mean(y^2) + 1e-6) over the g values y[c * st]
inline float group_rsqrt(const float* y, int64_t st, int64_t g) {
  vf ss = vf{};
  for_lanes(g, [&](int64_t c, int n) {
    const vf v = load_n(y + c * st, st, n);
    ss += v * v;
  });
  return 1.0f / std::sqrt(hsum(ss) / static_cast<float>(g) + 1e-6f);
}

// The forward's epilogue for channels d0 .. d0 + g of batch b at the steps t0 .. t1, from their scan output Y
// (time-major, row t - t0 at (t - t0) * g): the group RMS norm, the D skip and the SiLU gate,
// out[b, t, d0 .. d0 + g) = (norm(y) + x * Dskip) * silu(z).
inline void gate_unit(const MixerShape& m, const float* x, const float* z, const float* Dskip, const float* Y,
                      float* out, int64_t b, int64_t d0, int64_t g, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* yr = Y + (t - t0) * g;
    const vf r = vf{} + (m.norm ? group_rsqrt(yr, 1, g) : 1.0f);
    const float* zr = z + b * m.zs.b + t * m.zs.t + d0 * m.zs.d;
    const float* xr = x + b * m.xs.b + t * m.xs.t + d0 * m.xs.d;
    float* o = out + (b * m.L + t) * m.dim + d0;
    for_lanes(g, [&](int64_t c, int n) {
      const vf zv = load_n(zr + c * m.zs.d, m.zs.d, n);
      const vf pre = load_n(yr + c, 1, n) * r + load_n(xr + c * m.xs.d, m.xs.d, n) * load_n(Dskip + d0 + c, 1, n);
      store_n(o + c, 1, pre * (zv * vsigmoid(zv)), n);
    });
  }
}

int64_t mixer_chunks(const MixerShape& m, int64_t units, int64_t threads) {
  const int64_t by_work = m.batch * m.dim * m.L * m.Np / kGrain;
  return std::max<int64_t>(1, std::min({threads, units, by_work}));
}

// ------------------------------------------------------------------------------------------------ causal conv
//
// out[b, t, d] = silu(bias[d] + sum_k w[d, k] x[b, t - (K - 1 - k), d]) for a channels-last x (any strides, d the
// fastest in the usual layout, so the inner loops run over contiguous channels), out [B, L, D] contiguous.

struct ConvShape {
  int64_t batch, L, dim, K;
  Strides xs;
};

// pre-activation of row (b, t) into pre[0 .. dim)
inline void conv_row(const ConvShape& c, const float* x, const float* wt, const float* bias, int64_t b, int64_t t,
                     float* pre) {
  for (int64_t d = 0; d < c.dim; ++d) pre[d] = bias ? bias[d] : 0.0f;
  for (int64_t k = 0; k < c.K; ++k) {
    const int64_t src = t - (c.K - 1 - k);
    if (src < 0) continue;
    const float* xr = x + b * c.xs.b + src * c.xs.t;
    const float* wk = wt + k * c.dim;  // wt: [K, D], the taps transposed so that one tap is contiguous
    if (c.xs.d == 1) {
      for (int64_t d = 0; d < c.dim; ++d) pre[d] += wk[d] * xr[d];
    } else {
      for (int64_t d = 0; d < c.dim; ++d) pre[d] += wk[d] * xr[d * c.xs.d];
    }
  }
}

// The position of time step t in the rotary angles, (offset + t) / rsf: also d theta / d freq.
inline float rotary_position(int64_t offset, int64_t t, float rsf) { return static_cast<float>(offset + t) / rsf; }

// The rotary angles of time step t, theta[k] = rotary_position * freq[k] in fp32 as torch forms them: their cos and
// sin into cs[0..N), sn[0..N).
inline void rotary_angles(const float* freq, int64_t N, int64_t offset, int64_t t, float rsf, float* cs, float* sn) {
  const float pos = rotary_position(offset, t, rsf);
  for (int64_t k = 0; k < N; ++k) {
    const float th = pos * freq[k];
    cs[k] = std::cos(th);
    sn[k] = std::sin(th);
  }
}

}  // namespace

extern "C" {

// Np: the number of states, padded by the caller to a multiple of 8 with A = B = C = 0 in the padding (those
// states stay 0 and add nothing). s0 / sf: the initial state to start from / the final state to write, [B, D, Np]
// contiguous, or null (zeros / not wanted). Returns 0 on success, 1 on an error inside the kernel (e.g. out of
// memory); never throws across the C boundary.
int defocus_scan_forward(const float* u, const float* delta, const float* A, const float* Bt, const float* Ct,
                         float* y, int64_t batch, int64_t dim, int64_t L, int64_t Np, int64_t threads,
                         const int64_t* in_strides, const int64_t* out_strides, const float* s0, float* sf) {
  if (Np % kLanes != 0) return 2;
  try {
    const Strides is{in_strides[0], in_strides[1], in_strides[2]}, ys{out_strides[0], out_strides[1], out_strides[2]};
    const int64_t rows = batch * dim;
    const int64_t chunks = num_chunks(rows, L, Np, threads);
    const bool pairs = Np <= kPairMaxVecs * kLanes;
    run_chunks(rows, chunks, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1;) {
        const int64_t b = r / dim, d = r % dim;
        const bool pair = pairs && r + 1 < r1 && d + 1 < dim;  // two channels of the same batch element
        const int64_t io = b * is.b + d * is.d, yo = b * ys.b + d * ys.d;
        for_each_block(Np, [&](int64_t n0, int nv, bool acc) {
          dispatch_nv<Forward>(nv, pair, u + io, delta + io, is.d, is.t, is.d, is.t, A + d * Np + n0,
                               Bt + b * L * Np + n0,
                               Ct + b * L * Np + n0, y + yo, ys.d, ys.t, L, Np, acc,
                               s0 ? s0 + r * Np + n0 : nullptr, sf ? sf + r * Np + n0 : nullptr);
        });
        r += pair ? 2 : 1;
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// grad_A, grad_Bt and grad_Ct are written (not accumulated into); s0 / gfin (the initial state, the gradient of the
// final state, [B, D, Np]) may be null, gs0 (the gradient of the initial state) too. Extra memory per chunk:
// 2 (L + 1) * 64 floats of states/decays, 2 L Np floats for each batch the chunk touches, and D Np floats.
int defocus_scan_backward(const float* u, const float* delta, const float* A, const float* Bt, const float* Ct,
                          const float* gy, float* gu, float* gdelta, float* gA, float* gBt, float* gCt,
                          int64_t batch, int64_t dim, int64_t L, int64_t Np, int64_t threads, const float* s0,
                          const float* gfin, float* gs0) {
  if (Np % kLanes != 0) return 2;
  try {
    const int64_t rows = batch * dim;
    const int64_t chunks = num_chunks(rows, L, Np, threads);
    const int64_t ln = L * Np;
    Partials part(chunks, rows, dim, batch, ln, dim * Np);
    run_chunks(rows, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
      part.init(c);
      std::vector<vf> work(2 * (L + 1) * kMaxVecs);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / dim, d = r % dim;
        float* pb = part.b_of(c, b);
        float* pc = part.c_of(c, b);
        for_each_block(Np, [&](int64_t n0, int nv, bool acc) {
          dispatch_nv<Backward>(nv, u + r * L, delta + r * L, A + d * Np + n0, Bt + b * ln + n0, Ct + b * ln + n0,
                                gy + r * L, gu + r * L, gdelta + r * L, part.dim[c].data() + d * Np + n0, pb + n0,
                                pc + n0, work.data(), L, Np, acc, s0 ? s0 + r * Np + n0 : nullptr,
                                gfin ? gfin + r * Np + n0 : nullptr, gs0 ? gs0 + r * Np + n0 : nullptr);
        });
      }
    });
    part.reduce(gBt, gCt, gA);
  } catch (...) {
    return 1;
  }
  return 0;
}

// threads for the rotation of `rows` rows: a row costs about four state updates per state (its loads, the sums)
int64_t rotate_chunks(int64_t rows, int64_t Np, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, rows * Np * 4 / kGrain));
}

// The angles depend on the step only: their cos and sin once per step into cos_t, sin_t [L, N] (left empty when freq
// is null), not once per row of every batch element (one libm call each costs more than the rotation itself).
void rotary_tables(const float* freq, int64_t N, int64_t offset, int64_t L, float rsf, int64_t chunks,
                   std::vector<float>& cos_t, std::vector<float>& sin_t) {
  if (!freq) return;
  cos_t.resize(L * N);
  sin_t.resize(L * N);
  run_chunks(L, std::min(chunks, L), [&](int64_t, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rotary_angles(freq, N, offset, t, rsf, &cos_t[t * N], &sin_t[t * N]);
  });
}

// B, C [batch, L, N] (element strides bs / cs: batch, time, state) rotated by theta[t, k] = ((offset + t) / rsf) *
// freq[k] (unrotated when freq is null) into time-major Bt, Ct [batch, L, Np], zero-padded past N. The rotation of
// a pair (2i, 2i + 1): out[2i] = v[2i] cos - v[2i+1] sin, out[2i+1] = v[2i+1] cos + v[2i] sin, each element with
// its own angle (the release's per-element layout). The angles are formed in fp32 as torch forms them.
int defocus_mixer_rotate(const float* B, const float* C, const int64_t* bs, const int64_t* cs, const float* freq,
                         int64_t batch, int64_t L, int64_t N, int64_t Np, int64_t offset, float rsf, float* Bt,
                         float* Ct, int64_t threads) {
  try {
    const int64_t rows = batch * L;
    const int64_t chunks = rotate_chunks(rows, Np, threads);
    std::vector<float> cos_t, sin_t;
    rotary_tables(freq, N, offset, L, rsf, chunks, cos_t, sin_t);
    run_chunks(rows, chunks, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / L, t = r % L;
        const float* br = B + b * bs[0] + t * bs[1];
        const float* cr = C + b * cs[0] + t * cs[1];
        float* ob = Bt + r * Np;
        float* oc = Ct + r * Np;
        if (!freq) {
          for (int64_t k = 0; k < N; ++k) {
            ob[k] = br[k * bs[2]];
            oc[k] = cr[k * cs[2]];
          }
        } else {
          const float *cs_ = &cos_t[t * N], *sn = &sin_t[t * N];
          for (int64_t k = 0; k + 1 < N; k += 2) {
            const float b0 = br[k * bs[2]], b1 = br[(k + 1) * bs[2]];
            const float c0 = cr[k * cs[2]], c1 = cr[(k + 1) * cs[2]];
            ob[k] = b0 * cs_[k] - b1 * sn[k];
            ob[k + 1] = b1 * cs_[k + 1] + b0 * sn[k + 1];
            oc[k] = c0 * cs_[k] - c1 * sn[k];
            oc[k + 1] = c1 * cs_[k + 1] + c0 * sn[k + 1];
          }
        }
        for (int64_t k = N; k < Np; ++k) ob[k] = oc[k] = 0.0f;
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// The backward of defocus_mixer_rotate: gB, gC [batch, L, N] contiguous from gBt, gCt [batch, L, Np], and (freq not
// null) gfreq [N] = sum over b, t of d theta / d freq (= (offset + t) / rsf) times the angle's gradient.
int defocus_mixer_rotate_backward(const float* B, const float* C, const int64_t* bs, const int64_t* cs,
                                  const float* freq, int64_t batch, int64_t L, int64_t N, int64_t Np, int64_t offset,
                                  float rsf, const float* gBt, const float* gCt, float* gB, float* gC, float* gfreq,
                                  int64_t threads) {
  try {
    const int64_t rows = batch * L;
    const int64_t chunks = rotate_chunks(rows, Np, threads);
    std::vector<float> cos_t, sin_t;
    rotary_tables(freq, N, offset, L, rsf, chunks, cos_t, sin_t);
    std::vector<std::vector<double>> part(chunks, std::vector<double>(N, 0.0));
    run_chunks(rows, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
      std::vector<double>& pf = part[c];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / L, t = r % L;
        const float* gb = gBt + r * Np;
        const float* gc = gCt + r * Np;
        float* ob = gB + r * N;
        float* oc = gC + r * N;
        if (!freq) {
          for (int64_t k = 0; k < N; ++k) {
            ob[k] = gb[k];
            oc[k] = gc[k];
          }
          continue;
        }
        const float* br = B + b * bs[0] + t * bs[1];
        const float* cr = C + b * cs[0] + t * cs[1];
        const float pos = rotary_position(offset, t, rsf);
        const float *cs_ = &cos_t[t * N], *sn = &sin_t[t * N];
        for (int64_t k = 0; k + 1 < N; k += 2) {
          const float b0 = br[k * bs[2]], b1 = br[(k + 1) * bs[2]];
          const float c0 = cr[k * cs[2]], c1 = cr[(k + 1) * cs[2]];
          ob[k] = gb[k] * cs_[k] + gb[k + 1] * sn[k + 1];
          ob[k + 1] = gb[k + 1] * cs_[k + 1] - gb[k] * sn[k];
          oc[k] = gc[k] * cs_[k] + gc[k + 1] * sn[k + 1];
          oc[k + 1] = gc[k + 1] * cs_[k + 1] - gc[k] * sn[k];
          // d out / d theta of each element, times its gradient
          const float t0 = gb[k] * (-b0 * sn[k] - b1 * cs_[k]) + gc[k] * (-c0 * sn[k] - c1 * cs_[k]);
          const float t1 = gb[k + 1] * (-b1 * sn[k + 1] + b0 * cs_[k + 1]) +
                           gc[k + 1] * (-c1 * sn[k + 1] + c0 * cs_[k + 1]);
          pf[k] += static_cast<double>(pos) * t0;
          pf[k + 1] += static_cast<double>(pos) * t1;
        }
      }
    });
    if (gfreq) {
      for (int64_t k = 0; k < N; ++k) {
        double acc = 0.0;
        for (int64_t c = 0; c < chunks; ++c) acc += part[c][k];
        gfreq[k] = static_cast<float>(acc);
      }
    }
  } catch (...) {
    return 1;
  }
  return 0;
}

// The lane-parallel forward (scan_block_lanes), for groups that are whole vectors of channels. A work unit is a span
// of whole groups of one batch element (the whole element unless that leaves a thread idle), walked in blocks of
// kStepBlock steps: per block and group, delta, the scan of the group's lane blocks and the epilogue, so that the
// rows of x, z, dt and out a block touches are read and written while they are in cache, in contiguous runs.
void mixer_forward_lanes(const MixerShape& m, const float* x, const float* z, const float* dt, const float* dt_bias,
                         const float* A, const float* Bt, const float* Ct, const float* Dskip, const float* s0,
                         float* out, float* sf, int64_t threads) {
  const int64_t groups = m.dim / m.group, L = m.L, Np = m.Np;
  const int64_t splits = std::min(groups, std::max<int64_t>(1, (2 * threads + m.batch - 1) / m.batch));
  const int64_t units = m.batch * splits, span_max = (groups + splits - 1) / splits * m.group;
  const auto scan = Np == 16 ? scan_block_lanes<16> : scan_block_lanes<0>;  // the released state count unrolled
  run_chunks(units, mixer_chunks(m, units, threads), [&](int64_t, int64_t u0, int64_t u1) {
    std::vector<float> rows(2 * kStepBlock * m.group);
    float *Dl = rows.data(), *Y = Dl + kStepBlock * m.group;
    std::vector<vf> work((2 * span_max / kLanes + kStepBlock) * Np);
    vf *an = work.data(), *s = an + span_max / kLanes * Np, *E = s + span_max / kLanes * Np;
    for (int64_t unit = u0; unit < u1; ++unit) {
      const int64_t b = unit / splits, k = unit % splits;
      const int64_t c0 = groups * k / splits * m.group, c1 = groups * (k + 1) / splits * m.group;
      for (int64_t d = c0; d < c1; ++d) {  // lane (d - c0) % 8 of vector (d - c0) / 8 * Np + n
        for (int64_t n = 0; n < Np; ++n) {
          const int64_t v = (d - c0) / kLanes * Np + n, lane = (d - c0) % kLanes;
          an[v][lane] = A[d * Np + n] * kLog2e;
          s[v][lane] = s0 ? s0[(b * m.dim + d) * Np + n] : 0.0f;
        }
      }
      const float *bt = Bt + b * L * Np, *ct = Ct + b * L * Np;
      for (int64_t t0 = 0; t0 < L; t0 += kStepBlock) {
        const int64_t t1 = std::min(L, t0 + kStepBlock);
        for (int64_t d0 = c0; d0 < c1; d0 += m.group) {
          gather_delta(m, dt, dt_bias, b, d0, m.group, Dl, nullptr, 1, m.group, t0, t1);
          for (int64_t c = 0; c < m.group; c += kLanes) {
            const int64_t v = (d0 + c - c0) / kLanes * Np;
            const float* u = x + b * m.xs.b + (d0 + c) * m.xs.d;
            scan(Np, an + v, s + v, E, u, m.xs.d, m.xs.t, bt, ct, t0, t1 - t0, Dl + c, Y + c, m.group);
          }
          gate_unit(m, x, z, Dskip, Y, out, b, d0, m.group, t0, t1);
        }
      }
      if (sf) {
        for (int64_t d = c0; d < c1; ++d)
          for (int64_t n = 0; n < Np; ++n)
            sf[(b * m.dim + d) * Np + n] = s[(d - c0) / kLanes * Np + n][(d - c0) % kLanes];
      }
    }
  });
}

// shape = (batch, dim, L, Np, group_norm_size, R); strides = the (b, t, d) strides of x, z and dt. dt_weight: null
// (dt is dt_proj's output [batch, L, D]) or dt_proj's weight transposed, [R, D] contiguous (dt is dt_proj's input
// [batch, L, R], strides (b, t, r), and the kernel applies the projection). A [D, Np] and the
// prepared Bt, Ct [batch, L, Np]; s0 / sf [batch, D, Np] or null. out [batch, L, D] contiguous. Groups that are
// whole vectors of channels take the lane-parallel forward; others (odd group sizes, few channels) scan each
// channel's states as vectors, one group of one batch element at a time, with time-major delta and y buffers.
int defocus_mixer_forward(const float* x, const float* z, const float* dt, const float* dt_weight,
                          const float* dt_bias, const float* A, const float* Bt, const float* Ct, const float* Dskip,
                          const float* s0, float* out, float* sf, const int64_t* shape, const int64_t* strides,
                          float delta_scale_factor, int64_t threads) {
  const MixerShape m = mixer_shape(shape, strides, delta_scale_factor, dt_weight);
  if (m.Np % kLanes != 0 || (m.norm && m.dim % m.group != 0)) return 2;
  try {
    if (m.group % kLanes == 0 && m.dim % m.group == 0) {
      mixer_forward_lanes(m, x, z, dt, dt_bias, A, Bt, Ct, Dskip, s0, out, sf, threads);
      return 0;
    }
    const int64_t per_batch = (m.dim + m.group - 1) / m.group, units = m.batch * per_batch, L = m.L;
    run_chunks(units, mixer_chunks(m, units, threads), [&](int64_t, int64_t u0, int64_t u1) {
      std::vector<float> buf(2 * m.group * L);
      float *Dl = buf.data(), *Y = Dl + m.group * L;
      for (int64_t unit = u0; unit < u1; ++unit) {
        const int64_t b = unit / per_batch, d0 = (unit % per_batch) * m.group;
        const int64_t g = std::min(m.group, m.dim - d0);
        gather_delta(m, dt, dt_bias, b, d0, g, Dl, nullptr, 1, g, 0, L);
        const float* xu = x + b * m.xs.b + d0 * m.xs.d;  // the scan reads u = x in place
        scan_unit(m, A, Bt, Ct, s0, sf, b, d0, g, xu, m.xs.d, m.xs.t, Dl, 1, g, Y, 1, g);
        gate_unit(m, x, z, Dskip, Y, out, b, d0, g, 0, L);
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// The backward of defocus_mixer_forward from gout [batch, L, D] contiguous (and gfin, the final state's gradient,
// or null): recomputes the unit's delta and scan output, goes back through the gate, the D skip and the norm to
// the scan output's gradient, then runs the scan's backward per channel (which recomputes the states). Writes gx,
// gz, gdt [batch, L, D] contiguous, gA [D, Np], gBt, gCt [batch, L, Np] (of the rotated B, C), gvec [2, D]
// (dt_bias, Dskip) and gs0 [batch, D, Np] when not null. The unit's buffers are channel-major ([g, L]), the layout
// of the scan's backward.
int defocus_mixer_backward(const float* x, const float* z, const float* dt, const float* dt_bias, const float* A,
                           const float* Bt, const float* Ct, const float* Dskip, const float* s0, const float* gout,
                           const float* gfin, float* gx, float* gz, float* gdt, float* gA, float* gBt, float* gCt,
                           float* gvec, float* gs0, const int64_t* shape, const int64_t* strides,
                           float delta_scale_factor, int64_t threads) {
  const MixerShape m = mixer_shape(shape, strides, delta_scale_factor);
  if (m.Np % kLanes != 0 || (m.norm && m.dim % m.group != 0)) return 2;
  try {
    const int64_t per_batch = (m.dim + m.group - 1) / m.group, units = m.batch * per_batch;
    const int64_t L = m.L, Np = m.Np, D = m.dim, ln = L * Np;
    const int64_t chunks = mixer_chunks(m, units, threads);
    // per-channel sums: grad A [D, Np], then grad dt_bias [D], grad Dskip [D]
    Partials part(chunks, units, per_batch, m.batch, ln, D * Np + 2 * D);
    run_chunks(units, chunks, [&](int64_t ch, int64_t u0, int64_t u1) {
      part.init(ch);
      float* pa = part.dim[ch].data();
      float* pbias = pa + D * Np;
      float* pd = pbias + D;
      const int64_t gl = m.group * L;
      std::vector<float> buf(6 * gl);
      float *U = buf.data(), *Dl = U + gl, *SG = Dl + gl, *Y = SG + gl, *GY = Y + gl, *GD = GY + gl;
      std::vector<float> gu(L);
      std::vector<vf> work(2 * (L + 1) * kMaxVecs);
      for (int64_t unit = u0; unit < u1; ++unit) {
        const int64_t b = unit / per_batch, d0 = (unit % per_batch) * m.group;
        const int64_t g = std::min(m.group, D - d0);
        for (int64_t t = 0; t < L; ++t) {
          const float* xr = x + b * m.xs.b + t * m.xs.t + d0 * m.xs.d;
          for (int64_t c = 0; c < g; ++c) U[c * L + t] = xr[c * m.xs.d];
        }
        gather_delta(m, dt, dt_bias, b, d0, g, Dl, SG, L, 1, 0, L);
        scan_unit(m, A, Bt, Ct, s0, nullptr, b, d0, g, U, L, 1, Dl, L, 1, Y, L, 1);
        // back through the gate, the skip and the norm: GY = d loss / d y; gz and the skip's part of gx written
        for (int64_t t = 0; t < L; ++t) {
          const float rs = m.norm ? group_rsqrt(Y + t, L, g) : 1.0f;
          const vf r = vf{} + rs;
          const float* zr = z + b * m.zs.b + t * m.zs.t + d0 * m.zs.d;
          const float* go = gout + (b * L + t) * D + d0;
          float* gxr = gx + (b * L + t) * D + d0;
          float* gzr = gz + (b * L + t) * D + d0;
          vf dot = vf{};  // sum over the group of gn * n
          for_lanes(g, [&](int64_t c, int n) {
            const vf zv = load_n(zr + c * m.zs.d, m.zs.d, n), sg = vsigmoid(zv);
            const vf u = load_n(U + c * L + t, L, n), nv = load_n(Y + c * L + t, L, n) * r;
            const vf dk = load_n(Dskip + d0 + c, 1, n), gov = load_n(go + c, 1, n);
            store_n(gzr + c, 1, gov * (nv + u * dk) * (sg * (1.0f + zv * (1.0f - sg))), n);
            const vf gn = gov * (zv * sg);
            store_n(pd + d0 + c, 1, load_n(pd + d0 + c, 1, n) + gn * u, n);
            store_n(gxr + c, 1, gn * dk, n);
            store_n(GY + c * L + t, L, gn, n);
            dot += gn * nv;
          });
          if (m.norm) {
            const vf mean = vf{} + hsum(dot) / static_cast<float>(g);
            for_lanes(g, [&](int64_t c, int n) {
              const vf gn = load_n(GY + c * L + t, L, n), nv = load_n(Y + c * L + t, L, n) * r;
              store_n(GY + c * L + t, L, r * (gn - nv * mean), n);
            });
          }
        }
        float* pb = part.b_of(ch, b);
        float* pc = part.c_of(ch, b);
        for (int64_t c = 0; c < g; ++c) {
          const int64_t d = d0 + c, row = b * D + d;
          for_each_block(Np, [&](int64_t n0, int nv, bool acc) {
            dispatch_nv<Backward>(nv, U + c * L, Dl + c * L, A + d * Np + n0, Bt + b * ln + n0, Ct + b * ln + n0,
                                  GY + c * L, gu.data(), GD + c * L, pa + d * Np + n0, pb + n0, pc + n0,
                                  work.data(), L, Np, acc, s0 ? s0 + row * Np + n0 : nullptr,
                                  gfin ? gfin + row * Np + n0 : nullptr, gs0 ? gs0 + row * Np + n0 : nullptr);
          });
          for (int64_t t = 0; t < L; ++t) gx[(b * L + t) * D + d] += gu[t];
        }
        for (int64_t t = 0; t < L; ++t) {
          float* gdr = gdt + (b * L + t) * D + d0;
          for (int64_t c = 0; c < g; ++c) {
            const float v = GD[c * L + t] * SG[c * L + t];
            gdr[c] = v;
            pbias[d0 + c] += v;
          }
        }
      }
    });
    std::vector<float> sums(D * Np + 2 * D);
    part.reduce(gBt, gCt, sums.data());
    std::copy(sums.begin(), sums.begin() + D * Np, gA);
    std::copy(sums.begin() + D * Np, sums.end(), gvec);
  } catch (...) {
    return 1;
  }
  return 0;
}

// shape = (batch, L, dim, K), xstrides = x's (b, t, d) strides; wt [K, D] (the filter taps transposed); bias [D] or
// null; out [batch, L, D] contiguous.
int defocus_conv_forward(const float* x, const float* wt, const float* bias, float* out, const int64_t* shape,
                         const int64_t* xstrides, int64_t threads) {
  try {
    const ConvShape c{shape[0], shape[1], shape[2], shape[3], {xstrides[0], xstrides[2], xstrides[1]}};
    const int64_t rows = c.batch * c.L;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, rows * c.dim * c.K / kGrain));
    run_chunks(rows, chunks, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* o = out + r * c.dim;
        conv_row(c, x, wt, bias, r / c.L, r % c.L, o);
        for_lanes(c.dim, [&](int64_t d, int n) {
          const vf v = load_n(o + d, 1, n);
          store_n(o + d, 1, v * vsigmoid(v), n);
        });
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// The backward from gout [batch, L, D] contiguous: recomputes the pre-activation, gx [batch, L, D] contiguous,
// gwt [K, D] and gbias [D] (null when there is no bias).
int defocus_conv_backward(const float* x, const float* wt, const float* bias, const float* gout, float* gx,
                          float* gwt, float* gbias, const int64_t* shape, const int64_t* xstrides, int64_t threads) {
  try {
    const ConvShape c{shape[0], shape[1], shape[2], shape[3], {xstrides[0], xstrides[2], xstrides[1]}};
    const int64_t rows = c.batch * c.L, D = c.dim, K = c.K;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, rows * D * K / kGrain));
    std::fill(gx, gx + rows * D, 0.0f);
    // gx of row t gathers from rows t .. t + K - 1, which another chunk may own: each chunk writes the rows it
    // owns by gathering (no scatter), after computing the pre-activation gradient of all rows first
    std::vector<float> gpre(rows * D);
    std::vector<std::vector<float>> part(chunks, std::vector<float>((K + 1) * D, 0.0f));
    run_chunks(rows, chunks, [&](int64_t ch, int64_t r0, int64_t r1) {
      std::vector<float>& p = part[ch];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / c.L, t = r % c.L;
        float* gp = gpre.data() + r * D;
        conv_row(c, x, wt, bias, b, t, gp);
        const float* go = gout + r * D;
        for_lanes(D, [&](int64_t d, int n) {
          const vf v = load_n(gp + d, 1, n), sg = vsigmoid(v);
          const vf gv = load_n(go + d, 1, n) * sg * (1.0f + v * (1.0f - sg));
          store_n(gp + d, 1, gv, n);
          store_n(p.data() + K * D + d, 1, load_n(p.data() + K * D + d, 1, n) + gv, n);
        });
        for (int64_t k = 0; k < K; ++k) {
          const int64_t src = t - (K - 1 - k);
          if (src < 0) continue;
          const float* xr = x + b * c.xs.b + src * c.xs.t;
          float* pk = p.data() + k * D;
          for (int64_t d = 0; d < D; ++d) pk[d] += gp[d] * xr[d * c.xs.d];
        }
      }
    });
    run_chunks(rows, chunks, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % c.L;
        float* o = gx + r * D;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t dst = t + (K - 1 - k);  // the output row that tap k of this input row feeds
          if (dst >= c.L) continue;
          const float* gp = gpre.data() + (r + (K - 1 - k)) * D;
          const float* wk = wt + k * D;
          for (int64_t d = 0; d < D; ++d) o[d] += wk[d] * gp[d];
        }
      }
    });
    std::fill(gwt, gwt + K * D, 0.0f);
    if (gbias) std::fill(gbias, gbias + D, 0.0f);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const float* p = part[ch].data();
      for (int64_t i = 0; i < K * D; ++i) gwt[i] += p[i];
      if (gbias)
        for (int64_t d = 0; d < D; ++d) gbias[d] += p[K * D + d];
    }
  } catch (...) {
    return 1;
  }
  return 0;
}

// Lets the loader check that the library it opened matches this source's calling convention.
int defocus_scan_abi_version() { return 5; }

}  // extern "C"
