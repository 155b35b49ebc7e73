// Native CPU kernels for the TT embedding (see kernels/tt.py for the maths and the torch reference).
//
// Why a native kernel: the torch path gathers one (r_{k-1}, q_k r_k) core slice per tree node and
// multiplies it with a tiny batched matmul, so it spends most of its time copying core slices and in
// per-matrix overheads. Here every level of the prefix tree is processed core slice by core slice:
// the nodes whose digit is j all multiply the same slice G_k[j], which stays in L1 while their rows
// stream through a register-blocked micro-kernel. Nothing is gathered: the micro-kernels read the
// parents' partial products and write the children's in place through row pointers.
//
// Layouts (row-major, as in kernels/tt.py): core k is (p_k, K = r_{k-1}, N = q_k r_k); the level-k
// partial of node t is (Q_{k-1}, N) = (Q_k, r_k) where Q_k = q_1 ... q_k. Level 0 is treated like any
// other level with a virtual parent partial "1" (Q_{-1} = K = 1).
//
// Built ahead of time (setup.py, at install) as torch custom ops in the namespace `recsys_tt`, once per
// CPU level (x86-64 baseline, AVX2, AVX-512: kernels/tt_native.py loads the one the CPU runs); the
// 64-byte GCC vectors below become one AVX-512 instruction or are split by the compiler for the others.
//
// Threads: ATen's pool (at::parallel_for), with a shared task counter so that uneven groups (skewed
// traffic) still balance. Results do not depend on the number of threads: every output element is
// written by one task, in a fixed summation order. On a shared CPU what matters is that OpenMP's idle
// threads sleep instead of spinning (recsys/openmp.py). A pool of our own, whose caller never waits for
// a helper that has not started, was tried: with passive waits it was no faster beside a busy process
// and ~20% slower idle at 2 threads (3 interleaved runs each), so ATen's stays.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// ---- SIMD vectors via GCC vector extensions: 64-byte vectors (AVX-512 where available, otherwise
// the compiler splits them into narrower instructions).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename V>
inline V loadu(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void storeu(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
inline V splat(T s) {
  V v = {};
  return v + s;
}

// ---- dynamic scheduling over ATen's thread pool -------------------------------------------------
template <class F>
void parallel_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
  });
}

// ---- micro-kernels ----------------------------------------------------------------------------
// C_i[n0 : n0 + NV W] (+)= sum_kk A_i[kk] B[kk, n0 : n0 + NV W] for MR rows with their own pointers.
template <typename T, int MR, int NV, bool ACC>
inline void rows_tile(const T* const* a, T* const* c, const T* b, int64_t ldb, int64_t kdim, int64_t n0) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  for (int64_t kk = 0; kk < kdim; ++kk) {
    const T* br = b + kk * ldb + n0;
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = loadu<V>(br + j * W);
    for (int i = 0; i < MR; ++i) {
      const V av = splat<V>(a[i][kk]);
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) {
      T* p = c[i] + n0 + j * W;
      storeu(p, ACC ? loadu<V>(p) + acc[i][j] : acc[i][j]);
    }
}

// The columns [n0, n1) left over after whole vectors: plain loops.
template <typename T, int MR, bool ACC>
inline void rows_tail(const T* const* a, T* const* c, const T* b, int64_t ldb, int64_t kdim, int64_t n0,
                      int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    T acc[MR] = {};
    for (int64_t kk = 0; kk < kdim; ++kk) {
      const T bk = b[kk * ldb + n];
      for (int i = 0; i < MR; ++i) acc[i] += a[i][kk] * bk;
    }
    for (int i = 0; i < MR; ++i) c[i][n] = ACC ? c[i][n] + acc[i] : acc[i];
  }
}

template <typename T, int MR, bool ACC>
inline void rows_block(const T* const* a, T* const* c, const T* b, int64_t ldb, int64_t kdim, int64_t ncols) {
  constexpr int W = Vec<T>::W;
  int64_t n0 = 0;
  for (; n0 + 4 * W <= ncols; n0 += 4 * W) rows_tile<T, MR, 4, ACC>(a, c, b, ldb, kdim, n0);
  switch ((ncols - n0) / W) {
    case 3: rows_tile<T, MR, 3, ACC>(a, c, b, ldb, kdim, n0); n0 += 3 * W; break;
    case 2: rows_tile<T, MR, 2, ACC>(a, c, b, ldb, kdim, n0); n0 += 2 * W; break;
    case 1: rows_tile<T, MR, 1, ACC>(a, c, b, ldb, kdim, n0); n0 += W; break;
    default: break;
  }
  if (n0 < ncols) rows_tail<T, MR, ACC>(a, c, b, ldb, kdim, n0, ncols);
}

// C_r (+)= A_r @ B for m rows given by pointers: A_r has kdim entries, B is (kdim, ncols) with
// leading dimension ldb, C_r has ncols entries. One B shared by all rows, so it stays in cache.
template <typename T, bool ACC>
void rows_gemm(const T* const* a, T* const* c, int64_t m, const T* b, int64_t ldb, int64_t kdim, int64_t ncols) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) rows_block<T, 4, ACC>(a + r, c + r, b, ldb, kdim, ncols);
  switch (m - r) {
    case 3: rows_block<T, 3, ACC>(a + r, c + r, b, ldb, kdim, ncols); break;
    case 2: rows_block<T, 2, ACC>(a + r, c + r, b, ldb, kdim, ncols); break;
    case 1: rows_block<T, 1, ACC>(a + r, c + r, b, ldb, kdim, ncols); break;
    default: break;
  }
}

