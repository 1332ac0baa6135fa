// Device helpers shared by the CUDA kernels of lskd (csrc/cuda/*.cu).
//
// Everything here is either a template or `inline`, so that several
// translation units can include it. Only the CUDA headers allowed for this
// project are used (no ATen/cuda/CUDAContext.h).
//
// Determinism: every reduction below has a fixed order for a fixed launch
// configuration (warp butterflies, then warps in index order); nothing uses
// floating-point atomics.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "common.h"

namespace lskd {
namespace cuda {

// Threads per block of every lskd kernel (8 warps).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Dynamic shared memory the kernels plan with (below the 48 KiB that needs no
// opt-in; static shared memory of block_sum comes on top).
constexpr int64_t kSmemBudget = 44 * 1024;

// ---------------------------------------------------------------------------
// Loads, stores and conversions.

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}

// V elements of T in one aligned memory transaction (16 bytes for the V that
// vec_width<T>() gives).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements per 16-byte vector: float 4, double 2, half/bfloat16 8.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Loads V consecutive elements at p (p aligned to sizeof(T) * V) as acc_t.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t<T> (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = to_acc(pk.v[k]);
}

// Stores V acc_t values as T at p (aligned to sizeof(T) * V).
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const acc_t<T> (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// max(x, lo) that keeps a NaN x (like torch.clamp_min).
template <typename T>
__device__ __forceinline__ T clamp_min_nan(T x, T lo) {
  return x < lo ? lo : x;
}

// grad / dist, or 0 where dist == 0 (a NaN dist still gives NaN).
template <typename T>
__device__ __forceinline__ T safe_ratio(T g, T d) {
  return d == T(0) ? T(0) : g / d;
}

// exp and log in the accumulation type (expf / logf for float).
__device__ __forceinline__ float exp_acc(float x) {
  return expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
  return exp(x);
}
__device__ __forceinline__ float log_acc(float x) {
  return logf(x);
}
__device__ __forceinline__ double log_acc(double x) {
  return log(x);
}

// ---------------------------------------------------------------------------
// Bilinear upsampling at one output pixel (torch's upsample_bilinear2d, align_corners=False, with
// an output size): the kernels that read logits at a higher resolution (ce_unkd, pseudo_labels)
// interpolate them from the four low-resolution neighbours instead of storing the upsampled map.

// Source index pair and weights of output index o along an axis of `in` inputs (upsample_bilinear2d,
// align_corners=False, scale = in / out computed on the host).
template <typename acc>
__device__ __forceinline__ void source_index(int o, int in, acc scale, int& i0, int& i1, acc& l0, acc& l1) {
  acc src = scale * (static_cast<acc>(o) + acc(0.5)) - acc(0.5);
  if (src < acc(0)) src = acc(0);
  i0 = min(static_cast<int>(src), in - 1);
  l1 = src - static_cast<acc>(i0);
  l0 = acc(1) - l1;
  // a neighbour of weight 0 is not read: 0 * NaN would leak one pixel's NaN (or inf) into the next
  i1 = i0 + (i0 < in - 1 && l1 != acc(0) ? 1 : 0);
}

// The four neighbours of a pixel in one tensor (element offsets) and the interpolation weights.
template <typename acc>
struct Bilinear {
  int64_t o00, o01, o10, o11;
  acc l0y, l1y, l0x, l1x;
  // The offsets of rows i0, i1 and columns j0, j1 in a plane of row stride sh and column stride sw.
  __device__ __forceinline__ void set_offsets(int i0, int i1, int j0, int j1, int64_t sh, int64_t sw) {
    o00 = i0 * sh + j0 * sw;
    o01 = i0 * sh + j1 * sw;
    o10 = i1 * sh + j0 * sw;
    o11 = i1 * sh + j1 * sw;
  }
  template <typename T>
  __device__ __forceinline__ acc at(const T* __restrict__ p) const {
    return l0y * (l0x * to_acc(p[o00]) + l1x * to_acc(p[o01])) + l1y * (l0x * to_acc(p[o10]) + l1x * to_acc(p[o11]));
  }
};

// Output pixel p (flat) of a map of W columns upsampled from an [h, w] one (scale_h = h / H,
// scale_w = w / W): the rows i0, i1 and columns j0, j1 of its four neighbours and the weights in b
// (b's offsets are left to set_offsets: they depend on the tensor's strides).
template <typename acc>
__device__ __forceinline__ void bilinear_source(int p, int W, int h, int w, acc scale_h, acc scale_w, int& i0, int& i1,
                                                int& j0, int& j1, Bilinear<acc>& b) {
  const int r = p / W, q = p - (p / W) * W;
  source_index(r, h, scale_h, i0, i1, b.l0y, b.l1y);
  source_index(q, w, scale_w, j0, j1, b.l0x, b.l1x);
}

// ---------------------------------------------------------------------------
// Walking a plane of W columns in steps of `step` flat elements without a
// division per step: (r, q) is the row and column of the current element.
struct PlaneWalker {
  int r, q, dr, dq, W;
  __device__ __forceinline__ void init(int e0, int step, int width) {
    W = width;
    r = e0 / W;
    q = e0 - r * W;
    dr = step / W;
    dq = step - dr * W;
  }
  __device__ __forceinline__ void advance() {
    q += dq;
    r += dr;
    if (q >= W) {
      q -= W;
      ++r;
    }
  }
};

// ---------------------------------------------------------------------------
// Deterministic reductions.

// Butterfly sum over the 32 lanes; every lane gets the same (bitwise) value.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is
// valid in thread 0. Every thread of the block must call it. Contains
// __syncthreads() and may be called several times in a kernel.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_part[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  T r = T(0);
  if (warp == 0) {
    r = lane < nw ? warp_part[lane] : T(0);
    r = warp_sum(r);
  }
  __syncthreads();  // warp_part may be reused by a later call
  return r;
}

