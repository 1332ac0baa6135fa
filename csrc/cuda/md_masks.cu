// CUDA kernel of lskd::md_masks (the MD masks, docs/MATHEMATICS.md section 2.3). The schema is in
// csrc/md_masks.cpp; the rule, down to the rounding of every operation, is lskd/ops/md_masks.py
// (md_masks and batched_quantile), whose masks this kernel gives bit for bit.
//
// The statistics come from lskd::md_stats (called through the dispatcher, so
// csrc/cuda/md_stats.cu). Then 2 launches, whatever N, with no sort and no
// host synchronisation:
//   1. md_label_count_kernel, one block per (n, chunk of the labels of image
//      n): the numbers of old (label < O) and new (label >= O, != ignore)
//      pixels of the chunk -> partial [N, n_chunks, 2] (int32). The labels are
//      compared in their own integer type, O and ignore cast to it, as ATen's
//      comparisons with a scalar do.
//   2. md_select_mask_kernel, one block per (n, mask): block 2n makes the
//      spatial mask of image n from the rows cos_bg[n], cos_new[n] (L = H*W),
//      block 2n + 1 the channel mask from gap_bg[n], gap_new[n] (L = C).
//      The block adds the partial counts of image n (integers), forms
//      q_old = (float)n_old / (float)total and q_new (float32 IEEE division,
//      as torch's true division of an int64 sum by an int on the CPU), then
//      for each of its two rows:
//        - ranks as batched_quantile: q in the values' dtype, rank = q * (L - 1)
//          in float64 (float64 values, or float32 values when this torch's
//          quantile computes their ranks in float64: quantile_float64_ranks)
//          or float32, lo = floor(rank), hi = ceil(rank), weight = rank - lo in
//          the values' dtype;
//        - loads the row once, as order-preserving unsigned keys, into
//          dynamic shared memory (read from global memory instead when the row
//          does not fit), and ORs a NaN flag: a row holding a NaN gives NaN;
//        - radix select of the lo-th smallest key, 8-bit digits from the most
//          significant one (4 passes for float32, 8 for float64): per pass, a
//          256-bin integer histogram of the candidates (warp-aggregated shared
//          atomics), scanned by warp 0;
//        - v_hi = v_lo when hi == lo or at least hi + 1 keys are <= key(v_lo)
//          (known from the histograms), else the minimum key > key(v_lo)
//          (one more pass, block min);
//        - Q = torch.lerp(v_lo, v_hi, weight) with torch's CPU rounding:
//          weight < 0.5 ? fma(weight, v_hi - v_lo, v_lo)
//                       : fma(weight - 1, v_hi - v_lo, v_hi),
//          each operation rounded once (ATen's lerp is compiled with FMA
//          contraction; checked bitwise against torch.lerp on the CPU).
//      Then it writes the mask: bg >= Q_bg || new <= Q_new. The comparisons
//      are made on the keys with -0.0 mapped to +0.0 (so -0 == +0, and a
//      subnormal is not flushed to zero by --use_fast_math); a NaN Q gives
//      false, as in the composite.
//   Everything is integer counting, min and fixed-order float arithmetic:
//   deterministic. The float32 arithmetic is inline PTX without .ftz
//   (setup.py compiles with --use_fast_math, which would flush subnormals and
//   make divisions approximate).
//   -0.0 sorts before +0.0 here while torch.sort may put them in any order;
//   both give a zero of some sign for v_lo / v_hi and the same Q up to the
//   sign of a zero, hence the same masks.
#include "device_utils.cuh"
#include "md_masks.h"
#include "md_stats.h"

#include <algorithm>
#include <cmath>
#include <tuple>

