// CUDA kernels of lskd::md_stats (statistics of the MD masks, docs/MATHEMATICS.md section 2.3).
// The definition is in csrc/md_stats.cpp.
//
// One pass over A, Cb and Dn (2 launches):
//   1. md_partial_kernel, one block per (n, channel chunk, position chunk).
//      Lane l of every warp owns V consecutive positions (32 V per block);
//      warp w walks the channels c0 + w, c0 + w + 8, ... of the chunk. Each
//      thread accumulates, per position, <A,Cb>, <A,Dn>, |A|^2, |Cb|^2, |Dn|^2
//      over its channels; for each channel the warp sums A, Cb, Dn over its
//      positions with a butterfly (deterministic) and lane 0 stores them.
//      The 8 warps' position sums are then added in warp order through shared
//      memory. Outputs (small partial buffers):
//        pp [N, n_cchunks, 5, H*W]   position sums over the chunk's channels
//        gp [N, n_pchunks, 3, C]     channel sums over the chunk's positions
//      NCHW-contiguous inputs use vector loads along the positions (16 bytes,
//      8 bytes for half/bfloat16).
//   2. md_final_kernel: sums the partials in a fixed order and writes
//      cos_bg, cos_new (F.cosine_similarity with eps; one thread per position)
//      and gap_bg, gap_new (one block per (n, 32 channels), 8 warps over the
//      position chunks, added in warp order).
#include "device_utils.cuh"

#include <algorithm>
#include <tuple>

namespace lskd {
namespace cuda {
namespace {

// V > 1: the three inputs NCHW-contiguous, 16-byte aligned, (H * W) % V == 0
// (V = 4 for float/half/bfloat16, 2 for double).
// Shared memory: red [kWarps][5][32 * V] (acc).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    md_partial_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                      const scalar_t* __restrict__ D, Strides4 sA, Strides4 sB, Strides4 sD, int C, int H, int W,
                      int nP, int nCc, int Cc, acc_t<scalar_t>* __restrict__ pp, acc_t<scalar_t>* __restrict__ gp) {
  using acc = acc_t<scalar_t>;
  constexpr int PB = 32 * V;  // positions per block
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* red = reinterpret_cast<acc*>(smem_raw);

  const int64_t blk = blockIdx.x;
  const int pchunk = static_cast<int>(blk % nP);
  const int64_t rest = blk / nP;
  const int cchunk = static_cast<int>(rest % nCc);
  const int64_t n = rest / nCc;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int HW = H * W;
  const int p = pchunk * PB + lane * V;  // first position of this lane
  const bool valid = p < HW;             // V > 1: HW % V == 0, so all V or none

  // Per-lane offsets of the position inside a plane, per tensor.
  int64_t oA = 0, oB = 0, oD = 0;
  if (valid) {
    if constexpr (V > 1) {
      oA = oB = oD = p;
    } else {
      const int h = p / W, w = p - (p / W) * W;
      oA = h * sA.h + w * sA.w;
      oB = h * sB.h + w * sB.w;
      oD = h * sD.h + w * sD.w;
    }
  }
  const scalar_t* bA = A + n * sA.n + oA;
  const scalar_t* bB = B + n * sB.n + oB;
  const scalar_t* bD = D + n * sD.n + oD;

  acc dab[V], dad[V], naa[V], nbb[V], ndd[V];
#pragma unroll
  for (int v = 0; v < V; ++v) dab[v] = dad[v] = naa[v] = nbb[v] = ndd[v] = acc(0);

  const int c_begin = cchunk * Cc;
  const int c_end = min(C, c_begin + Cc);
  acc* gpn = gp + (n * nP + pchunk) * 3 * static_cast<int64_t>(C);
#pragma unroll 2
  for (int c = c_begin + warp; c < c_end; c += kWarps) {
    acc xa[V], xb[V], xd[V];
    if (valid) {
      if constexpr (V > 1) {
        load_vec<scalar_t, V>(bA + c * sA.c, xa);
        load_vec<scalar_t, V>(bB + c * sB.c, xb);
        load_vec<scalar_t, V>(bD + c * sD.c, xd);
      } else {
        xa[0] = to_acc(bA[c * sA.c]);
        xb[0] = to_acc(bB[c * sB.c]);
        xd[0] = to_acc(bD[c * sD.c]);
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) xa[v] = xb[v] = xd[v] = acc(0);
    }
    acc sa = acc(0), sb = acc(0), sd = acc(0);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      dab[v] += xa[v] * xb[v];
      dad[v] += xa[v] * xd[v];
      naa[v] += xa[v] * xa[v];
      nbb[v] += xb[v] * xb[v];
      ndd[v] += xd[v] * xd[v];
      sa += xa[v];
      sb += xb[v];
      sd += xd[v];
    }
    sa = warp_sum(sa);
    sb = warp_sum(sb);
    sd = warp_sum(sd);
    if (lane == 0) {
      gpn[c] = sa;
      gpn[C + c] = sb;
      gpn[2 * C + c] = sd;
    }
  }

