// Self-test of the CUDA emulation (tests/cuda_emu/runtime.h), without torch:
// small kernels whose results are known, including broken ones that the
// emulation must expose. Built and called through ctypes by
// tests/test_cuda_emulated.py::test_emulation_runtime.
#include "runtime.h"

namespace {

// Block sum through shared memory; with_barrier = false drops the barrier
// between the writes and the reads (a race on a GPU, a wrong sum here).
__global__ void block_sum_kernel(const int* in, int* out, bool with_barrier) {
  __shared__ int part[1024];
  part[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  if (with_barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += part[i];
    out[blockIdx.x] = s;
  }
}

// Butterfly warp sum, inclusive scan with __shfl_up_sync, __match_any_sync and __syncthreads_or.
__global__ void warp_ops_kernel(const int* in, int* sum, int* scan, unsigned* match, int* any_odd) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  int v = in[i];
  int s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  sum[i] = s;
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, incl, o);
    if ((threadIdx.x & 31) >= static_cast<unsigned>(o)) incl += u;
  }
  scan[i] = incl;
  match[i] = __match_any_sync(0xffffffffu, v % 3);
  any_odd[blockIdx.x] = __syncthreads_or(v & 1);
}

// Thread 0 waits at another barrier than the others: divergence. (Threads
// that exit before a barrier count as arrived, as on the hardware.)
__global__ void divergent_kernel(int* out) {
  if (threadIdx.x == 0) return;
  if (threadIdx.x == 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 0 leaves before a warp shuffle that the other lanes make.
__global__ void partial_warp_kernel(int* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

}  // namespace

extern "C" {

// Returns 0 on success, else the number of the failed check; *error gets the
// message of an emulation error (divergence), "" if none.
int lskd_emu_selftest(char* error, int error_len) {
  error[0] = '\0';
  const int blocks = 3, threads = 256;
  std::vector<int> in(blocks * threads), out(blocks), expect(blocks, 0);
  for (int i = 0; i < blocks * threads; ++i) {
    in[i] = (i * 7919) % 101 - 50;
    expect[i / threads] += in[i];
  }
  ::lskd_emu_rt::launch(block_sum_kernel, blocks, threads)(in.data(), out.data(), true);
  if (out != expect) return 1;
  ::lskd_emu_rt::launch(block_sum_kernel, blocks, threads)(in.data(), out.data(), false);
  if (out == expect) return 2;  // the missing barrier must show

  std::vector<int> sum(blocks * threads), scan(blocks * threads), any_odd(blocks);
  std::vector<unsigned> match(blocks * threads);
  std::vector<int> even(in);
  for (int& v : even) v &= ~1;
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<int>& x = pass == 0 ? in : even;
    ::lskd_emu_rt::launch(warp_ops_kernel, blocks, threads)(x.data(), sum.data(), scan.data(), match.data(),
                                                             any_odd.data());
    for (int w0 = 0; w0 < blocks * threads; w0 += 32) {
      int s = 0;
      for (int l = 0; l < 32; ++l) s += x[w0 + l];
      int incl = 0;
      for (int l = 0; l < 32; ++l) {
        incl += x[w0 + l];
        if (sum[w0 + l] != s) return 3;
        if (scan[w0 + l] != incl) return 4;
        unsigned m = 0;
        for (int k = 0; k < 32; ++k) m |= (x[w0 + k] % 3 == x[w0 + l] % 3) ? (1u << k) : 0u;
        if (match[w0 + l] != m) return 5;
      }
    }
    for (int b = 0; b < blocks; ++b) {
      int odd = 0;
      for (int t = 0; t < threads; ++t) odd |= x[b * threads + t] & 1;
      if (any_odd[b] != odd) return 6;
    }
  }

  std::vector<int> flags(64, 0);
  try {
    ::lskd_emu_rt::launch(divergent_kernel, 1, 64)(flags.data());
    return 7;  // must raise
  } catch (const std::runtime_error& e) {
    std::snprintf(error, error_len, "%s", e.what());
  }
  try {
    ::lskd_emu_rt::launch(partial_warp_kernel, 1, 32)(flags.data());
    return 8;
  } catch (const std::runtime_error& e) {
    const size_t n = std::strlen(error);
    std::snprintf(error + n, error_len - n, " | %s", e.what());
  }
  try {
    ::lskd_emu_rt::launch(block_sum_kernel, 1, 64, 64 * 1024)(in.data(), out.data(), true);
    return 9;  // 64 KiB of dynamic shared memory without cudaFuncSetAttribute
  } catch (const std::runtime_error& e) {
    const size_t n = std::strlen(error);
    std::snprintf(error + n, error_len - n, " | %s", e.what());
  }
  return 0;
}

}  // extern "C"
