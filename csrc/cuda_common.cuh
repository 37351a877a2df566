// What the CUDA kernel files share: launch checks, dtype dispatch, device queries, the PTX wrappers
// of the tensor-core kernels (cp.async, ldmatrix, mma.sync) and their tile constants, and the host
// entry points one file offers another. Kernels per family: conv_igemm.cu (implicit conv GEMMs of
// compact stages, the visible tables and the neighbour table, the ReLU mask of a standalone
// gradient op), conv_image.cu (the image stage), gemm_fallback.cu (the gather GEMM on WMMA / CUDA
// cores and the conv entry points), pool.cu (MaxBlurPool). float32/float16/bfloat16 accumulate in float32, float64 in
// float64; every launch is checked.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_launch.h"
#include "tokenizer.h"

namespace scott {

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(kernel) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Whether the module's code for the current device holds the sm_80 kernels (tensor-core GEMMs,
// tiled pools): code compiled for sm_80 or later. A GPU below sm_80, or running code compiled for
// an older target (an sm_75 build's PTX on a newer GPU), has only their empty bodies and takes the
// CUDA-core gather GEMM and the per-element pools.
inline bool device_has_tensor_cores() { return module_code_arch() >= 80; }

template <typename T> struct IsTensorCoreType { static constexpr bool value = false; };
template <> struct IsTensorCoreType<__half> { static constexpr bool value = true; };
template <> struct IsTensorCoreType<__nv_bfloat16> { static constexpr bool value = true; };

inline int multiprocessors() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 1;
  return sms;
}

template <class Kernel>
void allow_smem(Kernel kernel, int bytes) {
  // above 48 KiB dynamic shared memory needs an opt-in per kernel
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
    throw std::runtime_error("implicit conv GEMM: cannot reserve shared memory");
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// A device-side check that stops the kernel with ``message``: CUDA's own assertion (printed with the
// kernel, block and thread; the next synchronisation fails with "device-side assert triggered"),
// kept whatever NDEBUG says, as torch's CUDA_KERNEL_ASSERT; on the emulated device, a trap naming it.
#ifdef SCOTT_EMU
#define SCOTT_DEVICE_ASSERT(cond, message) \
  do {                                     \
    if (!(cond)) ::emu::trap(message);     \
  } while (0)
#else
// declared here as torch does: a Release build's NDEBUG hides the declaration in assert.h
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                  const char* function) noexcept __attribute__((__noreturn__));
#define SCOTT_DEVICE_ASSERT(cond, message)                                        \
  do {                                                                            \
    if (!(cond)) __assert_fail(message, __FILE__, __LINE__, __func__);            \
  } while (0)
#endif

#define SCOTT_CUDA_DISPATCH(dtype, ...)                        \
  do {                                                         \
    switch (dtype) {                                           \
      case DType::kFloat32: { using T = float; __VA_ARGS__; break; }            \
      case DType::kFloat64: { using T = double; __VA_ARGS__; break; }           \
      case DType::kFloat16: { using T = __half; __VA_ARGS__; break; }           \
      case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }   \
    }                                                          \
  } while (0)

// The tensor-core kernels' shared pieces (namespace ig: the kernels' symbols are
// scott::ig::scott_conv_*_igemm<T>, stable from build to build for tools that read the module's
// machine code). Every block: BK = 32 K elements per step, 4 stages; warps own 64 x 32 tiles of C
// (4 x 4 mma tiles). Operand layouts in shared memory: B always [k][n] (n contiguous), A [m][k]
// (forward, dgrad) or [k][m] (wgrad, whose A is the transposed window); rows padded by 8 elements
// so that the 8 row addresses of an ldmatrix fall on distinct banks.
namespace ig {

constexpr int BK = 32, STAGES = 4, PAD = 8;
constexpr int A_VPT = 2, A_TPR = BK / 8 / A_VPT;  // gathered A: 16-byte vectors per thread and row; threads per row

#ifdef SCOTT_EMU
#include "emu/ptx_host.h"  // the same wrappers on the emulated device
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; a zero source size fills zeros (masked or out-of-range operands)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#endif

template <typename T> struct Pack2;
template <> struct Pack2<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat162 make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pack2<__half> {
  static __device__ __forceinline__ __half2 make(float a, float b) { return __floats2half2_rn(a, b); }
};

// B fragments of NJ pairs of n8 tiles, one ldmatrix.x4.trans per pair, from shared memory at
// base + 2 * (b_off[nj] + step) bytes (b_off: the lane's offsets in elements; step: the K step's).
template <int NJ>
__device__ __forceinline__ void ldmatrix_b(uint32_t (&bf)[2 * NJ][2], uint32_t base, const int (&b_off)[NJ], int step) {
#pragma unroll
  for (int nj = 0; nj < NJ; ++nj) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, base + 2 * (b_off[nj] + step));
    bf[2 * nj][0] = r[0];
    bf[2 * nj][1] = r[1];
    bf[2 * nj + 1][0] = r[2];
    bf[2 * nj + 1][1] = r[3];
  }
}

// acc[mi][ni] += af[mi] * bf[ni] for every pair of fragments (m16n8k16, float32 accumulation).
template <typename T, int MI, int NI>
__device__ __forceinline__ void mma_tiles(float (&acc)[MI][NI][4], const uint32_t (&af)[MI][4],
                                          const uint32_t (&bf)[NI][2]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
}

template <int BM, int BN, bool A_KMAJOR>
struct Tile {
  static constexpr int kThreads = (BM / 64) * (BN / 32) * 32;
  static constexpr int kAStage = A_KMAJOR ? BK * (BM + PAD) : BM * (BK + PAD);  // elements
  static constexpr int kBStage = BK * (BN + PAD);
  static constexpr int kABytes = STAGES * (kAStage + kBStage) * 2;
};

// ---- entry points across files (host) ----
// conv_igemm.cu: the compact stages' implicit GEMMs, each false when the path does not apply (or a
// pointer is not 16-byte aligned); the neighbour table; g' for a gradient given with `out`.
bool launch_forward(const StageGeometry& g, DType dtype, const void* src, const void* weight_t, const int32_t* slot,
                    const int64_t* tile_pos, void* out, bool relu, int32_t* nbr, cudaStream_t stream);
bool launch_wgrad(const StageGeometry& g, DType dtype, const void* src, const void* grad, const void* out,
                  const int32_t* slot, const int64_t* tile_pos, void* partial, int64_t splits, int32_t* nbr,
                  void* gmask, cudaStream_t stream);
bool launch_dgrad(const StageGeometry& g, DType dtype, const void* grad, const void* out, const void* weight_t,
                  const int32_t* slot, const int64_t* tile_pos, void* grad_src, int32_t* nbr, void* gmask,
                  cudaStream_t stream);
void launch_neighbours(const StageGeometry& g, const int32_t* slot, const int64_t* tile_pos, int32_t* nbr,
                       cudaStream_t stream);
// The g' a backward GEMM reads: grad itself when out is nullptr (the MaxBlurPool backward wrote it
// masked already, the usual path), else grad * relu'(out) written to gmask first (float16/bfloat16).
const void* masked_grad(const StageGeometry& g, DType dtype, const void* grad, const void* out, void* gmask,
                        cudaStream_t stream);
// conv_image.cu: the image stage's implicit GEMMs, false when the path does not apply.
bool launch_image(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_pad,
                  const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu, int32_t* nbr,
                  cudaStream_t stream);
bool launch_image_wgrad(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                        const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                        void* partial, int64_t splits, int32_t* nbr, void* gmask, cudaStream_t stream);

}  // namespace ig
}  // namespace scott
