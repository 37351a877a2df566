// Kernel launches written once for both builds of the .cu files: under nvcc
// SCOTT_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(args...);
// in the emulated host build (csrc/emu/cuda_host.h, SCOTT_EMU) it runs the kernel on the CPU's
// emulated device. SCOTT_DYNAMIC_SMEM(name) declares a block's dynamic shared memory.
#pragma once

#ifndef SCOTT_EMU
#define SCOTT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define SCOTT_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