  // Cross-warp sums of the position statistics, warps in index order.
  acc* mine = red + warp * 5 * PB + lane * V;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    mine[0 * PB + v] = dab[v];
    mine[1 * PB + v] = dad[v];
    mine[2 * PB + v] = naa[v];
    mine[3 * PB + v] = nbb[v];
    mine[4 * PB + v] = ndd[v];
  }
  __syncthreads();
  acc* ppn = pp + (n * nCc + cchunk) * 5 * static_cast<int64_t>(HW);
  for (int t = tid; t < 5 * PB; t += kThreads) {
    const int kq = t / PB;
    const int pl = t - kq * PB;
    const int pos = pchunk * PB + pl;
    if (pos < HW) {
      acc s = acc(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[w * 5 * PB + t];
      ppn[static_cast<int64_t>(kq) * HW + pos] = s;
    }
  }
}

template <typename acc>
__global__ void __launch_bounds__(kThreads)
    md_final_kernel(const acc* __restrict__ pp, const acc* __restrict__ gp, int64_t N, int C, int HW, int nCc, int nP,
                    acc eps, int64_t nb_cos, acc* __restrict__ cos_bg, acc* __restrict__ cos_new,
                    acc* __restrict__ gap_bg, acc* __restrict__ gap_new) {
  if (static_cast<int64_t>(blockIdx.x) < nb_cos) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (t >= N * HW) return;
    const int64_t n = t / HW;
    const int64_t p = t - n * HW;
    acc s[5] = {acc(0), acc(0), acc(0), acc(0), acc(0)};
    for (int cc = 0; cc < nCc; ++cc) {
      const acc* base = pp + (n * nCc + cc) * 5 * static_cast<int64_t>(HW) + p;
#pragma unroll
      for (int kq = 0; kq < 5; ++kq) s[kq] += base[static_cast<int64_t>(kq) * HW];
    }
    const acc na = clamp_min_nan(sqrt(s[2]), eps);
    const acc nb = clamp_min_nan(sqrt(s[3]), eps);
    const acc nd = clamp_min_nan(sqrt(s[4]), eps);
    cos_bg[t] = s[0] / (na * nb);
    cos_new[t] = s[1] / (na * nd);
  } else {
    // One block per (n, group of 32 channels): lane = channel, warp w sums the
    // position chunks w, w + 8, ...; the warps are then added in order.
    __shared__ acc red[3][kWarps][32];
    const int ncg = (C + 31) / 32;
    const int64_t gb = static_cast<int64_t>(blockIdx.x) - nb_cos;
    const int64_t n = gb / ncg;
    const int cg = static_cast<int>(gb - n * ncg);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = cg * 32 + lane;
    acc sa = acc(0), sb = acc(0), sd = acc(0);
    if (c < C) {
      for (int pc = warp; pc < nP; pc += kWarps) {
        const acc* base = gp + (n * nP + pc) * 3 * static_cast<int64_t>(C) + c;
        sa += base[0];
        sb += base[C];
        sd += base[2 * static_cast<int64_t>(C)];
      }
    }
    red[0][warp][lane] = sa;
    red[1][warp][lane] = sb;
    red[2][warp][lane] = sd;
    __syncthreads();
    if (warp == 0 && c < C) {
      sa = sb = sd = acc(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        sa += red[0][w][lane];
        sb += red[1][w][lane];
        sd += red[2][w][lane];
      }
      const acc inv = acc(1) / static_cast<acc>(HW);
      gap_bg[n * C + c] = fabs(sb * inv - sa * inv);
      gap_new[n * C + c] = fabs(sd * inv - sa * inv);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> md_stats_cuda(const at::Tensor& feat,
                                                                         const at::Tensor& feat_bg_erased,
                                                                         const at::Tensor& feat_new_erased,
                                                                         double eps) {
  const c10::optional<at::Tensor> none;
  check_pair("md_stats", feat, feat_bg_erased, none, none);
  check_pair("md_stats", feat, feat_new_erased, none, none);
  check_cuda_input("md_stats", feat, "feat");
  c10::cuda::CUDAGuard guard(feat.device());
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t HW = H * W;
  TORCH_CHECK(HW < (int64_t(1) << 31) && C < (int64_t(1) << 31), "lskd: md_stats: map too large");
  const auto opts = feat.options().dtype(acc_scalar_type(feat.scalar_type()));
  at::Tensor cos_bg = at::empty({N, H, W}, opts);
  at::Tensor cos_new = at::empty({N, H, W}, opts);
  at::Tensor gap_bg = at::empty({N, C}, opts);
  at::Tensor gap_new = at::empty({N, C}, opts);
  if (N == 0 || HW == 0) return std::make_tuple(cos_bg, cos_new, gap_bg, gap_new);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 sA = strides4(feat), sB = strides4(feat_bg_erased), sD = strides4(feat_new_erased);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "lskd_md_stats_cuda", [&] {
    using acc = acc_t<scalar_t>;
    // 8-byte vectors for 2-byte types (fewer accumulators per thread), 16 bytes otherwise.
    constexpr int VW = vec_width<scalar_t>() > 4 ? 4 : vec_width<scalar_t>();
    const bool vec = feat.is_contiguous() && feat_bg_erased.is_contiguous() && feat_new_erased.is_contiguous() &&
                     HW % VW == 0 && aligned16(feat.data_ptr()) && aligned16(feat_bg_erased.data_ptr()) &&
                     aligned16(feat_new_erased.data_ptr());
    const int V = vec ? VW : 1;
    const int64_t PB = 32 * V;
    const int64_t nP = ceil_div(HW, PB);
    const int64_t base = N * nP;
    const int64_t target = 8 * static_cast<int64_t>(num_sms(feat.get_device()));
    int64_t nCc = std::max<int64_t>(1, std::min<int64_t>(ceil_div(target, base), C / 32));
    const int64_t Cc = std::max<int64_t>(1, ceil_div(C, nCc));
    nCc = std::max<int64_t>(1, ceil_div(C, Cc));
    at::Tensor pp = at::empty({N * nCc * 5 * HW}, opts);
    at::Tensor gp = at::empty({N * nP * 3 * C}, opts);
    const size_t smem = static_cast<size_t>(kWarps * 5 * PB) * sizeof(acc);
    const unsigned blocks = static_cast<unsigned>(N * nCc * nP);
    if (vec) {
      md_partial_kernel<scalar_t, VW><<<blocks, kThreads, smem, stream>>>(
          feat.data_ptr<scalar_t>(), feat_bg_erased.data_ptr<scalar_t>(), feat_new_erased.data_ptr<scalar_t>(), sA,
          sB, sD, static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), static_cast<int>(nP),
          static_cast<int>(nCc), static_cast<int>(Cc), pp.data_ptr<acc>(), gp.data_ptr<acc>());
    } else {
      md_partial_kernel<scalar_t, 1><<<blocks, kThreads, smem, stream>>>(
          feat.data_ptr<scalar_t>(), feat_bg_erased.data_ptr<scalar_t>(), feat_new_erased.data_ptr<scalar_t>(), sA,
          sB, sD, static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), static_cast<int>(nP),
          static_cast<int>(nCc), static_cast<int>(Cc), pp.data_ptr<acc>(), gp.data_ptr<acc>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t nb_cos = ceil_div(N * HW, kThreads);
    const int64_t nb_gap = N * ceil_div(C, 32);  // one block per (n, 32 channels)
    md_final_kernel<acc><<<static_cast<unsigned>(nb_cos + nb_gap), kThreads, 0, stream>>>(
        pp.data_ptr<acc>(), gp.data_ptr<acc>(), N, static_cast<int>(C), static_cast<int>(HW), static_cast<int>(nCc),
        static_cast<int>(nP), static_cast<acc>(eps), nb_cos, cos_bg.data_ptr<acc>(), cos_new.data_ptr<acc>(),
        gap_bg.data_ptr<acc>(), gap_new.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(cos_bg, cos_new, gap_bg, gap_new);
}

}  // namespace
}  // namespace cuda
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("md_stats", &lskd::cuda::md_stats_cuda);
}
