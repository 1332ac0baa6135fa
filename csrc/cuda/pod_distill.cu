// CUDA kernels of lskd::pod_forward / lskd::pod_backward (Local POD, docs/MATHEMATICS.md section 2.1).
// The definitions are in csrc/pod_distill.cpp.
//
// Column "atoms": the boundaries j * kw_s (all scales s, j = 0..s) and W cut
// [0, W) into intervals; every width-pool segment of every scale is a union of
// whole atoms, and so are the columns that take part in a scale ([0, W_s)).
// Row atoms likewise with the j * kh_s. The kernels work on atom sums:
//
// pod_forward (2 launches)
//   With square, z is computed as (x_a - x_b) * (x_a + x_b): equal to
//   x_a^2 - x_b^2, exactly 0 for equal inputs (no FMA-contraction residue).
//   1. pod_fwd_kernel, one block per (n, c) plane (128 threads for planes of
//      at most 2048 elements, 256 otherwise). The plane is processed in
//      chunks of R rows staged in shared memory as z (odd row pitch, so that a
//      warp reading one column of 32 rows hits 32 banks). Per chunk:
//        B1  RA[r][ca] = sum of z over column atom ca of row r;
//        B2  CA[ra][q] += sum of z over the chunk's rows of row atom ra;
//        C   width-pool emb values of the chunk's rows = sums of RA entries.
//      After the last chunk, the height-pool emb values are sums of CA entries.
//      Each thread squares the emb values it writes; a block reduction gives
//      plane_sq[n, c]. Global traffic: a and b read once (vectorised and
//      coalesced for NCHW-contiguous inputs), emb written once.
//   2. sum_sqrt_kernel: dist[n] = sqrt(sum_c plane_sq[n, c]) in a fixed order.
// pod_backward (1 launch)
//   pod_bwd_kernel, one block per plane: from emb[n, c, :] it builds
//   A[r][ca] = sum_s emb_w/kw and B[ra][q] = sum_s emb_h/kh in shared memory,
//   then streams the plane: grad = (A[r][ca(q)] + B[ra(r)][q]) * coef * dz/da.
//   Each thread's first vector of a is loaded before the tables are built.
//   Global traffic: a read once, grad written once, emb read once.
// Shapes whose atom tables or rows do not fit (more than 64 atoms, very wide
// or very tall maps) take simple generic kernels (direct sums from global
// memory); they are correct for any size, not fast.
#include "device_utils.cuh"

#include <algorithm>
#include <tuple>
#include <vector>

