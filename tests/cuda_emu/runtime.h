// CPU emulation of the CUDA execution model, for testing lskd's CUDA kernels
// (csrc/cuda/*.cu) on machines without a GPU. Test infrastructure only: it is
// force-included (-include) when tests/cuda_emu/build.py compiles the CUDA
// sources as C++ for the CPU.
//
// Model:
//   * A launch runs its blocks one after the other. The threads of a block are
//     fibers (ucontext) on the calling OS thread, scheduled cooperatively: a
//     fiber runs until it reaches a barrier (__syncthreads, __syncthreads_or)
//     or a warp-level operation (__shfl_*_sync, __match_any_sync), which are
//     the only points where threads exchange data in these kernels. A missing
//     barrier therefore shows up as wrong results (a thread reads shared memory
//     before the others have written it), not as a silent race.
//   * __shared__ variables are function-local statics (one block at a time);
//     dynamic shared memory is a per-launch buffer filled with 0xFF bytes (NaN
//     for floats), so that reads of never-written shared memory show.
//   * Warp operations require the full mask and every lane of the warp to take
//     part; a block barrier that not every live thread reaches, or a warp
//     operation with missing lanes, is reported as an error (divergence).
//   * A launch checks the block size (<= 1024 threads) and the dynamic shared
//     memory (<= 48 KiB unless cudaFuncSetAttribute raised the kernel's limit,
//     and <= the device's opt-in limit).
//   * Float arithmetic is the host's (IEEE, round to nearest, no FMA
//     contraction: build with -ffp-contract=off); the explicit intrinsics
//     (__fma_rn, __dmul_rn, ...) round as on the GPU.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- CUDA types and runtime stubs

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace lskd_emu_rt {

// ---------------------------------------------------------------- device attributes

struct Device {
  int sms = 4;                       // cudaDevAttrMultiProcessorCount
  int smem_optin = 227 * 1024;       // cudaDevAttrMaxSharedMemoryPerBlockOptin (H100)
  std::map<const void*, int> func_max_dyn_smem;
  int64_t launches = 0;
  std::vector<int64_t> kernels;  // address of each kernel launched (cleared by the reader)
};
inline Device& device() {
  static Device d;
  return d;
}

// ---------------------------------------------------------------- fibers

enum class State { Ready, BlockBarrier, WarpOp, Done };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // uninitialised: only the pages a fiber uses are touched
  State state = State::Done;
  dim3 tid;
  uint64_t deposit = 0;  // value handed to a warp op / __syncthreads_or
  int site = 0;          // source line of the barrier or warp op the fiber waits at
};

constexpr size_t kStackBytes = 256 * 1024;

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int cur = -1;
  int nthreads = 0;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<uint64_t> published;  // warp-op values of the last release, per thread
  int block_or = 0;                 // result of the last __syncthreads_or
  std::function<void()> body;
  std::vector<unsigned char> dyn_smem;
};
inline BlockRun& run() {
  static BlockRun r;
  return r;
}
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline Fiber& self() { return run().fibers[run().cur]; }
inline void park(State s, int site) {
  BlockRun& r = run();
  r.fibers[r.cur].state = s;
  r.fibers[r.cur].site = site;
  swapcontext(&r.fibers[r.cur].ctx, &r.sched);
}
inline void fiber_entry() {
  BlockRun& r = run();
  r.body();
  r.fibers[r.cur].state = State::Done;  // uc_link returns to the scheduler
}

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("cuda emulation: " + what);
}