namespace lskd {
namespace cuda {
namespace {

constexpr int kBins = 256;              // 8-bit digits
constexpr int kSelectMaxThreads = 1024;  // threads of md_select_mask_kernel (at most)

// ---------------------------------------------------------------------------
// Exact float32 arithmetic (round to nearest, no FMA contraction, no flush to
// zero whatever the nvcc flags).
// The CPU emulation of the kernels (tests/cuda_emu, LSKD_CUDA_EMULATION) uses
// host float arithmetic, which is exactly that (built with -ffp-contract=off).
#ifdef LSKD_CUDA_EMULATION
__device__ __forceinline__ float f32_mul(float a, float b) { return a * b; }
__device__ __forceinline__ float f32_sub(float a, float b) { return a - b; }
__device__ __forceinline__ float f32_div(float a, float b) { return a / b; }
__device__ __forceinline__ float f32_fma(float a, float b, float c) { return std::fma(a, b, c); }
#else
__device__ __forceinline__ float f32_mul(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f32_sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f32_div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f32_fma(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}
#endif

// ---------------------------------------------------------------------------
// Order-preserving keys: key(x) < key(y) iff x < y for non-NaN x, y (with
// -0.0 < +0.0); ckey maps -0.0 to +0.0 first (for the comparisons).
template <typename acc>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using K = unsigned int;
  static constexpr int kBits = 32;
  static constexpr K kSign = 0x80000000u;
  static __device__ __forceinline__ bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
  static __device__ __forceinline__ K key_of_bits(K u) { return (u & kSign) ? ~u : (u | kSign); }
  static __device__ __forceinline__ K key(float x) { return key_of_bits(__float_as_uint(x)); }
  static __device__ __forceinline__ K ckey(float x) {
    const K u = __float_as_uint(x);
    return key_of_bits(u == kSign ? K(0) : u);
  }
  static __device__ __forceinline__ float value(K k) { return __uint_as_float((k & kSign) ? (k & ~kSign) : ~k); }
  static __device__ __forceinline__ float nan() { return __uint_as_float(0x7fc00000u); }
};

template <>
struct KeyTraits<double> {
  using K = unsigned long long;
  static constexpr int kBits = 64;
  static constexpr K kSign = 0x8000000000000000ull;
  static __device__ __forceinline__ K bits(double x) { return static_cast<K>(__double_as_longlong(x)); }
  static __device__ __forceinline__ bool is_nan(double x) { return (bits(x) & ~kSign) > 0x7ff0000000000000ull; }
  static __device__ __forceinline__ K key_of_bits(K u) { return (u & kSign) ? ~u : (u | kSign); }
  static __device__ __forceinline__ K key(double x) { return key_of_bits(bits(x)); }
  static __device__ __forceinline__ K ckey(double x) {
    const K u = bits(x);
    return key_of_bits(u == kSign ? K(0) : u);
  }
  static __device__ __forceinline__ double value(K k) {
    return __longlong_as_double(static_cast<long long>((k & kSign) ? (k & ~kSign) : ~k));
  }
  static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000ll); }
};

// ---------------------------------------------------------------------------
// Ranks and interpolation of batched_quantile (lskd/ops/md_masks.py).
template <typename acc>
struct Rank {
  int lo, hi;
  acc weight;
};

__device__ __forceinline__ Rank<float> make_rank(float q, int L, bool float64_ranks, float* /*tag*/) {
  Rank<float> r;
  if (float64_ranks) {
    const double rank = __dmul_rn(static_cast<double>(q), static_cast<double>(L - 1));
    const double below = floor(rank);
    r.lo = static_cast<int>(below);
    r.hi = static_cast<int>(ceil(rank));
    r.weight = __double2float_rn(__dsub_rn(rank, below));
  } else {
    const float rank = f32_mul(q, __int2float_rn(L - 1));
    const float below = floorf(rank);
    r.lo = static_cast<int>(below);
    r.hi = static_cast<int>(ceilf(rank));
    r.weight = f32_sub(rank, below);
  }
  return r;
}

// float64 values: the ranks are float64 either way.
__device__ __forceinline__ Rank<double> make_rank(float q, int L, bool /*float64_ranks*/, double* /*tag*/) {
  Rank<double> r;
  const double rank = __dmul_rn(static_cast<double>(q), static_cast<double>(L - 1));
  const double below = floor(rank);
  r.lo = static_cast<int>(below);
  r.hi = static_cast<int>(ceil(rank));
  r.weight = __dsub_rn(rank, below);
  return r;
}

// torch.lerp as ATen's CPU kernel rounds it (one rounding per operation, FMA).
__device__ __forceinline__ float lerp_exact(float a, float b, float w) {
  const float d = f32_sub(b, a);
  return fabsf(w) < 0.5f ? f32_fma(w, d, a) : f32_fma(f32_sub(w, 1.0f), d, b);
}
__device__ __forceinline__ double lerp_exact(double a, double b, double w) {
  const double d = __dsub_rn(b, a);
  return fabs(w) < 0.5 ? __fma_rn(w, d, a) : __fma_rn(__dsub_rn(w, 1.0), d, b);
}

// ---------------------------------------------------------------------------
// Block reductions used by the selection (blockDim.x a multiple of 32).

template <typename K>
__device__ __forceinline__ K warp_min(K v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const K u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}

// Minimum over the block, returned to every thread.
template <typename K>
__device__ __forceinline__ K block_min_all(K v) {
  __shared__ K part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_min(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  K r = part[0];
  for (int i = 1; i < nw; ++i) r = part[i] < r ? part[i] : r;
  __syncthreads();  // part may be reused by a later call
  return r;
}

// Shared state of the radix select (one selection at a time per block).
struct SelectState {
  int digit;  // bin of the wanted key in the last pass
  int k;      // rank of the wanted key among the candidates of the next pass
  int eq;     // candidates in that bin (after the last pass: keys equal to the result)
};

// Q(row, q) of batched_quantile for one row of L values (every thread gets it).
// kSmem: the row's keys are staged in skeys (L entries); else they are read
// from global memory in every pass.
template <typename acc, bool kSmem>
__device__ acc row_quantile(const acc* __restrict__ row, int L, float q, bool float64_ranks,
                            typename KeyTraits<acc>::K* __restrict__ skeys, int* __restrict__ hist,
                            SelectState* st) {
  using KT = KeyTraits<acc>;
  using K = typename KT::K;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5;
  const Rank<acc> rk = make_rank(q, L, float64_ranks, static_cast<acc*>(nullptr));

  bool nan = false;
  for (int i = tid; i < L; i += nt) {
    const acc x = row[i];
    nan |= KT::is_nan(x);
    if constexpr (kSmem) skeys[i] = KT::key(x);
  }
  // Also the barrier after which skeys is visible to the whole block.
  if (__syncthreads_or(nan)) return KT::nan();

  K prefix = 0, fixed = 0;  // digits found so far, and the bits they occupy
  int k = rk.lo;
  for (int shift = KT::kBits - 8; shift >= 0; shift -= 8) {
    for (int b = tid; b < kBins; b += nt) hist[b] = 0;
    __syncthreads();
    // Warp-uniform loop: every lane takes part in __match_any_sync.
    for (int base = 0; base < L; base += nt) {
      const int i = base + tid;
      int d = kBins;  // not a candidate
      if (i < L) {
        const K key = kSmem ? skeys[i] : KT::key(row[i]);
        if ((key & fixed) == prefix) d = static_cast<int>((key >> shift) & K(0xff));
      }
      const unsigned peers = __match_any_sync(0xffffffffu, d);
      if (d < kBins && lane == __ffs(peers) - 1) atomicAdd(&hist[d], __popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
      int c[kBins / 32];
      int s = 0;
#pragma unroll
      for (int j = 0; j < kBins / 32; ++j) {
        c[j] = hist[lane * (kBins / 32) + j];
        s += c[j];
      }
      int incl = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += u;
      }
      const int excl = incl - s;
      if (excl <= k && k < incl) {  // exactly one lane
        int cum = excl, bin = -1, below = 0, eq = 0;
#pragma unroll
        for (int j = 0; j < kBins / 32; ++j) {
          if (bin < 0 && k < cum + c[j]) {
            bin = j;
            below = cum;
            eq = c[j];
          }
          cum += c[j];
        }
        st->digit = lane * (kBins / 32) + bin;
        st->k = k - below;
        st->eq = eq;
      }
    }
    __syncthreads();
    prefix |= static_cast<K>(st->digit) << shift;
    fixed |= K(0xff) << shift;
    k = st->k;
  }
  // prefix is the key of the lo-th smallest value; (lo - k) keys are below it, st->eq equal to it.
  const int count_le = (rk.lo - k) + st->eq;
  const acc v_lo = KT::value(prefix);
  acc v_hi = v_lo;
  if (rk.hi != rk.lo && count_le <= rk.hi) {
    K m = ~K(0);
    for (int i = tid; i < L; i += nt) {
      const K key = kSmem ? skeys[i] : KT::key(row[i]);
      if (key > prefix && key < m) m = key;
    }
    v_hi = KT::value(block_min_all(m));
  }
  // A later selection first writes skeys, hist and st after barriers that every
  // thread reaches only after its last read of them here.
  return lerp_exact(v_lo, v_hi, rk.weight);
}

// partial[(n * n_chunks + chunk) * 2 + {0, 1}] = old / new pixels of the chunk.
// V > 1: 16-byte vector loads (per_image % V == 0, aligned).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    md_label_count_kernel(const T* __restrict__ labels, int64_t per_image, int64_t chunk, int n_chunks, T old_c,
                          T ignore, int* __restrict__ partial) {
  const int64_t blk = blockIdx.x;
  const int64_t n = blk / n_chunks;
  const int64_t ck = blk - n * n_chunks;
  const int64_t begin = ck * chunk;
  const int64_t end = begin + chunk < per_image ? begin + chunk : per_image;
  const T* p = labels + n * per_image;
  int c_old = 0, c_new = 0;
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += static_cast<int64_t>(blockDim.x) * V) {
    if constexpr (V > 1) {
      const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const bool o = pk.v[j] < old_c;
        c_old += o;
        c_new += !o && pk.v[j] != ignore;
      }
    } else {
      const T v = p[i];
      const bool o = v < old_c;
      c_old += o;
      c_new += !o && v != ignore;
    }
  }
  c_old = block_sum(c_old);
  c_new = block_sum(c_new);
  if (threadIdx.x == 0) {
    partial[blk * 2] = c_old;
    partial[blk * 2 + 1] = c_new;
  }
}