namespace lskd {
namespace cuda {
namespace {

constexpr int kMaxAtoms = 64;
constexpr int kMaxSegs = 64;

// Geometry of the Local POD embedding for one (H, W, scales), built on the
// host and passed by value (kernel parameter space).
struct PodTables {
  int H, W, ns;
  int n_ca, n_ra, n_seg;  // column atoms, row atoms, segments (width = height count)
  int s[kMaxScales], kh[kMaxScales], kw[kMaxScales], Hs[kMaxScales], Ws[kMaxScales], off[kMaxScales];
  int cstart[kMaxAtoms + 1];  // column atom ca = [cstart[ca], cstart[ca + 1])
  int rstart[kMaxAtoms + 1];  // row atom ra = [rstart[ra], rstart[ra + 1])
  // Width segment g (scale si, j): emb[base + r] for r < lim(= Hs), divisor kw, atoms [a0, a1).
  int ws_base[kMaxSegs], ws_lim[kMaxSegs], ws_div[kMaxSegs], ws_a0[kMaxSegs], ws_a1[kMaxSegs];
  // Height segment g (scale si, i): emb[base + q] for q < lim(= Ws), divisor kh, atoms [a0, a1).
  int hs_base[kMaxSegs], hs_lim[kMaxSegs], hs_div[kMaxSegs], hs_a0[kMaxSegs], hs_a1[kMaxSegs];
};
static_assert(sizeof(PodTables) < 3800, "PodTables must fit the kernel parameter space");

// Fills the scale fields (always) and the atom/segment tables; returns false
// when the atoms or segments exceed the table sizes (generic kernels then).
bool build_pod_tables(int64_t H, int64_t W, const PodLayout& lay, PodTables& T) {
  T = PodTables{};
  T.H = static_cast<int>(H);
  T.W = static_cast<int>(W);
  T.ns = lay.num_scales;
  int segs = 0;
  for (int i = 0; i < lay.num_scales; ++i) {
    T.s[i] = static_cast<int>(lay.s[i]);
    T.kh[i] = static_cast<int>(lay.kh[i]);
    T.kw[i] = static_cast<int>(lay.kw[i]);
    T.Hs[i] = static_cast<int>(lay.Hs[i]);
    T.Ws[i] = static_cast<int>(lay.Ws[i]);
    T.off[i] = static_cast<int>(lay.off[i]);
    segs += T.s[i];
  }
  std::vector<int> cb{0, T.W}, rb{0, T.H};
  for (int i = 0; i < T.ns; ++i) {
    for (int j = 0; j <= T.s[i]; ++j) {
      cb.push_back(j * T.kw[i]);
      rb.push_back(j * T.kh[i]);
    }
  }
  std::sort(cb.begin(), cb.end());
  cb.erase(std::unique(cb.begin(), cb.end()), cb.end());
  std::sort(rb.begin(), rb.end());
  rb.erase(std::unique(rb.begin(), rb.end()), rb.end());
  const int n_ca = static_cast<int>(cb.size()) - 1;
  const int n_ra = static_cast<int>(rb.size()) - 1;
  if (n_ca > kMaxAtoms || n_ra > kMaxAtoms || segs > kMaxSegs) return false;
  T.n_ca = n_ca;
  T.n_ra = n_ra;
  T.n_seg = segs;
  for (int i = 0; i <= n_ca; ++i) T.cstart[i] = cb[i];
  for (int i = 0; i <= n_ra; ++i) T.rstart[i] = rb[i];
  auto cidx = [&](int v) { return static_cast<int>(std::lower_bound(cb.begin(), cb.end(), v) - cb.begin()); };
  auto ridx = [&](int v) { return static_cast<int>(std::lower_bound(rb.begin(), rb.end(), v) - rb.begin()); };
  int g = 0;
  for (int i = 0; i < T.ns; ++i) {
    for (int j = 0; j < T.s[i]; ++j, ++g) {
      T.ws_base[g] = T.off[i] + j * T.Hs[i];
      T.ws_lim[g] = T.Hs[i];
      T.ws_div[g] = T.kw[i];
      T.ws_a0[g] = cidx(j * T.kw[i]);
      T.ws_a1[g] = cidx((j + 1) * T.kw[i]);
      T.hs_base[g] = T.off[i] + T.s[i] * T.Hs[i] + j * T.Ws[i];
      T.hs_lim[g] = T.Ws[i];
      T.hs_div[g] = T.kh[i];
      T.hs_a0[g] = ridx(j * T.kh[i]);
      T.hs_a1[g] = ridx((j + 1) * T.kh[i]);
    }
  }
  return true;
}

// ---------------------------------------------------------------------------
// Forward: phases B-D of the fast kernel.

// Phases B and C of one chunk (zs holds z of the rows [r0, r0 + Rc)): the atom
// sums (RA of the chunk's rows; CA accumulated over chunks), a barrier, then the
// width-pool values of the chunk's rows written to pe; the squares of the values
// this thread writes are added to sq.
template <typename acc>
__device__ __forceinline__ void pod_chunk_values(const PodTables& T, const acc* zs, int zpitch, acc* RA, int rapitch,
                                                 acc* CA, int r0, int Rc, int& ra_first, acc* pe, int tid, int nt,
                                                 acc& sq) {
  const int W = T.W;
  // ---- B: atom sums ----
  while (T.rstart[ra_first + 1] <= r0) ++ra_first;
  int ra_last = ra_first;
  while (T.rstart[ra_last + 1] < r0 + Rc) ++ra_last;
  const int nb1 = T.n_ca * Rc;
  const int ntask = nb1 + (ra_last - ra_first + 1) * W;
  for (int t = tid; t < ntask; t += nt) {
    if (t < nb1) {
      const int ca = t / Rc;
      const int r = t - ca * Rc;
      const acc* row = zs + r * zpitch;
      acc s = acc(0);
      const int q1 = T.cstart[ca + 1];
      for (int q = T.cstart[ca]; q < q1; ++q) s += row[q];
      RA[r * rapitch + ca] = s;
    } else {
      const int t2 = t - nb1;
      const int dra = t2 / W;
      const int q = t2 - dra * W;
      const int ra = ra_first + dra;
      const int lo = max(T.rstart[ra], r0) - r0;
      const int hi = min(T.rstart[ra + 1], r0 + Rc) - r0;
      acc s = acc(0);
      for (int r = lo; r < hi; ++r) s += zs[r * zpitch + q];
      CA[ra * W + q] += s;
    }
  }
  __syncthreads();
  // ---- C: width-pool values of the chunk's rows ----
  const int nct = T.n_seg * Rc;
  for (int t = tid; t < nct; t += nt) {
    const int g = t / Rc;
    const int r = t - g * Rc;
    const int row = r0 + r;
    if (row < T.ws_lim[g]) {
      acc s = acc(0);
      const int a1 = T.ws_a1[g];
      for (int ca = T.ws_a0[g]; ca < a1; ++ca) s += RA[r * rapitch + ca];
      const acc v = s / static_cast<acc>(T.ws_div[g]);
      pe[T.ws_base[g] + row] = v;
      sq += v * v;
    }
  }
}

// Phase D (height-pool values), after the last chunk and a barrier: the height-pool values from CA,
// written to pe; the squares of the values this thread writes are added to sq.
template <typename acc>
__device__ __forceinline__ void pod_height_values(const PodTables& T, const acc* CA, acc* pe, int tid, int nt,
                                                  acc& sq) {
  const int W = T.W;
  const int ndt = T.n_seg * W;
  for (int t = tid; t < ndt; t += nt) {
    const int g = t / W;
    const int q = t - g * W;
    if (q < T.hs_lim[g]) {
      acc s = acc(0);
      const int a1 = T.hs_a1[g];
      for (int ra = T.hs_a0[g]; ra < a1; ++ra) s += CA[ra * W + q];
      const acc v = s / static_cast<acc>(T.hs_div[g]);
      pe[T.hs_base[g] + q] = v;
      sq += v * v;
    }
  }
}

// z of element k of a loaded vector at (row, q + k) of a plane: masks applied to
// both values, then the difference (square: (va - vb) * (va + vb)).
template <typename acc>
__device__ __forceinline__ acc pod_z(acc va, acc vb, const acc* pm, acc ncv, int W, int row, int qk, bool square) {
  if (pm != nullptr) {
    const acc m = pm[static_cast<int64_t>(row) * W + qk];
    va *= m;
    vb *= m;
  }
  va *= ncv;
  vb *= ncv;
  return square ? (va - vb) * (va + vb) : va - vb;
}

// Vectors per tensor in flight per thread in the load phase.
template <int V>
constexpr int pod_unroll() {
  return V >= 8 ? 1 : 2;
}

// ---------------------------------------------------------------------------
// Forward, fast path.
//
// V > 1: a and b NCHW-contiguous, 16-byte aligned, W % V == 0 (vector loads).
// V == 1: any strides.
// Shared memory: zs [R][zpitch], RA [R][rapitch], CA [n_ra][W] (acc).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads, 4)
    pod_fwd_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, Strides4 sa, Strides4 sb,
                   const acc_t<scalar_t>* __restrict__ smask, const acc_t<scalar_t>* __restrict__ cmask, int C,
                   bool square, PodTables T, int R, int zpitch, int rapitch, acc_t<scalar_t>* __restrict__ emb,
                   int64_t L, acc_t<scalar_t>* __restrict__ plane_sq) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* zs = reinterpret_cast<acc*>(smem_raw);
  acc* RA = zs + R * zpitch;
  acc* CA = RA + R * rapitch;

  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C;
  const int64_t c = plane - n * C;
  const int H = T.H, W = T.W;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;  // 128 or 256 (a multiple of 32)
  const scalar_t* pa = a + n * sa.n + c * sa.c;
  const scalar_t* pb = b + n * sb.n + c * sb.c;
  const acc* pm = smask != nullptr ? smask + n * H * W : nullptr;
  const acc ncv = cmask != nullptr ? cmask[plane] : acc(1);
  acc* pe = emb + plane * L;

