// Selective scan (Mamba's S6 recurrence) for CPUs: forward and backward, fp32 accumulation.
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
// |f| <= 1/2: adding 1.5 * 2^23 + 127 rounds x and leaves k + 127 in the low mantissa bits, so one shift builds
// 2^k; 2^f = 1 + f q(f) with q of degree 5, fitted here for relative error (about 1e-7; exact at f = 0, so that
// decays close to 1 carry no bias over long memories). x is clamped to [-126, 127]: decays below 2^-126 come out
// as 2^-126 instead of 0 and products with them flush to 0 (the kernel runs with FTZ / DAZ set, see FlushDenormals).
inline vf vexp2(vf x) {
  const vf magic = vf{} + 12583039.0f;  // 1.5 * 2^23 + 127
  x = vmin(vmax(x, vf{} - 126.0f), vf{} + 127.0f);
  const vf t = x + magic;
  const vf f = x - (t - magic);
  vf q = vf{} + 1.326481724e-3f;
  q = q * f + 9.671512679e-3f;
  q = q * f + 5.550733433e-2f;
  q = q * f + 2.402224208e-1f;
  q = q * f + 6.931469778e-1f;
  const vf p = q * f + 1.0f;
  return p * (vf)((vu)t << 23);
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
// step 0 (row stride Np); u / delta / y point at row 0 (time stride ist / yst; row r at r * isd / r * ysd), A of
// row r at r * Np. The sums y_t are kept as vectors for 8 steps and reduced together (hsum8). accumulate: add to
// y (later state blocks) instead of writing it.
template <int NV, int R>
void forward_rows(const float* u, const float* delta, int64_t isd, int64_t ist, const float* a, const float* Bt,
                  const float* Ct, float* y, int64_t ysd, int64_t yst, int64_t L, int64_t Np, bool accumulate) {
  vf s[R][NV], av[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      s[r][v] = vf{};
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
        const float dt = delta[r * isd + t * ist], du = dt * u[r * isd + t * ist];
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
}

// Backward of one (b, d) row for one block of states: a forward sweep that stores this row's states and decays in
// `work` ((L + 1) * NV vectors each; state row 0 is s_{-1} = 0), then the reverse-time adjoint recurrence
//   g_t = grad_y_t C_t + exp(delta_{t+1} A) g_{t+1}          (g = dLoss/ds_t)
// which gives every gradient of step t from g_t, s_{t-1} and the decay of step t. grad_u / grad_delta of the row
// are written (first block) or accumulated; gA / gBt / gCt are accumulated.
template <int NV>
void backward_row(const float* u, const float* delta, const float* a, const float* Bt, const float* Ct,
                  const float* gy, float* gu, float* gdelta, float* gA, float* gBt, float* gCt, vf* work,
                  int64_t L, int64_t Np, bool accumulate) {
  vf* S = work;                 // S[(t + 1) * NV + v] = s_t
  vf* E = work + (L + 1) * NV;  // E[t * NV + v] = exp(delta_t A)
  vf av[NV], av2[NV], s[NV];
  for (int v = 0; v < NV; ++v) {
    av[v] = load(a + v * kLanes);
    av2[v] = av[v] * kLog2e;
    S[v] = s[v] = vf{};
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
  for (int v = 0; v < NV; ++v) g[v] = ga[v] = vf{};
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
  for (int v = 0; v < NV; ++v) store(gA + v * kLanes, load(gA + v * kLanes) + ga[v]);
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

}  // namespace

extern "C" {

// Np: the number of states, padded by the caller to a multiple of 8 with A = B = C = 0 in the padding (those
// states stay 0 and add nothing). Returns 0 on success, 1 on an error inside the kernel (e.g. out of memory);
// never throws across the C boundary.
int defocus_scan_forward(const float* u, const float* delta, const float* A, const float* Bt, const float* Ct,
                         float* y, int64_t batch, int64_t dim, int64_t L, int64_t Np, int64_t threads,
                         const int64_t* in_strides, const int64_t* out_strides) {
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
          dispatch_nv<Forward>(nv, pair, u + io, delta + io, is.d, is.t, A + d * Np + n0, Bt + b * L * Np + n0,
                               Ct + b * L * Np + n0, y + yo, ys.d, ys.t, L, Np, acc);
        });
        r += pair ? 2 : 1;
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// grad_A, grad_Bt and grad_Ct are written (not accumulated into). Each chunk of rows sums its contributions to
// grad_Bt / grad_Ct (sums over channels) and grad_A (a sum over batches) in buffers of its own, reduced afterwards
// in chunk order, so the result does not depend on thread timing. Extra memory per chunk: 2 (L + 1) * 64 floats
// of states/decays, 2 L Np floats for each batch the chunk touches, and D Np floats.
int defocus_scan_backward(const float* u, const float* delta, const float* A, const float* Bt, const float* Ct,
                          const float* gy, float* gu, float* gdelta, float* gA, float* gBt, float* gCt,
                          int64_t batch, int64_t dim, int64_t L, int64_t Np, int64_t threads) {
  if (Np % kLanes != 0) return 2;
  try {
    const int64_t rows = batch * dim;
    const int64_t chunks = num_chunks(rows, L, Np, threads);
    const int64_t ln = L * Np;
    std::vector<int64_t> first_b(chunks), last_b(chunks);
    for (int64_t c = 0; c < chunks; ++c) {
      first_b[c] = (rows * c / chunks) / dim;
      last_b[c] = (rows * (c + 1) / chunks - 1) / dim;
    }
    std::vector<std::vector<float>> part_bc(chunks), part_a(chunks);
    run_chunks(rows, chunks, [&](int64_t c, int64_t r0, int64_t r1) {
      const int64_t nbatch = last_b[c] - first_b[c] + 1;
      std::vector<float>& pbc = part_bc[c];
      pbc.assign(2 * nbatch * ln, 0.0f);  // [grad_Bt | grad_Ct] of batches first_b..last_b
      std::vector<float>& pa = part_a[c];
      pa.assign(dim * Np, 0.0f);
      std::vector<vf> work(2 * (L + 1) * kMaxVecs);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / dim, d = r % dim;
        float* pb = pbc.data() + (b - first_b[c]) * ln;
        float* pc = pb + nbatch * ln;
        for_each_block(Np, [&](int64_t n0, int nv, bool acc) {
          dispatch_nv<Backward>(nv, u + r * L, delta + r * L, A + d * Np + n0, Bt + b * ln + n0, Ct + b * ln + n0,
                                gy + r * L, gu + r * L, gdelta + r * L, pa.data() + d * Np + n0, pb + n0, pc + n0,
                                work.data(), L, Np, acc);
        });
      }
    });
    // reduce the per-chunk partial sums: grad_Bt / grad_Ct per batch, grad_A over all chunks
    const int64_t red_chunks = chunks == 1 ? 1 : std::min(batch, chunks);
    run_chunks(batch, red_chunks, [&](int64_t, int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* ob = gBt + b * ln;
        float* oc = gCt + b * ln;
        std::fill(ob, ob + ln, 0.0f);
        std::fill(oc, oc + ln, 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          if (b < first_b[c] || b > last_b[c]) continue;
          const float* pb = part_bc[c].data() + (b - first_b[c]) * ln;
          const float* pc = pb + (last_b[c] - first_b[c] + 1) * ln;
          for (int64_t i = 0; i < ln; ++i) ob[i] += pb[i];
          for (int64_t i = 0; i < ln; ++i) oc[i] += pc[i];
        }
      }
    });
    std::fill(gA, gA + dim * Np, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* pa = part_a[c].data();
      for (int64_t i = 0; i < dim * Np; ++i) gA[i] += pa[i];
    }
  } catch (...) {
    return 1;
  }
  return 0;
}

// Lets the loader check that the library it opened matches this source's calling convention.
int defocus_scan_abi_version() { return 3; }

}  // extern "C"