// Block 2n: spatial mask of image n (rows cos_bg[n], cos_new[n]); block 2n + 1:
// channel mask (rows gap_bg[n], gap_new[n]). Dynamic shared memory (kSmem):
// max(HW, C) keys.
template <typename acc, bool kSmem>
__global__ void __launch_bounds__(kSelectMaxThreads, 1)
    md_select_mask_kernel(const acc* __restrict__ cos_bg, const acc* __restrict__ cos_new,
                          const acc* __restrict__ gap_bg, const acc* __restrict__ gap_new,
                          const int* __restrict__ partial, int n_chunks, int64_t total, int HW, int C,
                          bool float64_ranks, bool* __restrict__ spatial, bool* __restrict__ channel) {
  using KT = KeyTraits<acc>;
  using K = typename KT::K;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  K* skeys = reinterpret_cast<K*>(smem_raw);
  __shared__ int hist[kBins];
  __shared__ SelectState st;
  __shared__ float s_q[2];

  const int64_t n = blockIdx.x >> 1;
  const bool is_spatial = (blockIdx.x & 1) == 0;
  const int L = is_spatial ? HW : C;
  if (L == 0) return;  // block-uniform
  const acc* bg = is_spatial ? cos_bg + n * HW : gap_bg + n * C;
  const acc* nw = is_spatial ? cos_new + n * HW : gap_new + n * C;
  bool* out = is_spatial ? spatial + n * HW : channel + n * C;

  long long c_old = 0, c_new = 0;
  for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) {
    c_old += partial[(n * n_chunks + i) * 2];
    c_new += partial[(n * n_chunks + i) * 2 + 1];
  }
  c_old = block_sum(c_old);
  c_new = block_sum(c_new);
  if (threadIdx.x == 0) {
    const float t = __ll2float_rn(total);
    s_q[0] = f32_div(__ll2float_rn(c_old), t);
    s_q[1] = f32_div(__ll2float_rn(c_new), t);
  }
  __syncthreads();
  const acc q_bg = row_quantile<acc, kSmem>(bg, L, s_q[0], float64_ranks, skeys, hist, &st);
  const acc q_new = row_quantile<acc, kSmem>(nw, L, s_q[1], float64_ranks, skeys, hist, &st);

  const bool use_bg = !KT::is_nan(q_bg), use_new = !KT::is_nan(q_new);
  const K k_bg = KT::ckey(q_bg), k_new = KT::ckey(q_new);
  // A NaN value only occurs in a row whose Q is NaN (then that side is false).
  for (int i = threadIdx.x; i < L; i += blockDim.x) {
    out[i] = (use_bg && KT::ckey(bg[i]) >= k_bg) || (use_new && KT::ckey(nw[i]) <= k_new);
  }
}