  for (int i = tid; i < T.n_ra * W; i += nt) CA[i] = acc(0);

  acc sq = acc(0);
  int ra_first = 0;
  constexpr int U = pod_unroll<V>();
  for (int r0 = 0; r0 < H; r0 += R) {
    const int Rc = min(R, H - r0);
    // ---- A: stage z of rows [r0, r0 + Rc) ----
    {
      const int nel = Rc * W;
      PlaneWalker wk;
      wk.init(tid * V, nt * V, W);
      for (int e0 = tid * V; e0 < nel; e0 += U * nt * V) {
        Pack<scalar_t, V> xa[U], xb[U];
        int rr[U], qq[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          rr[u] = wk.r;
          qq[u] = wk.q;
          wk.advance();
          if (e0 + u * nt * V < nel) {
            const int row = r0 + rr[u];
            if constexpr (V > 1) {
              xa[u] = *reinterpret_cast<const Pack<scalar_t, V>*>(pa + static_cast<int64_t>(row) * W + qq[u]);
              xb[u] = *reinterpret_cast<const Pack<scalar_t, V>*>(pb + static_cast<int64_t>(row) * W + qq[u]);
            } else {
              xa[u].v[0] = pa[row * sa.h + qq[u] * sa.w];
              xb[u].v[0] = pb[row * sb.h + qq[u] * sb.w];
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (e0 + u * nt * V < nel) {
            const int row = r0 + rr[u];
#pragma unroll
            for (int k = 0; k < V; ++k) {
              zs[rr[u] * zpitch + qq[u] + k] =
                  pod_z(to_acc(xa[u].v[k]), to_acc(xb[u].v[k]), pm, ncv, W, row, qq[u] + k, square);
            }
          }
        }
      }
    }
    __syncthreads();
    pod_chunk_values(T, zs, zpitch, RA, rapitch, CA, r0, Rc, ra_first, pe, tid, nt, sq);
    // The next chunk writes zs (read in B only) and RA after its first barrier.
  }
  __syncthreads();
  pod_height_values(T, CA, pe, tid, nt, sq);
  sq = block_sum(sq);
  if (tid == 0) plane_sq[plane] = sq;
}

// z at (row, col) of a plane, any strides.
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> z_at(const scalar_t* pa, const scalar_t* pb, const Strides4& sa,
                                                 const Strides4& sb, const acc_t<scalar_t>* pm, acc_t<scalar_t> ncv,
                                                 int W, int row, int col, bool square) {
  using acc = acc_t<scalar_t>;
  acc va = to_acc(pa[row * sa.h + col * sa.w]);
  acc vb = to_acc(pb[row * sb.h + col * sb.w]);
  if (pm != nullptr) {
    const acc m = pm[static_cast<int64_t>(row) * W + col];
    va *= m;
    vb *= m;
  }
  va *= ncv;
  vb *= ncv;
  return square ? (va - vb) * (va + vb) : va - vb;
}

// Forward, generic path: one block per plane, one emb value per thread
// iteration, summed directly from global memory. Any size, any strides.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pod_fwd_generic_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, Strides4 sa,
                           Strides4 sb, const acc_t<scalar_t>* __restrict__ smask,
                           const acc_t<scalar_t>* __restrict__ cmask, int C, int H, int W, bool square,
                           PodLayout lay, acc_t<scalar_t>* __restrict__ emb, acc_t<scalar_t>* __restrict__ plane_sq) {
  using acc = acc_t<scalar_t>;
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C;
  const int64_t c = plane - n * C;
  const scalar_t* pa = a + n * sa.n + c * sa.c;
  const scalar_t* pb = b + n * sb.n + c * sb.c;
  const acc* pm = smask != nullptr ? smask + n * H * W : nullptr;
  const acc ncv = cmask != nullptr ? cmask[plane] : acc(1);
  const int64_t L = lay.L;
  acc* pe = emb + plane * L;
  acc sq = acc(0);
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    int si = 0;
    while (si + 1 < lay.num_scales && l >= lay.off[si + 1]) ++si;
    const int s = static_cast<int>(lay.s[si]);
    const int kh = static_cast<int>(lay.kh[si]), kw = static_cast<int>(lay.kw[si]);
    const int Hs = static_cast<int>(lay.Hs[si]), Ws = static_cast<int>(lay.Ws[si]);
    int64_t rem = l - lay.off[si];
    acc sum = acc(0);
    acc v;
    if (rem < static_cast<int64_t>(s) * Hs) {
      const int j = static_cast<int>(rem / Hs);
      const int r = static_cast<int>(rem - static_cast<int64_t>(j) * Hs);
      for (int col = j * kw; col < (j + 1) * kw; ++col) sum += z_at(pa, pb, sa, sb, pm, ncv, W, r, col, square);
      v = sum / static_cast<acc>(kw);
    } else {
      rem -= static_cast<int64_t>(s) * Hs;
      const int i = static_cast<int>(rem / Ws);
      const int q = static_cast<int>(rem - static_cast<int64_t>(i) * Ws);
      for (int row = i * kh; row < (i + 1) * kh; ++row) sum += z_at(pa, pb, sa, sb, pm, ncv, W, row, q, square);
      v = sum / static_cast<acc>(kh);
    }
    pe[l] = v;
    sq += v * v;
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) plane_sq[plane] = sq;
}

// ---------------------------------------------------------------------------
// Backward, fast path: one block per plane.
// V > 1: student and grad NCHW-contiguous, 16-byte aligned, W % V == 0.
// Shared memory: Atab [H][n_ca], Btab [n_ra][W] (acc), col_atom [W], row_atom [H] (int).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    pod_bwd_kernel(const acc_t<scalar_t>* __restrict__ grad_dist, int64_t gd_stride,
                   const acc_t<scalar_t>* __restrict__ dist, int64_t d_stride, const scalar_t* __restrict__ a,
                   Strides4 sa, scalar_t* __restrict__ grad, Strides4 sg, const acc_t<scalar_t>* __restrict__ smask,
                   const acc_t<scalar_t>* __restrict__ cmask, int C, bool square, PodTables T,
                   const acc_t<scalar_t>* __restrict__ emb, int64_t L) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = T.H, W = T.W;
  const int n_ca = T.n_ca, n_ra = T.n_ra;
  acc* Atab = reinterpret_cast<acc*>(smem_raw);
  acc* Btab = Atab + H * n_ca;
  int* col_atom = reinterpret_cast<int*>(Btab + n_ra * W);
  int* row_atom = col_atom + W;

  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C;
  const int64_t c = plane - n * C;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;  // 128 or 256 (a multiple of 32)
  const acc* pe = emb + plane * L;
  const scalar_t* pa = a + n * sa.n + c * sa.c;
  const int nel = H * W;
  // The first vector of this thread is loaded before the tables are built (its
  // latency overlaps theirs; small planes are one vector per thread).
  acc x0[V];
  if (tid * V < nel) {
    if constexpr (V > 1) {
      load_vec<scalar_t, V>(pa + tid * V, x0);
    } else {
      const int r = tid / W, q = tid - (tid / W) * W;
      x0[0] = to_acc(pa[r * sa.h + q * sa.w]);
    }
  }

  for (int q = tid; q < W; q += nt) {
    int ca = 0;
    for (int t = 1; t < n_ca; ++t) ca += (q >= T.cstart[t]) ? 1 : 0;
    col_atom[q] = ca;
  }
  for (int r = tid; r < H; r += nt) {
    int ra = 0;
    for (int t = 1; t < n_ra; ++t) ra += (r >= T.rstart[t]) ? 1 : 0;
    row_atom[r] = ra;
  }
  for (int i = tid; i < H * n_ca; i += nt) {
    const int r = i / n_ca;
    const int ca = i - r * n_ca;
    const int q0 = T.cstart[ca];
    acc v = acc(0);
    for (int si = 0; si < T.ns; ++si) {
      if (r < T.Hs[si] && q0 < T.Ws[si]) {
        const int j = q0 / T.kw[si];
        v += pe[T.off[si] + j * T.Hs[si] + r] / static_cast<acc>(T.kw[si]);
      }
    }
    Atab[i] = v;
  }
  for (int i = tid; i < n_ra * W; i += nt) {
    const int ra = i / W;
    const int q = i - ra * W;
    const int r0 = T.rstart[ra];
    acc v = acc(0);
    for (int si = 0; si < T.ns; ++si) {
      if (r0 < T.Hs[si] && q < T.Ws[si]) {
        const int ii = r0 / T.kh[si];
        v += pe[T.off[si] + T.s[si] * T.Hs[si] + ii * T.Ws[si] + q] / static_cast<acc>(T.kh[si]);
      }
    }
    Btab[i] = v;
  }
  const acc coef = safe_ratio(grad_dist[n * gd_stride], dist[n * d_stride]);
  const acc ncv = cmask != nullptr ? cmask[plane] : acc(1);
  const acc scale = square ? coef * acc(2) * ncv * ncv : coef * ncv;
  const acc* pm = smask != nullptr ? smask + n * H * W : nullptr;
  scalar_t* pg = grad + n * sg.n + c * sg.c;
  __syncthreads();

  PlaneWalker wk;
  wk.init(tid * V, nt * V, W);
  for (int e = tid * V; e < nel; e += nt * V, wk.advance()) {
    const int r = wk.r, q = wk.q;
    acc x[V];
    if (e == tid * V) {
#pragma unroll
      for (int k = 0; k < V; ++k) x[k] = x0[k];
    } else if constexpr (V > 1) {
      load_vec<scalar_t, V>(pa + e, x);
    } else {
      x[0] = to_acc(pa[r * sa.h + q * sa.w]);
    }
    const acc* arow = Atab + r * n_ca;
    const acc* brow = Btab + row_atom[r] * W;
    acc out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc G = arow[col_atom[q + k]] + brow[q + k];
      acc f = G * scale;
      if (pm != nullptr) {
        const acc m = pm[e + k];
        f = square ? f * (m * m) : f * m;
      }
      out[k] = square ? f * x[k] : f;
    }
    if constexpr (V > 1) {
      store_vec<scalar_t, V>(pg + e, out);
    } else {
      pg[r * sg.h + q * sg.w] = static_cast<scalar_t>(out[0]);
    }
  }
}