// ---- narrow right-hand sides (ncols below one vector: the last core, q_d r_d = q_d) -------------
// C_r = A_r @ B is then a set of short dot products along kdim; plain loops (also the fallback).
template <typename T>
void rows_dot(const T* const* a, T* const* c, int64_t m, const T* bt, int64_t kdim, int64_t ncols) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t n = 0; n < ncols; ++n) {
      T s = 0;
      for (int64_t kk = 0; kk < kdim; ++kk) s += a[r][kk] * bt[n * kdim + kk];
      c[r][n] = s;
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#define TT_HAVE_SHUFFLE 1
typedef int I16 __attribute__((vector_size(64)));
typedef Vec<float>::V F16;

// Lane i of the result = the sum of the 16 lanes of x[i]: a transposing reduction tree (31 shuffles,
// 15 adds for 16 sums) instead of 16 separate horizontal sums.
inline F16 sum16(const F16* x) {
  const I16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const I16 hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const I16 lo2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const I16 hi2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const I16 lo3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const I16 hi3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const I16 lo4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const I16 hi4 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  const I16 order = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  F16 y[8], z[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo1) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi1);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    z[i] = __builtin_shuffle(y[2 * i], y[2 * i + 1], lo2) + __builtin_shuffle(y[2 * i], y[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i)
    w[i] = __builtin_shuffle(z[2 * i], z[2 * i + 1], lo3) + __builtin_shuffle(z[2 * i], z[2 * i + 1], hi3);
  const F16 v = __builtin_shuffle(w[0], w[1], lo4) + __builtin_shuffle(w[0], w[1], hi4);
  return __builtin_shuffle(v, order);
}

// float, NC in {1, 2, 4, 8}: blocks of 16 / NC rows give 16 dot products, reduced together by sum16.
template <int NC>
void rows_dot_f32(const float* const* a, float* const* c, int64_t m, const float* bt, int64_t kdim) {
  constexpr int R = 16 / NC;
  const int64_t kvec = kdim / 16 * 16;
  int64_t r0 = 0;
  for (; r0 + R <= m; r0 += R) {
    F16 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = F16{};
    for (int64_t k0 = 0; k0 < kvec; k0 += 16) {
      F16 bv[NC];
#pragma GCC unroll 16
      for (int n = 0; n < NC; ++n) bv[n] = loadu<F16>(bt + n * kdim + k0);
#pragma GCC unroll 16
      for (int rr = 0; rr < R; ++rr) {
        const F16 av = loadu<F16>(a[r0 + rr] + k0);
#pragma GCC unroll 16
        for (int n = 0; n < NC; ++n) acc[rr * NC + n] += av * bv[n];
      }
    }
    float out[16];
    storeu(out, sum16(acc));
    for (int64_t kk = kvec; kk < kdim; ++kk)
      for (int rr = 0; rr < R; ++rr)
        for (int n = 0; n < NC; ++n) out[rr * NC + n] += a[r0 + rr][kk] * bt[n * kdim + kk];
    for (int rr = 0; rr < R; ++rr) std::memcpy(c[r0 + rr], out + rr * NC, NC * sizeof(float));
  }
  rows_dot<float>(a + r0, c + r0, m - r0, bt, kdim, NC);
}
#endif

template <typename T>
void rows_gemm_narrow(const T* const* a, T* const* c, int64_t m, const T* bt, int64_t kdim, int64_t ncols) {
#ifdef TT_HAVE_SHUFFLE
  if constexpr (std::is_same_v<T, float>) {
    if (kdim >= 16) {
      switch (ncols) {
        case 1: return rows_dot_f32<1>(a, c, m, bt, kdim);
        case 2: return rows_dot_f32<2>(a, c, m, bt, kdim);
        case 4: return rows_dot_f32<4>(a, c, m, bt, kdim);
        case 8: return rows_dot_f32<8>(a, c, m, bt, kdim);
        default: break;
      }
    }
  }
#endif
  rows_dot<T>(a, c, m, bt, kdim, ncols);
}

// Core gradient for narrow ncols: CgT[n, k] = sum_l G_l[n] A_l[k], vectorised along k (A_l's rows
// are contiguous), NB output columns at a time; written transposed into cg (kdim, ncols).
template <typename T, int NB, int NV, bool ACC>
inline void outer_narrow_tile(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t ncols, int64_t n0,
                              int64_t k0) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  V acc[NB][NV];
  for (int n = 0; n < NB; ++n)
    for (int j = 0; j < NV; ++j) acc[n][j] = V{};
  for (int64_t l = 0; l < rows; ++l) {
    V av[NV];
    for (int j = 0; j < NV; ++j) av[j] = loadu<V>(a[l] + k0 + j * W);
    for (int n = 0; n < NB; ++n) {
      const V gv = splat<V>(g[l][n0 + n]);
      for (int j = 0; j < NV; ++j) acc[n][j] += gv * av[j];
    }
  }
  T buf[NV * W];
  for (int n = 0; n < NB; ++n) {
    for (int j = 0; j < NV; ++j) storeu(buf + j * W, acc[n][j]);
    for (int e = 0; e < NV * W; ++e) {
      T& dst = cg[(k0 + e) * ncols + n0 + n];
      dst = ACC ? dst + buf[e] : buf[e];
    }
  }
}

