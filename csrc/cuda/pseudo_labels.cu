// CUDA kernel of lskd::pseudo_labels (PLOP's entropy pseudo-labels on bilinearly upsampled teacher
// logits, fused). The definition and the input checks are in csrc/pseudo_labels.cpp.
//
// One launch, pseudo_labels_kernel: one thread per output pixel, blocks of kThreads pixels of one
// image (grid: N * tiles), as ce_unkd's kernel. A thread reads its pixel's label v; a pixel that is
// not eligible (v >= O) keeps it and never reads the teacher. An eligible one interpolates its O
// teacher logits from the four low-resolution neighbours (the rule of device_utils.cuh; a
// neighbour of weight 0 is not read, so that its NaN does not leak into the pixel, as on the CPU)
// in each of its two passes over the classes, so that nothing is stored at the output resolution
// and nothing per class (any O):
//   1. pixel_argmax: c* = the first class of largest logit, a NaN the largest (the first NaN wins,
//      as torch.max), and m = t[c*];
//   2. pixel_entropy: S = sum exp(t_c - m) and sum exp(t_c - m) (t_c - m) in one pass (m is the
//      max, so S >= 1: no overflow; a NaN m gives a NaN entropy, never accepted), then the
//      normalised entropy (log S - sum / S) / log O (0 for O = 1: no pass at all).
// The thread writes targets = c* where entropy < thresholds[c*], ignore_index otherwise. The
// per-image counts (accepted, eligible) are summed over the block as integers (exact in any order)
// and added with one integer atomicAdd per block: the result is deterministic.
#include "pseudo_labels.h"
#include "device_utils.cuh"

#include <cmath>
#include <tuple>