// Backward, generic path: one thread per element (grid-stride), direct reads
// of emb. Any size, any strides.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pod_bwd_generic_kernel(const acc_t<scalar_t>* __restrict__ grad_dist, int64_t gd_stride,
                           const acc_t<scalar_t>* __restrict__ dist, int64_t d_stride,
                           const scalar_t* __restrict__ a, Strides4 sa, scalar_t* __restrict__ grad, Strides4 sg,
                           const acc_t<scalar_t>* __restrict__ smask, const acc_t<scalar_t>* __restrict__ cmask,
                           int64_t N, int64_t C, int H, int W, bool square, PodLayout lay,
                           const acc_t<scalar_t>* __restrict__ emb) {
  using acc = acc_t<scalar_t>;
  const int64_t total = N * C * H * W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int q = static_cast<int>(e % W);
    const int64_t t1 = e / W;
    const int r = static_cast<int>(t1 % H);
    const int64_t plane = t1 / H;
    const int64_t n = plane / C;
    const int64_t c = plane - n * C;
    const acc* pe = emb + plane * lay.L;
    acc G = acc(0);
    for (int si = 0; si < lay.num_scales; ++si) {
      if (r < lay.Hs[si] && q < lay.Ws[si]) {
        const int64_t j = q / lay.kw[si];
        const int64_t i = r / lay.kh[si];
        G += pe[lay.off[si] + j * lay.Hs[si] + r] / static_cast<acc>(lay.kw[si]) +
             pe[lay.off[si] + lay.s[si] * lay.Hs[si] + i * lay.Ws[si] + q] / static_cast<acc>(lay.kh[si]);
      }
    }
    const acc coef = safe_ratio(grad_dist[n * gd_stride], dist[n * d_stride]);
    const acc ncv = cmask != nullptr ? cmask[plane] : acc(1);
    const acc m = smask != nullptr ? smask[(n * H + r) * W + q] : acc(1);
    const acc x = to_acc(a[n * sa.n + c * sa.c + r * sa.h + q * sa.w]);
    const acc mn = m * ncv;
    const acc out = square ? G * coef * acc(2) * x * mn * mn : G * coef * mn;
    grad[n * sg.n + c * sg.c + r * sg.h + q * sg.w] = static_cast<scalar_t>(out);
  }
}