template <typename T, int NB, bool ACC>
inline void outer_narrow_cols(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t kdim, int64_t ncols,
                              int64_t n0) {
  constexpr int W = Vec<T>::W;
  int64_t k0 = 0;
  for (; k0 + 2 * W <= kdim; k0 += 2 * W) outer_narrow_tile<T, NB, 2, ACC>(a, g, rows, cg, ncols, n0, k0);
  for (; k0 + W <= kdim; k0 += W) outer_narrow_tile<T, NB, 1, ACC>(a, g, rows, cg, ncols, n0, k0);
  for (; k0 < kdim; ++k0)
    for (int n = 0; n < NB; ++n) {
      T s = 0;
      for (int64_t l = 0; l < rows; ++l) s += a[l][k0] * g[l][n0 + n];
      T& dst = cg[k0 * ncols + n0 + n];
      dst = ACC ? dst + s : s;
    }
}

// Cg (kdim, ncols) (+)= sum_l A_l^T G_l for narrow ncols.
template <typename T, bool ACC>
void outer_gemm_narrow(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t kdim, int64_t ncols) {
  int64_t n0 = 0;
  for (; n0 + 4 <= ncols; n0 += 4) outer_narrow_cols<T, 4, ACC>(a, g, rows, cg, kdim, ncols, n0);
  switch (ncols - n0) {
    case 3: outer_narrow_cols<T, 3, ACC>(a, g, rows, cg, kdim, ncols, n0); break;
    case 2: outer_narrow_cols<T, 2, ACC>(a, g, rows, cg, kdim, ncols, n0); break;
    case 1: outer_narrow_cols<T, 1, ACC>(a, g, rows, cg, kdim, ncols, n0); break;
    default: break;
  }
}

// Cg[k0 : k0 + MR, n0 : n0 + NV W] = sum_l A_l[k0 + i] G_l[n0 + ...]: a core-gradient tile, the
// reduction running over all rows l of one digit group.
template <typename T, int MR, int NV>
inline void outer_tile(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t ldc, int64_t k0,
                       int64_t n0) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  for (int64_t l = 0; l < rows; ++l) {
    const T* al = a[l] + k0;
    const T* gl = g[l] + n0;
    V gv[NV];
    for (int j = 0; j < NV; ++j) gv[j] = loadu<V>(gl + j * W);
    for (int i = 0; i < MR; ++i) {
      const V av = splat<V>(al[i]);
      for (int j = 0; j < NV; ++j) acc[i][j] += av * gv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) storeu(cg + (k0 + i) * ldc + n0 + j * W, acc[i][j]);
}

template <typename T, int MR>
inline void outer_tail(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t ldc, int64_t k0,
                       int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    T acc[MR] = {};
    for (int64_t l = 0; l < rows; ++l) {
      const T gn = g[l][n];
      for (int i = 0; i < MR; ++i) acc[i] += a[l][k0 + i] * gn;
    }
    for (int i = 0; i < MR; ++i) cg[(k0 + i) * ldc + n] = acc[i];
  }
}

template <typename T, int MR>
inline void outer_rows(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t ncols, int64_t k0) {
  constexpr int W = Vec<T>::W;
  int64_t n0 = 0;
  for (; n0 + 4 * W <= ncols; n0 += 4 * W) outer_tile<T, MR, 4>(a, g, rows, cg, ncols, k0, n0);
  switch ((ncols - n0) / W) {
    case 3: outer_tile<T, MR, 3>(a, g, rows, cg, ncols, k0, n0); n0 += 3 * W; break;
    case 2: outer_tile<T, MR, 2>(a, g, rows, cg, ncols, k0, n0); n0 += 2 * W; break;
    case 1: outer_tile<T, MR, 1>(a, g, rows, cg, ncols, k0, n0); n0 += W; break;
    default: break;
  }
  if (n0 < ncols) outer_tail<T, MR>(a, g, rows, cg, ncols, k0, n0, ncols);
}

// Rows [k0, k1) of Cg (kdim, ncols) = sum_l A_l^T G_l.
template <typename T>
void outer_gemm(const T* const* a, const T* const* g, int64_t rows, T* cg, int64_t k0, int64_t k1, int64_t ncols) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) outer_rows<T, 4>(a, g, rows, cg, ncols, k);
  switch (k1 - k) {
    case 3: outer_rows<T, 3>(a, g, rows, cg, ncols, k); break;
    case 2: outer_rows<T, 2>(a, g, rows, cg, ncols, k); break;
    case 1: outer_rows<T, 1>(a, g, rows, cg, ncols, k); break;
    default: break;
  }
}