inline void run_block() {
  BlockRun& r = run();
  const int n = r.nthreads;
  if (static_cast<int>(r.fibers.size()) < n) r.fibers.resize(n);
  r.published.assign(n, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
    f.tid = dim3(i % r.block_dim.x, (i / r.block_dim.x) % r.block_dim.y, i / (r.block_dim.x * r.block_dim.y));
    f.deposit = 0;
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (r.fibers[i].state == State::Ready) {
        r.cur = i;
        swapcontext(&r.sched, &r.fibers[i].ctx);
      }
    }
    r.cur = -1;
    // Nothing is ready: release the warps whose lanes all wait in a warp op.
    bool released = false, any_block = false, all_done = true;
    for (int w0 = 0; w0 < n; w0 += 32) {
      const int w1 = std::min(n, w0 + 32);
      int in_op = 0;
      for (int i = w0; i < w1; ++i) in_op += r.fibers[i].state == State::WarpOp;
      if (in_op == 0) continue;
      if (in_op != w1 - w0) fail("a warp-level operation that not every lane of warp " + std::to_string(w0 / 32) +
                                 " reaches (divergence or exited lanes)");
      for (int i = w0; i < w1; ++i)
        if (r.fibers[i].site != r.fibers[w0].site)
          fail("lanes of warp " + std::to_string(w0 / 32) + " in warp operations of lines " +
               std::to_string(r.fibers[w0].site) + " and " + std::to_string(r.fibers[i].site) + " (divergence)");
      for (int i = w0; i < w1; ++i) {
        r.published[i] = r.fibers[i].deposit;
        r.fibers[i].state = State::Ready;
      }
      released = true;
    }
    if (released) continue;
    int or_value = 0, site = -1;
    for (int i = 0; i < n; ++i) {
      const State s = r.fibers[i].state;
      if (s != State::Done) all_done = false;
      if (s == State::BlockBarrier) {
        any_block = true;
        or_value |= r.fibers[i].deposit != 0;
        if (site < 0) site = r.fibers[i].site;
        if (r.fibers[i].site != site)
          fail("threads of one block wait at the barriers of lines " + std::to_string(site) + " and " +
               std::to_string(r.fibers[i].site) + " (divergence)");
      }
    }
    if (all_done) return;
    if (!any_block) fail("deadlock: no thread can proceed");
    // Every live thread waits at the block barrier (exited threads count as arrived).
    r.block_or = or_value;
    for (int i = 0; i < n; ++i) {
      if (r.fibers[i].state == State::BlockBarrier) {
        r.fibers[i].deposit = 0;
        r.fibers[i].state = State::Ready;
      }
    }
  }
}

// ---------------------------------------------------------------- launches

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(int64_t v) { return dim3(static_cast<unsigned>(v)); }

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    std::lock_guard<std::mutex> guard(launch_mutex());
    Device& dev = device();
    const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
    if (nthreads < 1 || nthreads > 1024) fail("block of " + std::to_string(nthreads) + " threads");
    int limit = 48 * 1024;
    auto it = dev.func_max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
    if (it != dev.func_max_dyn_smem.end()) limit = it->second;
    if (smem > static_cast<size_t>(limit))
      fail("launch with " + std::to_string(smem) + " bytes of dynamic shared memory, limit " +
           std::to_string(limit));
    ++dev.launches;
    dev.kernels.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(kernel)));
    BlockRun& r = run();
    r.nthreads = static_cast<int>(nthreads);
    r.block_dim = block;
    r.grid_dim = grid;
    r.dyn_smem.assign(smem + 16, 0xFF);
    std::tuple<std::decay_t<Params>...> params(args...);
    r.body = [&] { std::apply(kernel, params); };
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          r.block_idx = dim3(x, y, z);
          run_block();
        }
    r.body = nullptr;
  }
};

template <typename... Params, typename G, typename B>
Launch<Params...> launch(void (*kernel)(Params...), G grid, B block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<Params...>{kernel, as_dim3(grid), as_dim3(block), smem};
}

inline unsigned char* dynamic_smem() {
  auto p = reinterpret_cast<uintptr_t>(run().dyn_smem.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

// ---------------------------------------------------------------- warp operations

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp op on a value of more than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
inline int linear_tid() { return run().cur; }
inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("warp operation with a partial mask (not emulated)");
}
// Deposits v, waits until every lane of the warp has deposited, returns the lane's index.
template <typename T>
inline int warp_exchange(unsigned mask, T v, int site) {
  check_full_mask(mask);
  self().deposit = to_bits(v);
  park(State::WarpOp, site);
  return linear_tid();
}
template <typename T>
inline T lane_value(int me, int lane) {
  const int w0 = me & ~31;
  return from_bits<T>(run().published[w0 + lane]);
}
inline int warp_size_of(int me) { return std::min(32, run().nthreads - (me & ~31)); }

}  // namespace lskd_emu_rt