// ---------------------------------------------------------------------------
// Host side.

std::tuple<at::Tensor, at::Tensor> pod_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const c10::optional<at::Tensor>& spatial_mask,
                                                    const c10::optional<at::Tensor>& channel_mask,
                                                    at::IntArrayRef scales, bool square) {
  check_pair("pod_forward", student, teacher, spatial_mask, channel_mask);
  check_cuda_input("pod_forward", student, "student");
  c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), C = student.size(1), H = student.size(2), W = student.size(3);
  TORCH_CHECK(H * W < (int64_t(1) << 31), "lskd: pod_forward: H * W must be below 2^31");
  const PodLayout lay = make_pod_layout(H, W, scales);
  const auto opts = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor dist = at::empty({N}, opts);
  at::Tensor emb = at::empty({N, C, lay.L}, opts);
  if (N == 0) return std::make_tuple(dist, emb);
  at::Tensor plane_sq = at::empty({N * C}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  PodTables T;
  const bool tables_ok = build_pod_tables(H, W, lay, T);
  const Strides4 sa = strides4(student), sb = strides4(teacher);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_pod_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int VW = vec_width<scalar_t>();
    const acc* sm = opt_data<acc>(spatial_mask);
    const acc* cm = opt_data<acc>(channel_mask);
    const int64_t sz = static_cast<int64_t>(sizeof(acc));
    // Fast path: choose the chunk height R from the shared-memory budget.
    const int64_t zpitch = (W % 2 == 0) ? W + 1 : W;
    const int64_t rapitch = tables_ok ? ((T.n_ca % 2 == 0) ? T.n_ca + 1 : T.n_ca) : 1;
    const int64_t fixed = tables_ok ? static_cast<int64_t>(T.n_ra) * W * sz : 0;
    const int64_t per_row = (zpitch + rapitch) * sz;
    int64_t R = 0;
    if (tables_ok && fixed + per_row <= kSmemBudget) {
      R = (kSmemBudget - fixed) / per_row;
      R = std::min<int64_t>(R, std::max<int64_t>(1, 4096 / W));  // about 4096 elements per chunk
      R = std::min<int64_t>(R, H);
    }
    if (N * C > 0) {
      const int threads = plane_threads(H * W);
      const bool vec = student.is_contiguous() && teacher.is_contiguous() && W % VW == 0 &&
                       aligned16(student.data_ptr()) && aligned16(teacher.data_ptr());
      const size_t smem = static_cast<size_t>(R * (zpitch + rapitch) * sz + fixed);
      if (R >= 1) {
        if (vec) {
          pod_fwd_kernel<scalar_t, VW><<<static_cast<unsigned>(N * C), threads, smem, stream>>>(
              student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), sa, sb, sm, cm, static_cast<int>(C),
              square, T, static_cast<int>(R), static_cast<int>(zpitch), static_cast<int>(rapitch),
              emb.data_ptr<acc>(), lay.L, plane_sq.data_ptr<acc>());
        } else {
          pod_fwd_kernel<scalar_t, 1><<<static_cast<unsigned>(N * C), threads, smem, stream>>>(
              student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), sa, sb, sm, cm, static_cast<int>(C),
              square, T, static_cast<int>(R), static_cast<int>(zpitch), static_cast<int>(rapitch),
              emb.data_ptr<acc>(), lay.L, plane_sq.data_ptr<acc>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        pod_fwd_generic_kernel<scalar_t><<<static_cast<unsigned>(N * C), kThreads, 0, stream>>>(
            student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), sa, sb, sm, cm, static_cast<int>(C),
            static_cast<int>(H), static_cast<int>(W), square, lay, emb.data_ptr<acc>(), plane_sq.data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    launch_sum_sqrt<acc>(plane_sq, C, dist, stream);
  });
  return std::make_tuple(dist, emb);
}