// ---- grouping ---------------------------------------------------------------------------------
// Nodes bucketed by a key in [0, nkeys) (counting sort, stable): order[start[key] : start[key + 1]].
struct Buckets {
  std::vector<int64_t> start, order, keys;  // keys: the non-empty keys, increasing
};

Buckets bucket_by(const int64_t* key, int64_t n, int64_t nkeys) {
  Buckets b;
  b.start.assign(nkeys + 1, 0);
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(key[t] >= 0 && key[t] < nkeys, "tt native: key ", key[t], " out of range [0, ", nkeys, ")");
    ++b.start[key[t] + 1];
  }
  for (int64_t j = 0; j < nkeys; ++j) {
    if (b.start[j + 1] > 0) b.keys.push_back(j);
    b.start[j + 1] += b.start[j];
  }
  b.order.resize(n);
  std::vector<int64_t> fill(b.start.begin(), b.start.end() - 1);
  for (int64_t t = 0; t < n; ++t) b.order[fill[key[t]]++] = t;
  return b;
}

// Work items: (bucket j, node range [lo, hi) inside it) with at most `chunk` nodes each.
struct Task {
  int64_t key, lo, hi;
};

std::vector<Task> chunked(const Buckets& b, int64_t chunk) {
  std::vector<Task> tasks;
  for (int64_t j : b.keys)
    for (int64_t lo = b.start[j]; lo < b.start[j + 1]; lo += chunk)
      tasks.push_back({j, lo, std::min(lo + chunk, b.start[j + 1])});
  return tasks;
}

// Nodes per task, so that a task has a few hundred rows of work: enough to amortise the core slice.
int64_t chunk_nodes(int64_t rows_per_node) { return std::max<int64_t>(1, 512 / std::max<int64_t>(1, rows_per_node)); }

struct Level {
  int64_t n, K, N, Qp;  // nodes, r_{k-1}, q_k r_k, Q_{k-1}
  const int64_t* digit;
  const int64_t* parent;  // nullptr at level 0
  int64_t p;              // digits in [0, p)
};

std::vector<Level> levels_of(const std::vector<at::Tensor>& cores, const std::vector<at::Tensor>& digits,
                             const std::vector<at::Tensor>& parents) {
  const int64_t d = static_cast<int64_t>(cores.size());
  TORCH_CHECK(d >= 1 && static_cast<int64_t>(digits.size()) == d && static_cast<int64_t>(parents.size()) == d,
              "tt native: need one digit and parent tensor per core");
  std::vector<Level> lv;
  for (int64_t k = 0; k < d; ++k) {
    const at::Tensor& c = cores[k];
    TORCH_CHECK(c.dim() == 3 && c.is_contiguous() && c.device().is_cpu(), "tt native: cores must be contiguous 3-D CPU");
    TORCH_CHECK(digits[k].scalar_type() == at::kLong && digits[k].is_contiguous(), "tt native: digits must be int64");
    TORCH_CHECK(parents[k].scalar_type() == at::kLong && parents[k].is_contiguous(), "tt native: parents must be int64");
    Level l{digits[k].numel(), c.size(1), c.size(2), 1, digits[k].data_ptr<int64_t>(),
            k > 0 ? parents[k].data_ptr<int64_t>() : nullptr, c.size(0)};
    TORCH_CHECK(k > 0 || l.K == 1, "tt native: the first core must have r_0 = 1");
    TORCH_CHECK(k == 0 || parents[k].numel() == l.n, "tt native: parent and digit lengths differ");
    lv.push_back(l);
  }
  return lv;
}

// Q_{k-1} of every level from the q shapes.
void set_q(std::vector<Level>& lv, const std::vector<int64_t>& q) {
  TORCH_CHECK(q.size() == lv.size(), "tt native: one q per core");
  int64_t qprev = 1;
  for (size_t k = 0; k < lv.size(); ++k) {
    lv[k].Qp = qprev;
    TORCH_CHECK(q[k] >= 1 && lv[k].N % q[k] == 0, "tt native: core ", k, " width not divisible by q");
    qprev *= q[k];
  }
}

// ---- forward ----------------------------------------------------------------------------------
// All slices of a core transposed, (p, N, K): for narrow cores (small), read slice by slice per node.
template <typename T>
std::vector<T> transposed_slices(const T* core, int64_t p, int64_t K, int64_t N) {
  std::vector<T> bt(p * K * N);
  for (int64_t j = 0; j < p; ++j)
    for (int64_t kk = 0; kk < K; ++kk)
      for (int64_t n = 0; n < N; ++n) bt[(j * N + n) * K + kk] = core[(j * K + kk) * N + n];
  return bt;
}

// Wide cores (N >= one vector): nodes grouped by digit, every group multiplying one core slice.
template <typename T>
void forward_by_digit(const Level& L, const T* core, const T* prev, T* out) {
  static const T one = T(1);
  const Buckets b = bucket_by(L.digit, L.n, L.p);
  const std::vector<Task> tasks = chunked(b, chunk_nodes(L.Qp));
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& tk = tasks[i];
    std::vector<const T*> a;
    std::vector<T*> c;
    for (int64_t s = tk.lo; s < tk.hi; ++s) {
      const int64_t t = b.order[s];
      const T* ap = L.parent ? prev + L.parent[t] * L.Qp * L.K : &one;
      for (int64_t q = 0; q < L.Qp; ++q) {
        a.push_back(ap + q * L.K);
        c.push_back(out + (t * L.Qp + q) * L.N);
      }
    }
    rows_gemm<T, false>(a.data(), c.data(), static_cast<int64_t>(a.size()), core + tk.key * L.K * L.N, L.N, L.K,
                        L.N);
  });
}

