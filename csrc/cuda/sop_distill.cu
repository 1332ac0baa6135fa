// CUDA kernels of lskd::sop_forward / lskd::sop_backward (second-order
// context pooling, docs/MATHEMATICS.md section 2.2). The definitions are in csrc/sop_distill.cpp.
//
// sop_forward (2 launches)
//   1. sop_fwd_kernel, one block per (n, group, tile of pooled positions).
//      The pooled k-vectors p (student) and q (teacher) of the tile are
//      computed straight from global memory (window sums; wide windows are
//      split over T lanes and combined by a warp butterfly) into shared memory
//      (position-major, odd pitch). One warp per position then forms
//      |u|^2, |v|^2 and u.v (u = p - q, v = p + q), the term
//      0.5 (|u|^2 |v|^2 + (u.v)^2) and the coefficients of
//      pooled_grad = (|v|^2 + u.v) u + (|u|^2 + u.v) v, written coalesced.
//      When k is too large for shared memory the group's channels are taken
//      in chunks and pooled twice (once for the dot products, once for the
//      gradient): correct for any k, no temporaries.
//      The block's sum of terms goes to partial[n, group, tile].
//   2. sum_sqrt_kernel: dist[n] = sqrt(sum of partial[n, :, :]).
// sop_backward (1 launch)
//   sop_bwd_kernel, one block per (n, c) plane: the pooled_grad plane and the
//   covering ranges [ho_lo, ho_hi) of each row and [wo_lo, wo_hi) of each
//   column go to shared memory; the plane is streamed (vectorised for
//   NCHW-contiguous grads) and each element sums its covering windows.
//   Channels >= groups * k get zeros.
#include "device_utils.cuh"

#include <algorithm>
#include <tuple>

namespace lskd {
namespace cuda {
namespace {

struct SopGeom {
  int H, W, Ho, Wo;
  int wh, ww, sh, sw, ph, pw;
  int groups, k;
};

// ---------------------------------------------------------------------------
// Forward.
// Shared memory (acc): spa [P][kcp], spb [P][kcp], suu [P], svv [P], suv [P].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sop_fwd_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, Strides4 sa, Strides4 sb,
                   const acc_t<scalar_t>* __restrict__ smask, const acc_t<scalar_t>* __restrict__ cmask, int C,
                   SopGeom G, int P, int ntiles, int kc, int T, int logT, acc_t<scalar_t>* __restrict__ pooled_grad,
                   acc_t<scalar_t>* __restrict__ partial) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int kcp = kc | 1;
  acc* spa = reinterpret_cast<acc*>(smem_raw);
  acc* spb = spa + P * kcp;
  acc* suu = spb + P * kcp;
  acc* svv = suu + P;
  acc* suv = svv + P;

  const int64_t blk = blockIdx.x;
  const int tile = static_cast<int>(blk % ntiles);
  const int64_t ng = blk / ntiles;
  const int g = static_cast<int>(ng % G.groups);
  const int64_t n = ng / G.groups;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int HoWo = G.Ho * G.Wo;
  const int p0 = tile * P;
  const int Pc = min(P, HoWo - p0);
  const int k = G.k;
  const int64_t Gk = static_cast<int64_t>(G.groups) * k;
  const acc* pm = smask != nullptr ? smask + n * G.H * G.W : nullptr;
  const acc inv_div = acc(1) / static_cast<acc>(G.wh * G.ww);

  for (int i = tid; i < Pc; i += kThreads) {
    suu[i] = acc(0);
    svv[i] = acc(0);
    suv[i] = acc(0);
  }