// Dynamic shared memory md_select_mask_kernel may use: what one block may opt in
// to, less its static shared memory (hist, reductions) and a margin. Cached; no
// synchronisation.
int64_t max_dynamic_smem(int device) {
  static int64_t cache[64] = {0};  // value + 1, 0: not queried yet
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device] - 1;
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t r = std::max<int64_t>(0, static_cast<int64_t>(v) - 4 * 1024);
  if (device >= 0 && device < 64) cache[device] = r + 1;
  return r;
}

template <typename acc, bool kSmem>
void launch_select(int64_t N, int threads, size_t smem, cudaStream_t stream, const at::Tensor& cos_bg,
                   const at::Tensor& cos_new, const at::Tensor& gap_bg, const at::Tensor& gap_new,
                   const at::Tensor& partial, int n_chunks, int64_t total, int64_t HW, int64_t C, bool float64_ranks,
                   at::Tensor& spatial, at::Tensor& channel) {
  auto kernel = md_select_mask_kernel<acc, kSmem>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(2 * N), threads, smem, stream>>>(
      cos_bg.data_ptr<acc>(), cos_new.data_ptr<acc>(), gap_bg.data_ptr<acc>(), gap_new.data_ptr<acc>(),
      partial.data_ptr<int>(), n_chunks, total, static_cast<int>(HW), static_cast<int>(C), float64_ranks,
      spatial.data_ptr<bool>(), channel.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> md_masks_cuda(const at::Tensor& feat, const at::Tensor& feat_bg_erased,
                                                 const at::Tensor& feat_new_erased, const at::Tensor& labels,
                                                 int64_t old_classes, int64_t ignore_index, double eps) {
  check_md_masks_args(feat, labels);
  check_cuda_input("md_masks", feat, "feat");
  const bool float64_ranks = ::lskd::quantile_float64_ranks();
  c10::cuda::CUDAGuard guard(feat.device());
  // Nothing here is differentiable (the outputs are bool): skip the autograd layer of md_stats.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto stats = call_md_stats(feat, feat_bg_erased, feat_new_erased, eps);
  const at::Tensor cos_bg = std::get<0>(stats).contiguous(), cos_new = std::get<1>(stats).contiguous();
  const at::Tensor gap_bg = std::get<2>(stats).contiguous(), gap_new = std::get<3>(stats).contiguous();
  const int64_t N = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t HW = H * W;
  // int indices in the kernels, with room for one more step of a block.
  const int64_t max_len = (int64_t(1) << 31) - 1 - kSelectMaxThreads;
  TORCH_CHECK(HW <= max_len && C <= max_len, "lskd: md_masks: map too large");
  const auto bool_opts = feat.options().dtype(at::kBool);
  at::Tensor spatial = at::empty({N, 1, H, W}, bool_opts);
  at::Tensor channel = at::empty({N, C}, bool_opts);
  if (N == 0 || (HW == 0 && C == 0)) return std::make_tuple(spatial, channel);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = feat.get_device();

  // 1. label counts: about 4 blocks per SM, chunks of at least 16 elements per thread.
  const at::Tensor lab = labels.contiguous();
  const int64_t total = lab.size(1) * lab.size(2);
  const int64_t min_chunk = static_cast<int64_t>(kThreads) * 16;
  int64_t n_chunks = std::max<int64_t>(1, std::min(ceil_div(4 * num_sms(device), N), ceil_div(total, min_chunk)));
  n_chunks = std::max(n_chunks, ceil_div(total, int64_t(1) << 30));  // int32 partial counts
  at::Tensor partial;
  AT_DISPATCH_INTEGRAL_TYPES(lab.scalar_type(), "lskd_md_masks_labels", [&] {
    constexpr int VW = vec_width<scalar_t>();
    const bool vec = total % VW == 0 && aligned16(lab.data_ptr());
    const int64_t step = vec ? VW : 1;
    const int64_t chunk = ceil_div(ceil_div(total, n_chunks), step) * step;
    n_chunks = ceil_div(total, chunk);
    partial = at::empty({N * n_chunks * 2}, feat.options().dtype(at::kInt));
    const scalar_t old_c = static_cast<scalar_t>(old_classes), ignore = static_cast<scalar_t>(ignore_index);
    const unsigned blocks = static_cast<unsigned>(N * n_chunks);
    if (vec) {
      md_label_count_kernel<scalar_t, VW><<<blocks, kThreads, 0, stream>>>(
          lab.data_ptr<scalar_t>(), total, chunk, static_cast<int>(n_chunks), old_c, ignore, partial.data_ptr<int>());
    } else {
      md_label_count_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
          lab.data_ptr<scalar_t>(), total, chunk, static_cast<int>(n_chunks), old_c, ignore, partial.data_ptr<int>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // 2. selection and masks: one block per (image, mask).
  const int64_t L_max = std::max(HW, C);
  const int threads = L_max >= 8192 ? 1024 : (L_max >= 2048 ? 512 : 256);
  AT_DISPATCH_FLOATING_TYPES(cos_bg.scalar_type(), "lskd_md_masks_cuda", [&] {
    using acc = scalar_t;
    using K = typename KeyTraits<acc>::K;
    const int64_t bytes = L_max * static_cast<int64_t>(sizeof(K));
    if (bytes <= max_dynamic_smem(device)) {
      launch_select<acc, true>(N, threads, static_cast<size_t>(bytes), stream, cos_bg, cos_new, gap_bg, gap_new,
                               partial, static_cast<int>(n_chunks), total, HW, C, float64_ranks, spatial, channel);
    } else {
      launch_select<acc, false>(N, threads, 0, stream, cos_bg, cos_new, gap_bg, gap_new, partial,
                                static_cast<int>(n_chunks), total, HW, C, float64_ranks, spatial, channel);
    }
  });
  return std::make_tuple(spatial, channel);
}

}  // namespace
}  // namespace cuda
}  // namespace lskd

TORCH_LIBRARY_IMPL(lskd, CUDA, m) {
  m.impl("md_masks", &lskd::cuda::md_masks_cuda);
}