// Narrow cores (the last one: N = q_d): the parents' partials are the large operand here, so walk
// them in memory order, each once, against the (small, cached) transposed slices of its children.
template <typename T>
void forward_by_parent(const Level& L, const T* core, const T* prev, T* out, int64_t nprev) {
  const Buckets byp = bucket_by(L.parent, L.n, nprev);
  const std::vector<T> bt = transposed_slices(core, L.p, L.K, L.N);
  const int64_t slice = L.K * L.N, chunk = 16;
  parallel_tasks((nprev + chunk - 1) / chunk, [&](int64_t i) {
    std::vector<const T*> a(L.Qp);
    std::vector<T*> c(L.Qp);
    for (int64_t p = i * chunk; p < std::min(nprev, (i + 1) * chunk); ++p) {
      for (int64_t q = 0; q < L.Qp; ++q) a[q] = prev + (p * L.Qp + q) * L.K;
      for (int64_t s = byp.start[p]; s < byp.start[p + 1]; ++s) {
        const int64_t t = byp.order[s];
        for (int64_t q = 0; q < L.Qp; ++q) c[q] = out + (t * L.Qp + q) * L.N;
        rows_gemm_narrow<T>(a.data(), c.data(), L.Qp, bt.data() + L.digit[t] * slice, L.K, L.N);
      }
    }
  });
}

template <typename T>
bool is_narrow(const Level& L) {
  return L.parent != nullptr && L.N < Vec<T>::W;
}

std::vector<at::Tensor> forward(const std::vector<at::Tensor>& cores, const std::vector<at::Tensor>& digits,
                                const std::vector<at::Tensor>& parents, const std::vector<int64_t>& q) {
  std::vector<Level> lv = levels_of(cores, digits, parents);
  set_q(lv, q);
  std::vector<at::Tensor> partials;
  at::Tensor prev;
  for (size_t k = 0; k < lv.size(); ++k) {
    const Level& L = lv[k];
    at::Tensor out = at::empty({L.n, L.Qp * q[k], L.N / q[k]}, cores[k].options());
    AT_DISPATCH_FLOATING_TYPES(cores[k].scalar_type(), "tt_forward", [&] {
      const scalar_t* core = cores[k].data_ptr<scalar_t>();
      const scalar_t* pp = k ? prev.data_ptr<scalar_t>() : nullptr;
      if (is_narrow<scalar_t>(L))
        forward_by_parent<scalar_t>(L, core, pp, out.data_ptr<scalar_t>(), lv[k - 1].n);
      else
        forward_by_digit<scalar_t>(L, core, pp, out.data_ptr<scalar_t>());
    });
    partials.push_back(out);
    prev = out;
  }
  return partials;
}

// ---- backward ---------------------------------------------------------------------------------
// Gradient of core k on the digits present: rows (the digits, increasing), values (rows, K, N).
template <typename T>
void core_grad_level(const Level& L, const Buckets& b, const T* prev, const T* grad, T* values) {
  static const T one = T(1);
  // Tasks: (digit group, block of 8 core rows), so large groups still spread over threads.
  constexpr int W = Vec<T>::W;
  const bool narrow = L.N < W;
  const int64_t KB = narrow ? std::max<int64_t>(L.K, 1) : 8;
  const int64_t kblocks = (L.K + KB - 1) / KB;
  const int64_t ngroups = static_cast<int64_t>(b.keys.size());
  parallel_tasks(ngroups * kblocks, [&](int64_t i) {
    const int64_t g = i / kblocks, kb = i % kblocks;
    const int64_t j = b.keys[g];
    std::vector<const T*> a, gr;
    for (int64_t s = b.start[j]; s < b.start[j + 1]; ++s) {
      const int64_t t = b.order[s];
      const T* ap = L.parent ? prev + L.parent[t] * L.Qp * L.K : &one;
      for (int64_t q = 0; q < L.Qp; ++q) {
        a.push_back(ap + q * L.K);
        gr.push_back(grad + (t * L.Qp + q) * L.N);
      }
    }
    const int64_t rows = static_cast<int64_t>(a.size());
    if (narrow)
      outer_gemm_narrow<T, false>(a.data(), gr.data(), rows, values + g * L.K * L.N, L.K, L.N);
    else
      outer_gemm<T>(a.data(), gr.data(), rows, values + g * L.K * L.N, kb * KB, std::min(L.K, (kb + 1) * KB), L.N);
  });
}