#define threadIdx (::lskd_emu_rt::self().tid)
#define blockIdx (::lskd_emu_rt::run().block_idx)
#define blockDim (::lskd_emu_rt::run().block_dim)
#define gridDim (::lskd_emu_rt::run().grid_dim)

// Barriers and warp operations remember their source line (the divergence check).
#define __syncthreads() ::lskd_emu_rt::syncthreads(__LINE__)
#define __syncthreads_or(p) ::lskd_emu_rt::syncthreads_or((p), __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) ::lskd_emu_rt::shfl_xor((mask), (v), (lane_mask), __LINE__)
#define __shfl_up_sync(mask, v, delta) ::lskd_emu_rt::shfl_up((mask), (v), (delta), __LINE__)
#define __match_any_sync(mask, v) ::lskd_emu_rt::match_any((mask), (v), __LINE__)

namespace lskd_emu_rt {
inline void syncthreads(int site) { park(State::BlockBarrier, site); }
inline int syncthreads_or(int p, int site) {
  self().deposit = p != 0;
  park(State::BlockBarrier, site);
  return run().block_or;
}
template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int site) {
  const int me = warp_exchange(mask, v, site);
  const int lane = me & 31, src = lane ^ lane_mask;
  return src < warp_size_of(me) ? lane_value<T>(me, src) : v;
}
template <typename T>
inline T shfl_up(unsigned mask, T v, unsigned delta, int site) {
  const int me = warp_exchange(mask, v, site);
  const int lane = me & 31;
  return lane >= static_cast<int>(delta) ? lane_value<T>(me, lane - static_cast<int>(delta)) : v;
}
template <typename T>
inline unsigned match_any(unsigned mask, T v, int site) {
  const int me = warp_exchange(mask, v, site);
  unsigned peers = 0;
  const uint64_t mine = to_bits(v);
  for (int l = 0; l < warp_size_of(me); ++l)
    if (run().published[(me & ~31) + l] == mine) peers |= 1u << l;
  return peers;
}
}  // namespace lskd_emu_rt

// ---------------------------------------------------------------- atomics and intrinsics
// One OS thread runs the fibers, and they only switch at barriers: plain
// read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __float_as_uint(float x) { return ::lskd_emu_rt::from_bits<unsigned>(::lskd_emu_rt::to_bits(x)); }
inline float __uint_as_float(unsigned u) { return ::lskd_emu_rt::from_bits<float>(u); }
inline long long __double_as_longlong(double x) { return ::lskd_emu_rt::from_bits<long long>(::lskd_emu_rt::to_bits(x)); }
inline double __longlong_as_double(long long u) {
  return ::lskd_emu_rt::from_bits<double>(static_cast<uint64_t>(u));
}
inline float __ll2float_rn(long long v) { return static_cast<float>(v); }
inline float __int2float_rn(int v) { return static_cast<float>(v); }
inline float __double2float_rn(double v) { return static_cast<float>(v); }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// CUDA's math overloads (float sqrt etc.) and min/max in the global namespace.
using std::ceil;
using std::fabs;
using std::floor;
using std::max;
using std::min;
using std::sqrt;

inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int /*device*/) {
  *v = attr == cudaDevAttrMultiProcessorCount ? ::lskd_emu_rt::device().sms : ::lskd_emu_rt::device().smem_optin;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  if (value > ::lskd_emu_rt::device().smem_optin)
    ::lskd_emu_rt::fail("cudaFuncSetAttribute above the device's opt-in shared memory");
  ::lskd_emu_rt::device().func_max_dyn_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

namespace c10 {
namespace cuda {
struct CUDAGuard {
  template <typename D>
  explicit CUDAGuard(const D&) {}
};
struct CUDAStreamStub {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStreamStub getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