// out[n] = sqrt(sum_{i < per_n} partial[n * per_n + i]): one block per n,
// fixed summation order. The second launch of the distance ops.
template <typename acc>
__global__ void __launch_bounds__(kThreads) sum_sqrt_kernel(const acc* __restrict__ partial, int64_t per_n,
                                                             acc* __restrict__ out) {
  const int64_t n = blockIdx.x;
  const acc* p = partial + n * per_n;
  acc s = acc(0);
  for (int64_t i = threadIdx.x; i < per_n; i += blockDim.x) s += p[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[n] = sqrt(s);
}

// ---------------------------------------------------------------------------
// Host helpers.

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Number of SMs of a device (cached; no synchronisation).
inline int num_sms(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (v <= 0) v = 1;
  if (device >= 0 && device < 64) cache[device] = v;
  return v;
}

template <typename acc>
inline const acc* opt_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<acc>() : nullptr;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads of a one-block-per-plane kernel: 128 for small planes (more planes
// in flight per SM), kThreads otherwise. The kernels take it from blockDim.x.
inline int plane_threads(int64_t plane_elems) { return plane_elems <= 2048 ? 128 : kThreads; }

// Launches sum_sqrt_kernel on the current stream: out[n] = sqrt(sum of per_n partials).
template <typename acc>
inline void launch_sum_sqrt(const at::Tensor& partial, int64_t per_n, at::Tensor& out, cudaStream_t stream) {
  const int64_t N = out.numel();
  if (N == 0) return;
  sum_sqrt_kernel<acc><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(partial.data_ptr<acc>(), per_n,
                                                                           out.data_ptr<acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void check_cuda_input(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lskd: ", op, ": ", name, " must be a CUDA tensor");
}

// Checks a 1-D [N] acc tensor (grad_dist, dist) on the device of `like`.
inline void check_vec_n(const char* op, const at::Tensor& t, const char* name, int64_t N, const at::Tensor& like) {
  const auto acc = acc_scalar_type(like.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "lskd: ", op, ": ", name, " must be [", N, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "lskd: ", op, ": ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "lskd: ", op, ": ", name, " must be on ", like.device());
}

}  // namespace cuda
}  // namespace lskd