  // Pooled values of channels [i0, i0 + kcc) of the group for the tile.
  auto pool_chunk = [&](int i0, int kcc) {
    const int total = kcc * Pc * T;
    for (int t0 = 0; t0 < total; t0 += kThreads) {
      const int t = t0 + tid;
      const bool act = t < total;
      acc s_a = acc(0), s_b = acc(0);
      int i = 0, pos = 0, part = 0;
      if (act) {
        part = t & (T - 1);
        const int rest = t >> logT;
        i = rest / Pc;
        pos = rest - i * Pc;
        const int p = p0 + pos;
        const int ho = p / G.Wo;
        const int wo = p - ho * G.Wo;
        const int h_lo = max(0, ho * G.sh - G.ph), h_hi = min(G.H, ho * G.sh - G.ph + G.wh);
        const int w_lo = max(0, wo * G.sw - G.pw), w_hi = min(G.W, wo * G.sw - G.pw + G.ww);
        const int64_t cc = static_cast<int64_t>(g) * k + i0 + i;
        const scalar_t* xa = a + n * sa.n + cc * sa.c;
        const scalar_t* xb = b + n * sb.n + cc * sb.c;
        for (int h = h_lo; h < h_hi; ++h) {
          const scalar_t* ra = xa + h * sa.h;
          const scalar_t* rb = xb + h * sb.h;
          const acc* mrow = pm != nullptr ? pm + static_cast<int64_t>(h) * G.W : nullptr;
          for (int w = w_lo + part; w < w_hi; w += T) {
            acc va = to_acc(ra[w * sa.w]);
            acc vb = to_acc(rb[w * sb.w]);
            if (mrow != nullptr) {
              const acc m = mrow[w];
              va *= m;
              vb *= m;
            }
            s_a += va;
            s_b += vb;
          }
        }
      }
      for (int o = T >> 1; o > 0; o >>= 1) {  // butterfly within aligned groups of T lanes
        s_a += __shfl_xor_sync(0xffffffffu, s_a, o);
        s_b += __shfl_xor_sync(0xffffffffu, s_b, o);
      }
      if (act && part == 0) {
        const int64_t cc = static_cast<int64_t>(g) * k + i0 + i;
        const acc f = (cmask != nullptr ? cmask[n * C + cc] : acc(1)) * inv_div;
        spa[pos * kcp + i] = s_a * f;
        spb[pos * kcp + i] = s_b * f;
      }
    }
  };

  const int nchunks = (k + kc - 1) / kc;
  for (int ch = 0; ch < nchunks; ++ch) {
    const int i0 = ch * kc;
    const int kcc = min(kc, k - i0);
    pool_chunk(i0, kcc);
    __syncthreads();
    for (int pos = warp; pos < Pc; pos += kWarps) {
      acc uu = acc(0), vv = acc(0), uv = acc(0);
      for (int i = lane; i < kcc; i += 32) {
        const acc p = spa[pos * kcp + i], q = spb[pos * kcp + i];
        const acc u = p - q, v = p + q;
        uu += u * u;
        vv += v * v;
        uv += u * v;
      }
      uu = warp_sum(uu);
      vv = warp_sum(vv);
      uv = warp_sum(uv);
      if (lane == 0) {
        suu[pos] += uu;
        svv[pos] += vv;
        suv[pos] += uv;
      }
    }
    __syncthreads();
  }

  acc tsum = acc(0);
  for (int pos = tid; pos < Pc; pos += kThreads) {
    const acc uu = suu[pos], vv = svv[pos], uv = suv[pos];
    tsum += acc(0.5) * (uu * vv + uv * uv);
    suu[pos] = vv + uv;  // coefficient of u
    svv[pos] = uu + uv;  // coefficient of v
  }
  __syncthreads();

  for (int ch = 0; ch < nchunks; ++ch) {
    const int i0 = ch * kc;
    const int kcc = min(kc, k - i0);
    if (nchunks > 1) {
      pool_chunk(i0, kcc);
      __syncthreads();
    }
    const int total = kcc * Pc;
    for (int t = tid; t < total; t += kThreads) {
      const int i = t / Pc;
      const int pos = t - i * Pc;
      const acc p = spa[pos * kcp + i], q = spb[pos * kcp + i];
      const acc out = suu[pos] * (p - q) + svv[pos] * (p + q);
      pooled_grad[((n * Gk) + static_cast<int64_t>(g) * k + i0 + i) * HoWo + p0 + pos] = out;
    }
    if (nchunks > 1) __syncthreads();
  }