// Gradient of the parents' partials (n_{k-1}, Qp, K) = sum over children of grad_child @ G_k[digit]^T.
template <typename T>
void parent_grad_level(const Level& L, const Buckets& b, const T* core, const T* grad, T* gprev, int64_t nprev) {
  const Buckets byp = bucket_by(L.parent, L.n, nprev);
  const int64_t slice = L.K * L.N;
  if (L.N <= L.Qp) {
    // Core slices smaller than a child's contribution: walk parents, each summing over its children
    // with the transposed slices of the whole core (small, so they stay in cache).
    const std::vector<T> bt = transposed_slices(core, L.p, L.K, L.N);
    const int64_t chunk = std::max<int64_t>(1, 64 / std::max<int64_t>(1, L.Qp / 4));
    parallel_tasks((nprev + chunk - 1) / chunk, [&](int64_t i) {
      std::vector<const T*> a(L.Qp);
      std::vector<T*> c(L.Qp);
      for (int64_t p = i * chunk; p < std::min(nprev, (i + 1) * chunk); ++p) {
        T* gp = gprev + p * L.Qp * L.K;
        std::fill(gp, gp + L.Qp * L.K, T(0));
        for (int64_t q = 0; q < L.Qp; ++q) c[q] = gp + q * L.K;
        for (int64_t s = byp.start[p]; s < byp.start[p + 1]; ++s) {
          const int64_t t = byp.order[s];
          for (int64_t q = 0; q < L.Qp; ++q) a[q] = grad + (t * L.Qp + q) * L.N;
          rows_gemm<T, true>(a.data(), c.data(), L.Qp, bt.data() + L.digit[t] * slice, L.K, L.N, L.K);
        }
      }
    });
    return;
  }
  // Large slices: one transposed slice per digit group; each child's contribution goes to a buffer
  // (no two threads write the same parent), then a per-parent sum over its children.
  // every element is written (rows_gemm without ACC) before it is read: no zero-fill of the buffer
  std::unique_ptr<T[]> contrib_buffer(new T[L.n * L.Qp * L.K]);
  T* contrib = contrib_buffer.get();
  const std::vector<Task> tasks = chunked(b, chunk_nodes(L.Qp));
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& tk = tasks[i];
    const T* s0 = core + tk.key * slice;
    std::vector<T> bt(slice);
    for (int64_t kk = 0; kk < L.K; ++kk)
      for (int64_t n = 0; n < L.N; ++n) bt[n * L.K + kk] = s0[kk * L.N + n];
    std::vector<const T*> a;
    std::vector<T*> c;
    for (int64_t s = tk.lo; s < tk.hi; ++s) {
      const int64_t t = b.order[s];
      for (int64_t q = 0; q < L.Qp; ++q) {
        a.push_back(grad + (t * L.Qp + q) * L.N);
        c.push_back(contrib + (t * L.Qp + q) * L.K);
      }
    }
    rows_gemm<T, false>(a.data(), c.data(), static_cast<int64_t>(a.size()), bt.data(), L.K, L.N, L.K);
  });
  const int64_t width = L.Qp * L.K;
  parallel_tasks((nprev + 63) / 64, [&](int64_t i) {
    for (int64_t p = i * 64; p < std::min(nprev, (i + 1) * 64); ++p) {
      T* gp = gprev + p * width;
      std::fill(gp, gp + width, T(0));
      for (int64_t s = byp.start[p]; s < byp.start[p + 1]; ++s) {
        const T* src = contrib + byp.order[s] * width;
#pragma omp simd
        for (int64_t e = 0; e < width; ++e) gp[e] += src[e];
      }
    }
  });
}

