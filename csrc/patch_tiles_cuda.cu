// CUDA gather/scatter of patch tiles: one thread per output element, 64-bit indices, every
// launch checked. The scatter pulls (each source value sums its readers), so it needs no atomics
// and is deterministic; it accumulates in float (double for float64).
#include <atomic>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_launch.h"
#include "patch_tiles.h"

namespace scott {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return v; }
template <> __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }

template <typename Bits>
__global__ void gather_tiles_kernel(TileGeometry g, const Bits* __restrict__ src,
                                    const int64_t* __restrict__ slot,
                                    const int64_t* __restrict__ tile_pos, Bits* __restrict__ tiles,
                                    int64_t total) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t off = gather_source_offset(g, slot, tile_pos, idx);
    tiles[idx] = off < 0 ? Bits(0) : src[off];
  }
}

template <typename T>
__global__ void scatter_tiles_kernel(TileGeometry g, const T* __restrict__ grad_tiles,
                                     const int64_t* __restrict__ slot,
                                     const int64_t* __restrict__ slot_pos,
                                     const int64_t* __restrict__ tile_of, T* __restrict__ grad_src,
                                     int64_t total) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    typename Acc<T>::type acc = 0;
    for_each_reader(g, slot, slot_pos, tile_of, idx,
                    [&](int64_t t) { acc += to_acc(grad_tiles[t]); });
    grad_src[idx] = from_acc<T>(acc);
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; this bound keeps gridDim.x legal for any size.
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + " failed to launch: " + cudaGetErrorString(err));
  }
}

}  // namespace

void gather_tiles_cuda(const TileGeometry& g, DType dtype, const void* src, const int64_t* slot,
                       const int64_t* tile_pos, void* tiles, void* stream) {
  const int64_t T = g.tile_side();
  const int64_t total = g.num_tiles * g.channels * T * T;
  if (total == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (element_size(dtype)) {
    case 2:
      SCOTT_LAUNCH(grid_for(total), kThreads, 0, s, gather_tiles_kernel<uint16_t>)(
          g, static_cast<const uint16_t*>(src), slot, tile_pos, static_cast<uint16_t*>(tiles), total);
      break;
    case 4:
      SCOTT_LAUNCH(grid_for(total), kThreads, 0, s, gather_tiles_kernel<uint32_t>)(
          g, static_cast<const uint32_t*>(src), slot, tile_pos, static_cast<uint32_t*>(tiles), total);
      break;
    case 8:
      SCOTT_LAUNCH(grid_for(total), kThreads, 0, s, gather_tiles_kernel<uint64_t>)(
          g, static_cast<const uint64_t*>(src), slot, tile_pos, static_cast<uint64_t*>(tiles), total);
      break;
    default:
      throw std::invalid_argument("gather_tiles: unsupported element size");
  }
  check_launch("gather_tiles_kernel");
}

void scatter_tiles_cuda(const TileGeometry& g, DType dtype, const void* grad_tiles,
                        const int64_t* slot, const int64_t* slot_pos, const int64_t* tile_of,
                        void* grad_src, void* stream) {
  const int64_t total = g.num_slots() * g.channels * g.side * g.side;
  if (total == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = grid_for(total);
  switch (dtype) {
    case DType::kFloat32:
      SCOTT_LAUNCH(blocks, kThreads, 0, s, scatter_tiles_kernel<float>)(g, static_cast<const float*>(grad_tiles), slot,
                                                       slot_pos, tile_of, static_cast<float*>(grad_src), total);
      break;
    case DType::kFloat64:
      SCOTT_LAUNCH(blocks, kThreads, 0, s, scatter_tiles_kernel<double>)(g, static_cast<const double*>(grad_tiles), slot,
                                                       slot_pos, tile_of, static_cast<double*>(grad_src), total);
      break;
    case DType::kFloat16:
      SCOTT_LAUNCH(blocks, kThreads, 0, s, scatter_tiles_kernel<__half>)(g, static_cast<const __half*>(grad_tiles), slot,
                                                       slot_pos, tile_of, static_cast<__half*>(grad_src), total);
      break;
    case DType::kBFloat16:
      SCOTT_LAUNCH(blocks, kThreads, 0, s, scatter_tiles_kernel<__nv_bfloat16>)(g, static_cast<const __nv_bfloat16*>(grad_tiles), slot,
                                                       slot_pos, tile_of, static_cast<__nv_bfloat16*>(grad_src),
                                                       total);
      break;
  }
  check_launch("scatter_tiles_kernel");
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

// Compiled for every target of the module like each kernel: its attributes say which of the
// module's codes the driver loads on a device.
__global__ void scott_code_probe() {}

int module_code_arch(int device) {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices];  // 0: not asked yet, else the answer + 1
  if (device < 0 || device >= kDevices) return 0;
  const int cached = known[device].load(std::memory_order_relaxed);
  if (cached != 0) return cached - 1;
  int current = 0;
  int arch = 0;
  cudaFuncAttributes attr;
  if (cudaGetDevice(&current) == cudaSuccess) {
    const bool other = current != device;
    if ((!other || cudaSetDevice(device) == cudaSuccess)) {
      // ptxVersion: the virtual architecture the loaded code was compiled from (__CUDA_ARCH__ / 10),
      // for SASS built for this GPU and for PTX its driver compiles alike; an error: no code for it
      if (cudaFuncGetAttributes(&attr, scott_code_probe) == cudaSuccess) arch = attr.ptxVersion;
      if (other) cudaSetDevice(current);
    }
  }
  cudaGetLastError();  // a failed query is an answer (no code for this device), not a pending error
  known[device].store(arch + 1, std::memory_order_relaxed);
  return arch;
}

int module_code_arch() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return module_code_arch(device);
}

}  // namespace scott