  tsum = block_sum(tsum);
  if (tid == 0) partial[blk] = tsum;
}

// ---------------------------------------------------------------------------
// Backward.

// Pooled positions along one axis whose window covers x: [lo, hi).
__device__ __forceinline__ void cover_range(int x, int pad, int win, int stride, int nout, int& lo, int& hi) {
  const int num = x + pad - win + 1;
  lo = num <= 0 ? 0 : (num + stride - 1) / stride;
  hi = min(nout, (x + pad) / stride + 1);
}

// V > 1: grad NCHW-contiguous, 16-byte aligned, W % V == 0.
// Shared memory: [pooled_grad plane, acc, if stage] [hlo, hhi (H), wlo, whi (W), int, if tables].
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    sop_bwd_kernel(const acc_t<scalar_t>* __restrict__ grad_dist, int64_t gd_stride,
                   const acc_t<scalar_t>* __restrict__ dist, int64_t d_stride, scalar_t* __restrict__ grad,
                   Strides4 sg, const acc_t<scalar_t>* __restrict__ smask, const acc_t<scalar_t>* __restrict__ cmask,
                   int C, SopGeom G, const acc_t<scalar_t>* __restrict__ pooled_grad, bool stage, bool tables) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t plane = blockIdx.x;
  const int64_t n = plane / C;
  const int64_t c = plane - n * C;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;  // 128 or 256 (a multiple of 32)
  const int H = G.H, W = G.W;
  const int HoWo = G.Ho * G.Wo;
  const int64_t Gk = static_cast<int64_t>(G.groups) * G.k;
  scalar_t* pg = grad + n * sg.n + c * sg.c;
  const int nel = H * W;

  if (c >= Gk) {  // dropped channels: zero gradient (whole block returns)
    acc z[V];
#pragma unroll
    for (int k = 0; k < V; ++k) z[k] = acc(0);
    PlaneWalker wk;
    wk.init(tid * V, nt * V, W);
    for (int e = tid * V; e < nel; e += nt * V, wk.advance()) {
      if constexpr (V > 1) {
        store_vec<scalar_t, V>(pg + e, z);
      } else {
        pg[wk.r * sg.h + wk.q * sg.w] = static_cast<scalar_t>(z[0]);
      }
    }
    return;
  }

  const acc* pgp = pooled_grad + (n * Gk + c) * HoWo;
  acc* sp = reinterpret_cast<acc*>(smem_raw);
  int* tab = reinterpret_cast<int*>(smem_raw + (stage ? static_cast<size_t>(HoWo) * sizeof(acc) : 0));
  int* hlo = tab;
  int* hhi = tab + H;
  int* wlo = tab + 2 * H;
  int* whi = tab + 2 * H + W;
  if (stage) {
    for (int i = tid; i < HoWo; i += nt) sp[i] = pgp[i];
    pgp = sp;
  }
  if (tables) {
    for (int r = tid; r < H; r += nt) cover_range(r, G.ph, G.wh, G.sh, G.Ho, hlo[r], hhi[r]);
    for (int q = tid; q < W; q += nt) cover_range(q, G.pw, G.ww, G.sw, G.Wo, wlo[q], whi[q]);
  }
  const acc coef = safe_ratio(grad_dist[n * gd_stride], acc(2) * dist[n * d_stride]);
  const acc ncv = cmask != nullptr ? cmask[plane] : acc(1);
  const acc scale = ncv * coef / static_cast<acc>(G.wh * G.ww);
  const acc* pm = smask != nullptr ? smask + n * H * W : nullptr;
  __syncthreads();