// Narrow cores: one pass over the parents in memory order computes both the parents' gradient and
// the core gradient. The core gradient is accumulated over the whole (small) core in a fixed number
// of parent ranges balanced by child count, then summed: the result is the same for any number of
// threads and any scheduling.
template <typename T>
void backward_by_parent(const Level& L, const Buckets& b, const T* core, const T* prev, const T* grad, T* values,
                        T* gprev, int64_t nprev) {
  const Buckets byp = bucket_by(L.parent, L.n, nprev);
  const std::vector<T> bt = transposed_slices(core, L.p, L.K, L.N);
  const int64_t slice = L.K * L.N;
  constexpr int64_t kRanges = 4;
  std::vector<int64_t> bounds(kRanges + 1, nprev);  // parent ranges with about L.n / kRanges children each
  bounds[0] = 0;
  for (int64_t r = 1, p = 0; r < kRanges; ++r) {
    while (p < nprev && byp.start[p] < r * L.n / kRanges) ++p;
    bounds[r] = p;
  }
  std::vector<T> dcore(kRanges * L.p * slice, T(0));
  parallel_tasks(kRanges, [&](int64_t r) {
    T* mine = dcore.data() + r * L.p * slice;
    std::vector<const T*> a(L.Qp), g(L.Qp);
    std::vector<T*> c(L.Qp);
    for (int64_t p = bounds[r]; p < bounds[r + 1]; ++p) {
      T* gp = gprev + p * L.Qp * L.K;
      std::fill(gp, gp + L.Qp * L.K, T(0));
      for (int64_t q = 0; q < L.Qp; ++q) {
        a[q] = prev + (p * L.Qp + q) * L.K;
        c[q] = gp + q * L.K;
      }
      for (int64_t s = byp.start[p]; s < byp.start[p + 1]; ++s) {
        const int64_t t = byp.order[s], j = L.digit[t];
        for (int64_t q = 0; q < L.Qp; ++q) g[q] = grad + (t * L.Qp + q) * L.N;
        rows_gemm<T, true>(g.data(), c.data(), L.Qp, bt.data() + j * slice, L.K, L.N, L.K);
        outer_gemm_narrow<T, true>(a.data(), g.data(), L.Qp, mine + j * slice, L.K, L.N);
      }
    }
  });
  const int64_t ng = static_cast<int64_t>(b.keys.size());
  parallel_tasks(ng, [&](int64_t gi) {
    T* dst = values + gi * slice;
    const int64_t j = b.keys[gi];
    std::copy(dcore.begin() + j * slice, dcore.begin() + (j + 1) * slice, dst);
    for (int64_t r = 1; r < kRanges; ++r) {
      const T* src = dcore.data() + (r * L.p + j) * slice;
      for (int64_t e = 0; e < slice; ++e) dst[e] += src[e];
    }
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward(
    const std::vector<at::Tensor>& cores, const std::vector<at::Tensor>& digits,
    const std::vector<at::Tensor>& parents, const std::vector<at::Tensor>& partials, const at::Tensor& grad_rows,
    const std::vector<int64_t>& q) {
  std::vector<Level> lv = levels_of(cores, digits, parents);
  set_q(lv, q);
  const int64_t d = static_cast<int64_t>(lv.size());
  TORCH_CHECK(static_cast<int64_t>(partials.size()) == d, "tt native: one partial per level");
  TORCH_CHECK(grad_rows.is_contiguous() && grad_rows.scalar_type() == cores[0].scalar_type(),
              "tt native: grad_rows must be contiguous, of the cores' dtype");
  std::vector<at::Tensor> rows(d), values(d);
  at::Tensor grad = grad_rows;
  for (int64_t k = d - 1; k >= 0; --k) {
    const Level& L = lv[k];
    TORCH_CHECK(grad.numel() == L.n * L.Qp * L.N, "tt native: gradient size mismatch at level ", k);
    const Buckets b = bucket_by(L.digit, L.n, L.p);
    const int64_t ng = static_cast<int64_t>(b.keys.size());
    rows[k] = at::tensor(b.keys, at::TensorOptions().dtype(at::kLong));
    values[k] = at::empty({ng, L.K, L.N}, cores[k].options());
    at::Tensor gprev;
    if (k > 0) {
      TORCH_CHECK(partials[k - 1].is_contiguous() && partials[k - 1].numel() == lv[k - 1].n * L.Qp * L.K,
                  "tt native: partial size mismatch at level ", k - 1);
      gprev = at::empty({lv[k - 1].n, L.Qp, L.K}, cores[k].options());
    }
    AT_DISPATCH_FLOATING_TYPES(cores[k].scalar_type(), "tt_backward", [&] {
      const scalar_t* prev = k > 0 ? partials[k - 1].data_ptr<scalar_t>() : nullptr;
      if (is_narrow<scalar_t>(L)) {
        backward_by_parent<scalar_t>(L, b, cores[k].data_ptr<scalar_t>(), prev, grad.data_ptr<scalar_t>(),
                                     values[k].data_ptr<scalar_t>(), gprev.data_ptr<scalar_t>(), lv[k - 1].n);
        return;
      }
      core_grad_level<scalar_t>(L, b, prev, grad.data_ptr<scalar_t>(), values[k].data_ptr<scalar_t>());
      if (k > 0)
        parent_grad_level<scalar_t>(L, b, cores[k].data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                    gprev.data_ptr<scalar_t>(), lv[k - 1].n);
    });
    grad = gprev;
  }
  return {rows, values};
}

// ---- fused optimizers on the touched core slices (rows distinct, so slices update in parallel) ---
void check_update(const at::Tensor& core, const at::Tensor& rows, const at::Tensor& values) {
  TORCH_CHECK(core.is_contiguous() && values.is_contiguous() && core.device().is_cpu(),
              "tt native: core and values must be contiguous CPU tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "tt native: rows must be int64");
  TORCH_CHECK(values.scalar_type() == core.scalar_type(), "tt native: values dtype differs from the core's");
  TORCH_CHECK(values.numel() == rows.numel() * (core.size(0) ? core.numel() / core.size(0) : 0),
              "tt native: values shape does not match rows x slice");
}

template <class F>
void for_rows(int64_t m, const F& f) {
  parallel_tasks((m + 15) / 16, [&](int64_t i) {
    for (int64_t r = i * 16; r < std::min(m, (i + 1) * 16); ++r) f(r);
  });
}

// The per-slice bodies live in templates because pragmas cannot sit inside AT_DISPATCH's macro argument.
template <typename T>
void sgd_slices(T* w, const int64_t* r, const T* g, int64_t m, int64_t s, T lr) {
  for_rows(m, [&](int64_t i) {
    T* wi = w + r[i] * s;
    const T* gi = g + i * s;
#pragma omp simd
    for (int64_t e = 0; e < s; ++e) wi[e] -= lr * gi[e];
  });
}

template <typename T>
void adagrad_slices(T* w, T* h, const int64_t* r, const T* g, int64_t m, int64_t s, T lr, T eps) {
  for_rows(m, [&](int64_t i) {
    T* wi = w + r[i] * s;
    T* hi = h + r[i] * s;
    const T* gi = g + i * s;
#pragma omp simd
    for (int64_t e = 0; e < s; ++e) {
      const T acc = hi[e] + gi[e] * gi[e];
      hi[e] = acc;
      wi[e] -= lr * gi[e] / (std::sqrt(acc) + eps);
    }
  });
}

template <typename T>
void rowwise_adagrad_slices(T* w, T* h, const int64_t* r, const T* g, int64_t m, int64_t s, T lr, T eps) {
  for_rows(m, [&](int64_t i) {
    T* wi = w + r[i] * s;
    const T* gi = g + i * s;
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t e = 0; e < s; ++e) sq += gi[e] * gi[e];
    const T acc = h[r[i]] + sq / static_cast<T>(s);
    h[r[i]] = acc;
    const T step = lr / (std::sqrt(acc) + eps);
#pragma omp simd
    for (int64_t e = 0; e < s; ++e) wi[e] -= step * gi[e];
  });
}

int64_t slice_size(const at::Tensor& core) { return core.size(0) ? core.numel() / core.size(0) : 0; }

void sgd(at::Tensor core, const at::Tensor& rows, const at::Tensor& values, double lr) {
  check_update(core, rows, values);
  AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "tt_sgd", [&] {
    sgd_slices<scalar_t>(core.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), values.data_ptr<scalar_t>(),
                         rows.numel(), slice_size(core), static_cast<scalar_t>(lr));
  });
}

void adagrad(at::Tensor core, at::Tensor state, const at::Tensor& rows, const at::Tensor& values, double lr,
             double eps) {
  check_update(core, rows, values);
  TORCH_CHECK(state.sizes() == core.sizes() && state.is_contiguous() && state.scalar_type() == core.scalar_type(),
              "tt native: adagrad state must match the core");
  AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "tt_adagrad", [&] {
    adagrad_slices<scalar_t>(core.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                             values.data_ptr<scalar_t>(), rows.numel(), slice_size(core), static_cast<scalar_t>(lr),
                             static_cast<scalar_t>(eps));
  });
}