namespace lskd {

namespace cuda {
namespace {

struct PseudoGeom {
  int h, w, H, W;  // teacher map [h, w], labels [H, W]
  int O;           // teacher classes
  int tiles;       // blocks per image
  int64_t ignore_index;
};

// One output pixel's teacher logits, interpolated from the four low-resolution neighbours of each
// class plane again on every read (tn: the image's teacher, tc: its class stride).
template <typename scalar_t, typename acc>
struct TeacherPixel {
  const scalar_t* tn;
  int64_t tc;
  Bilinear<acc> b;
  __device__ __forceinline__ acc t(int c) const { return b.at(tn + c * tc); }
};

// 1. c* = the first class of largest t (the first NaN, once one is met: as torch.max); m = t[c*].
template <typename scalar_t, typename acc>
__device__ __forceinline__ int pixel_argmax(const TeacherPixel<scalar_t, acc>& src, int O, acc& m) {
  int best = 0;
  acc mb = src.t(0);
  for (int c = 1; c < O; ++c) {
    const acc v = src.t(c);
    // !(v <= mb): v larger or NaN; mb == mb: no NaN met yet (a NaN max is kept); ties keep the first
    if (mb == mb && !(v <= mb)) {
      mb = v;
      best = c;
    }
  }
  m = mb;
  return best;
}

// 2. the Shannon entropy of softmax(t) divided by log O (O >= 2), relative to the max m.
template <typename scalar_t, typename acc>
__device__ __forceinline__ acc pixel_entropy(const TeacherPixel<scalar_t, acc>& src, int O, acc m, acc log_o) {
  acc S = acc(0), ed = acc(0);
  for (int c = 0; c < O; ++c) {
    const acc d = src.t(c) - m;
    const acc e = exp_acc(d);
    S += e;
    ed += e * d;
  }
  return (log_acc(S) - ed / S) / log_o;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pseudo_labels_kernel(const scalar_t* __restrict__ t, Strides4 st, const int64_t* __restrict__ labels,
                         const acc_t<scalar_t>* __restrict__ thresholds, PseudoGeom G, acc_t<scalar_t> scale_h,
                         acc_t<scalar_t> scale_w, acc_t<scalar_t> log_o, int64_t* __restrict__ targets,
                         int64_t* __restrict__ accepted, int64_t* __restrict__ eligible) {
  using acc = acc_t<scalar_t>;
  const int64_t blk = blockIdx.x;
  const int64_t n = blk / G.tiles;
  const int p = static_cast<int>(blk - n * G.tiles) * kThreads + static_cast<int>(threadIdx.x);

  int n_acc = 0, n_elig = 0;
  if (p < G.H * G.W) {  // inactive threads still take part in the block sums below
    const int64_t i = n * G.H * G.W + p;
    const int64_t v = labels[i];
    int64_t y = v;
    if (v < G.O) {  // eligible: relabelled from the teacher
      n_elig = 1;
      int cs = 0;
      acc entropy = acc(0);
      if (G.O > 1) {
        TeacherPixel<scalar_t, acc> src;
        int i0, i1, j0, j1;
        bilinear_source(p, G.W, G.h, G.w, scale_h, scale_w, i0, i1, j0, j1, src.b);
        src.b.set_offsets(i0, i1, j0, j1, st.h, st.w);
        src.tn = t + n * st.n;
        src.tc = st.c;
        acc m;
        cs = pixel_argmax(src, G.O, m);
        entropy = pixel_entropy(src, G.O, m, log_o);
      }
      if (entropy < thresholds[cs]) {  // false for a NaN entropy
        y = cs;
        n_acc = 1;
      } else {
        y = G.ignore_index;
      }
    }
    targets[i] = y;
  }

  // per-image counts: the block's sums (integers: exact), then one atomicAdd each
  const int a = block_sum(n_acc);
  const int e = block_sum(n_elig);
  if (threadIdx.x == 0) {
    if (a != 0) atomicAdd(reinterpret_cast<unsigned long long*>(accepted + n), static_cast<unsigned long long>(a));
    if (e != 0) atomicAdd(reinterpret_cast<unsigned long long*>(eligible + n), static_cast<unsigned long long>(e));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pseudo_labels_cuda(const at::Tensor& teacher, const at::Tensor& labels,
                                                                  const at::Tensor& thresholds, int64_t ignore_index) {
  const int64_t O = check_pseudo_labels(teacher, labels, thresholds);
  check_cuda_input("pseudo_labels", teacher, "teacher");
  c10::cuda::CUDAGuard guard(teacher.device());
  auto out = pseudo_labels_outputs(labels);  // accepted, eligible zero-filled
  const int64_t N = labels.size(0), H = labels.size(1), W = labels.size(2);
  if (N == 0) return out;
  TORCH_CHECK(O < (int64_t(1) << 31) && N * ceil_div(H * W, kThreads) < (int64_t(1) << 31),
              "lskd: pseudo_labels: input too large");
  PseudoGeom G;
  G.h = static_cast<int>(teacher.size(2));
  G.w = static_cast<int>(teacher.size(3));
  G.H = static_cast<int>(H);
  G.W = static_cast<int>(W);
  G.O = static_cast<int>(O);
  G.tiles = static_cast<int>(ceil_div(H * W, kThreads));
  G.ignore_index = ignore_index;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 st = strides4(teacher);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "lskd_pseudo_labels_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc scale_h = static_cast<acc>(G.h) / static_cast<acc>(G.H);
    const acc scale_w = static_cast<acc>(G.w) / static_cast<acc>(G.W);
    const acc log_o = std::log(static_cast<acc>(O));
    pseudo_labels_kernel<scalar_t><<<static_cast<unsigned>(N * G.tiles), kThreads, 0, stream>>>(
        teacher.data_ptr<scalar_t>(), st, labels.data_ptr<int64_t>(), thresholds.data_ptr<acc>(), G, scale_h, scale_w,
        log_o, std::get<0>(out).data_ptr<int64_t>(), std::get<1>(out).data_ptr<int64_t>(),
        std::get<2>(out).data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("pseudo_labels", &lskd::cuda::pseudo_labels_cuda);
}