at::Tensor pod_backward_cuda(const at::Tensor& grad_dist, const at::Tensor& student,
                             const c10::optional<at::Tensor>& spatial_mask,
                             const c10::optional<at::Tensor>& channel_mask, const at::Tensor& dist,
                             const at::Tensor& emb_in, at::IntArrayRef scales, bool square) {
  check_pair("pod_backward", student, student, spatial_mask, channel_mask);
  check_cuda_input("pod_backward", student, "student");
  c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), C = student.size(1), H = student.size(2), W = student.size(3);
  TORCH_CHECK(H * W < (int64_t(1) << 31), "lskd: pod_backward: H * W must be below 2^31");
  const PodLayout lay = make_pod_layout(H, W, scales);
  check_vec_n("pod_backward", grad_dist, "grad_dist", N, student);
  check_vec_n("pod_backward", dist, "dist", N, student);
  TORCH_CHECK(emb_in.dim() == 3 && emb_in.size(0) == N && emb_in.size(1) == C && emb_in.size(2) == lay.L,
              "lskd: pod_backward: emb must be [", N, ", ", C, ", ", lay.L, "], got ", emb_in.sizes());
  TORCH_CHECK(emb_in.scalar_type() == acc_scalar_type(student.scalar_type()) && emb_in.device() == student.device(),
              "lskd: pod_backward: emb must be an accumulation-dtype tensor on ", student.device());
  const at::Tensor emb = emb_in.contiguous();
  at::Tensor grad = at::empty_like(student);
  if (student.numel() == 0) return grad;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  PodTables T;
  const bool tables_ok = build_pod_tables(H, W, lay, T);
  const Strides4 sa = strides4(student), sg = strides4(grad);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_pod_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int VW = vec_width<scalar_t>();
    const acc* sm = opt_data<acc>(spatial_mask);
    const acc* cm = opt_data<acc>(channel_mask);
    const int64_t sz = static_cast<int64_t>(sizeof(acc));
    const int64_t smem = tables_ok ? (H * T.n_ca + static_cast<int64_t>(T.n_ra) * W) * sz + (H + W) * 4 : 0;
    if (tables_ok && smem <= kSmemBudget) {
      const int threads = plane_threads(H * W);
      const bool vec = student.is_contiguous() && grad.is_contiguous() && W % VW == 0 &&
                       aligned16(student.data_ptr()) && aligned16(grad.data_ptr());
      if (vec) {
        pod_bwd_kernel<scalar_t, VW><<<static_cast<unsigned>(N * C), threads, static_cast<size_t>(smem), stream>>>(
            grad_dist.data_ptr<acc>(), grad_dist.stride(0), dist.data_ptr<acc>(), dist.stride(0),
            student.data_ptr<scalar_t>(), sa, grad.data_ptr<scalar_t>(), sg, sm, cm, static_cast<int>(C), square, T,
            emb.data_ptr<acc>(), lay.L);
      } else {
        pod_bwd_kernel<scalar_t, 1><<<static_cast<unsigned>(N * C), threads, static_cast<size_t>(smem), stream>>>(
            grad_dist.data_ptr<acc>(), grad_dist.stride(0), dist.data_ptr<acc>(), dist.stride(0),
            student.data_ptr<scalar_t>(), sa, grad.data_ptr<scalar_t>(), sg, sm, cm, static_cast<int>(C), square, T,
            emb.data_ptr<acc>(), lay.L);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t total = N * C * H * W;
      const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), int64_t(num_sms(student.get_device())) * 32);
      pod_bwd_generic_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grad_dist.data_ptr<acc>(), grad_dist.stride(0), dist.data_ptr<acc>(), dist.stride(0),
          student.data_ptr<scalar_t>(), sa, grad.data_ptr<scalar_t>(), sg, sm, cm, N, C, static_cast<int>(H),
          static_cast<int>(W), square, lay, emb.data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("pod_forward", &lskd::cuda::pod_forward_cuda);
  m.impl("pod_backward", &lskd::cuda::pod_backward_cuda);
}