void rowwise_adagrad(at::Tensor core, at::Tensor state, const at::Tensor& rows, const at::Tensor& values, double lr,
                     double eps) {
  check_update(core, rows, values);
  TORCH_CHECK(state.dim() == 1 && state.numel() == core.size(0) && state.is_contiguous() &&
                  state.scalar_type() == core.scalar_type(),
              "tt native: row-wise adagrad state must be (p_k,) of the core's dtype");
  AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "tt_rowwise_adagrad", [&] {
    rowwise_adagrad_slices<scalar_t>(core.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(),
                                     rows.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), rows.numel(),
                                     slice_size(core), static_cast<scalar_t>(lr), static_cast<scalar_t>(eps));
  });
}

}  // namespace

namespace {

std::vector<at::Tensor> forward_op(at::TensorList cores, at::TensorList digits, at::TensorList parents,
                                   at::IntArrayRef q_shapes) {
  return forward(cores.vec(), digits.vec(), parents.vec(), q_shapes.vec());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward_op(at::TensorList cores, at::TensorList digits,
                                                                         at::TensorList parents,
                                                                         at::TensorList partials,
                                                                         const at::Tensor& grad_rows,
                                                                         at::IntArrayRef q_shapes) {
  return backward(cores.vec(), digits.vec(), parents.vec(), partials.vec(), grad_rows, q_shapes.vec());
}

void sgd_op(at::Tensor core, const at::Tensor& rows, const at::Tensor& values, double lr) {
  sgd(core, rows, values, lr);
}

void adagrad_op(at::Tensor core, at::Tensor state, const at::Tensor& rows, const at::Tensor& values, double lr,
                double eps) {
  adagrad(core, state, rows, values, lr, eps);
}

void rowwise_adagrad_op(at::Tensor core, at::Tensor state, const at::Tensor& rows, const at::Tensor& values,
                        double lr, double eps) {
  rowwise_adagrad(core, state, rows, values, lr, eps);
}

}  // namespace

// Schemas: the cores and optimizer state are written in place by the fused updates (Tensor(a!)).
TORCH_LIBRARY(recsys_tt, m) {
  m.def("forward(Tensor[] cores, Tensor[] digits, Tensor[] parents, int[] q_shapes) -> Tensor[]");
  m.def(
      "backward(Tensor[] cores, Tensor[] digits, Tensor[] parents, Tensor[] partials, Tensor grad_rows, "
      "int[] q_shapes) -> (Tensor[], Tensor[])");
  m.def("sgd(Tensor(a!) core, Tensor rows, Tensor values, float lr) -> ()");
  m.def("adagrad(Tensor(a!) core, Tensor(b!) state, Tensor rows, Tensor values, float lr, float eps) -> ()");
  m.def("rowwise_adagrad(Tensor(a!) core, Tensor(b!) state, Tensor rows, Tensor values, float lr, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(recsys_tt, CPU, m) {
  m.impl("forward", &forward_op);
  m.impl("backward", &backward_op);
  m.impl("sgd", &sgd_op);
  m.impl("adagrad", &adagrad_op);
  m.impl("rowwise_adagrad", &rowwise_adagrad_op);
}
