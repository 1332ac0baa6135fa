// Stub for the CPU emulation of the CUDA kernels: everything is in tests/cuda_emu/runtime.h.
#pragma once