  PlaneWalker wk;
  wk.init(tid * V, nt * V, W);
  for (int e = tid * V; e < nel; e += nt * V, wk.advance()) {
    const int r = wk.r, q0 = wk.q;
    int h0, h1;
    if (tables) {
      h0 = hlo[r];
      h1 = hhi[r];
    } else {
      cover_range(r, G.ph, G.wh, G.sh, G.Ho, h0, h1);
    }
    acc out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int q = q0 + k;
      int w0, w1;
      if (tables) {
        w0 = wlo[q];
        w1 = whi[q];
      } else {
        cover_range(q, G.pw, G.ww, G.sw, G.Wo, w0, w1);
      }
      acc s = acc(0);
      for (int ho = h0; ho < h1; ++ho) {
        const acc* prow = pgp + ho * G.Wo;
        for (int wo = w0; wo < w1; ++wo) s += prow[wo];
      }
      acc f = s * scale;
      if (pm != nullptr) f *= pm[e + k];
      out[k] = f;
    }
    if constexpr (V > 1) {
      store_vec<scalar_t, V>(pg + e, out);
    } else {
      pg[r * sg.h + q0 * sg.w] = static_cast<scalar_t>(out[0]);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

SopGeom make_geom(const at::Tensor& a, int64_t groups, at::IntArrayRef window, at::IntArrayRef stride,
                  at::IntArrayRef padding) {
  const auto hw = sop_geometry(a, groups, window, stride, padding);
  TORCH_CHECK(a.size(2) * a.size(3) < (int64_t(1) << 31) && hw.first * hw.second < (int64_t(1) << 31) &&
                  window[0] * window[1] < (int64_t(1) << 31),
              "lskd: sop: map too large");
  SopGeom G;
  G.H = static_cast<int>(a.size(2));
  G.W = static_cast<int>(a.size(3));
  G.Ho = static_cast<int>(hw.first);
  G.Wo = static_cast<int>(hw.second);
  G.wh = static_cast<int>(window[0]);
  G.ww = static_cast<int>(window[1]);
  G.sh = static_cast<int>(stride[0]);
  G.sw = static_cast<int>(stride[1]);
  G.ph = static_cast<int>(padding[0]);
  G.pw = static_cast<int>(padding[1]);
  G.groups = static_cast<int>(groups);
  G.k = static_cast<int>(a.size(1) / groups);
  return G;
}

std::tuple<at::Tensor, at::Tensor> sop_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const c10::optional<at::Tensor>& spatial_mask,
                                                    const c10::optional<at::Tensor>& channel_mask, int64_t groups,
                                                    at::IntArrayRef window, at::IntArrayRef stride,
                                                    at::IntArrayRef padding) {
  check_pair("sop_forward", student, teacher, spatial_mask, channel_mask);
  check_cuda_input("sop_forward", student, "student");
  c10::cuda::CUDAGuard guard(student.device());
  const SopGeom G = make_geom(student, groups, window, stride, padding);
  const int64_t N = student.size(0), C = student.size(1);
  const int64_t HoWo = static_cast<int64_t>(G.Ho) * G.Wo;
  const auto opts = student.options().dtype(acc_scalar_type(student.scalar_type()));
  at::Tensor dist = at::empty({N}, opts);
  at::Tensor pooled_grad = at::empty({N, groups * G.k, G.Ho, G.Wo}, opts);
  if (N == 0) return std::make_tuple(dist, pooled_grad);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 sa = strides4(student), sb = strides4(teacher);

  // Lanes per window sum: 1 for small windows, else up to 32 over the columns.
  int T = 1, logT = 0;
  if (static_cast<int64_t>(G.wh) * G.ww > 32) {
    while (T * 2 <= std::min(32, G.ww)) {
      T *= 2;
      ++logT;
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_sop_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc* sm = opt_data<acc>(spatial_mask);
    const acc* cm = opt_data<acc>(channel_mask);
    const int64_t sz = static_cast<int64_t>(sizeof(acc));
    auto per_pos = [&](int64_t kc) { return (2 * (kc | 1) + 3) * sz; };
    const int64_t k = G.k;
    const int64_t Pmin = std::min<int64_t>(HoWo, 32);
    int64_t kc, Pmax;
    if (per_pos(k) * Pmin <= kSmemBudget) {
      kc = k;
      Pmax = std::min<int64_t>(HoWo, kSmemBudget / per_pos(k));
    } else {
      kc = std::max<int64_t>(1, (kSmemBudget / (Pmin * sz) - 3) / 2 - 1);
      while (kc > 1 && per_pos(kc) * Pmin > kSmemBudget) --kc;
      Pmax = Pmin;
    }
    // Enough blocks for the device: split the positions into tiles.
    const int64_t want_tiles = ceil_div(2 * num_sms(student.get_device()), N * groups);
    int64_t P = ceil_div(HoWo, std::max<int64_t>(1, want_tiles));
    P = std::max<int64_t>(P, Pmin);
    P = std::min<int64_t>(P, Pmax);
    const int64_t ntiles = ceil_div(HoWo, P);
    at::Tensor partial = at::empty({N * groups * ntiles}, opts);
    const size_t smem = static_cast<size_t>((2 * P * (kc | 1) + 3 * P) * sz);
    sop_fwd_kernel<scalar_t><<<static_cast<unsigned>(N * groups * ntiles), kThreads, smem, stream>>>(
        student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), sa, sb, sm, cm, static_cast<int>(C), G,
        static_cast<int>(P), static_cast<int>(ntiles), static_cast<int>(kc), T, logT, pooled_grad.data_ptr<acc>(),
        partial.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_sum_sqrt<acc>(partial, groups * ntiles, dist, stream);
  });
  return std::make_tuple(dist, pooled_grad);
}

at::Tensor sop_backward_cuda(const at::Tensor& grad_dist, const at::Tensor& student,
                             const c10::optional<at::Tensor>& spatial_mask,
                             const c10::optional<at::Tensor>& channel_mask, const at::Tensor& dist,
                             const at::Tensor& pooled_grad_in, int64_t groups, at::IntArrayRef window,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair("sop_backward", student, student, spatial_mask, channel_mask);
  check_cuda_input("sop_backward", student, "student");
  c10::cuda::CUDAGuard guard(student.device());
  const SopGeom G = make_geom(student, groups, window, stride, padding);
  const int64_t N = student.size(0), C = student.size(1), H = student.size(2), W = student.size(3);
  check_vec_n("sop_backward", grad_dist, "grad_dist", N, student);
  check_vec_n("sop_backward", dist, "dist", N, student);
  TORCH_CHECK(pooled_grad_in.dim() == 4 && pooled_grad_in.size(0) == N && pooled_grad_in.size(1) == groups * G.k &&
                  pooled_grad_in.size(2) == G.Ho && pooled_grad_in.size(3) == G.Wo,
              "lskd: sop_backward: pooled_grad must be [", N, ", ", groups * G.k, ", ", G.Ho, ", ", G.Wo, "], got ",
              pooled_grad_in.sizes());
  TORCH_CHECK(pooled_grad_in.scalar_type() == acc_scalar_type(student.scalar_type()) &&
                  pooled_grad_in.device() == student.device(),
              "lskd: sop_backward: pooled_grad must be an accumulation-dtype tensor on ", student.device());
  const at::Tensor pooled_grad = pooled_grad_in.contiguous();
  at::Tensor grad = at::empty_like(student);
  if (student.numel() == 0) return grad;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 sg = strides4(grad);
  const int64_t HoWo = static_cast<int64_t>(G.Ho) * G.Wo;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "lskd_sop_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int VW = vec_width<scalar_t>();
    const acc* sm = opt_data<acc>(spatial_mask);
    const acc* cm = opt_data<acc>(channel_mask);
    const int64_t sz = static_cast<int64_t>(sizeof(acc));
    const int64_t tab_bytes = 2 * (H + W) * 4;
    const bool tables = tab_bytes <= kSmemBudget / 2;
    const int64_t stage_bytes = HoWo * sz;
    const bool stage = stage_bytes + (tables ? tab_bytes : 0) <= kSmemBudget;
    const size_t smem = static_cast<size_t>((stage ? stage_bytes : 0) + (tables ? tab_bytes : 0));
    const int threads = plane_threads(H * W);
    const bool vec = grad.is_contiguous() && W % VW == 0 && aligned16(grad.data_ptr());
    if (vec) {
      sop_bwd_kernel<scalar_t, VW><<<static_cast<unsigned>(N * C), threads, smem, stream>>>(
          grad_dist.data_ptr<acc>(), grad_dist.stride(0), dist.data_ptr<acc>(), dist.stride(0),
          grad.data_ptr<scalar_t>(), sg, sm, cm, static_cast<int>(C), G, pooled_grad.data_ptr<acc>(), stage, tables);
    } else {
      sop_bwd_kernel<scalar_t, 1><<<static_cast<unsigned>(N * C), threads, smem, stream>>>(
          grad_dist.data_ptr<acc>(), grad_dist.stride(0), dist.data_ptr<acc>(), dist.stride(0),
          grad.data_ptr<scalar_t>(), sg, sm, cm, static_cast<int>(C), G, pooled_grad.data_ptr<acc>(), stage, tables);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("sop_forward", &lskd::cuda::sop_forward_cuda);
  m.impl("sop_backward", &lskd::cuda::sop_backward_cuda);
}
