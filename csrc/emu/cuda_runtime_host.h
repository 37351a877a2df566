// The CUDA runtime calls the kernels' host code makes, answered by the emulated device
// (runtime.cpp): attribute queries, shared-memory opt-in, launches (<<<>>> through SCOTT_LAUNCH,
// cudaLaunchKernelEx with a cluster dimension), errors.
#pragma once

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719,
                   cudaErrorInvalidConfiguration = 9, cudaErrorNotSupported = 801 };
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrClusterLaunch = 120,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA, maxDynamicSharedSizeBytes;
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace emu {
cudaError_t take_error();          // cudaGetLastError: the first failure since the last call
cudaError_t peek_error();
const char* error_text(cudaError_t e);
}  // namespace emu

inline cudaError_t cudaGetLastError() { return emu::take_error(); }
inline cudaError_t cudaPeekAtLastError() { return emu::peek_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return emu::error_text(e); }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = emu::device_arch() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = emu::device_sms(); return cudaSuccess;
    case cudaDevAttrClusterLaunch: *v = emu::device_arch() >= 90; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::device_arch() >= 90 ? 232448 : 166912; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return emu::set_max_dyn_smem(reinterpret_cast<const void*>(kernel), v) ? cudaSuccess : cudaErrorInvalidValue;
}
template <class K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K* kernel) {
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = attr->binaryVersion = emu::device_arch();
  attr->maxThreadsPerBlock = 1024;
  attr->maxDynamicSharedSizeBytes = static_cast<int>(emu::max_dyn_smem(reinterpret_cast<const void*>(kernel)));
  return cudaSuccess;
}
template <class K, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, K* kernel, Args... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      if (cfg->attrs[i].val.clusterDim.y != 1 || cfg->attrs[i].val.clusterDim.z != 1) return cudaErrorNotSupported;
      cluster = cfg->attrs[i].val.clusterDim.x;
    }
  if (cluster > 1 && (emu::device_arch() < 90 || cfg->gridDim.x % cluster != 0)) return cudaErrorInvalidConfiguration;
  emu::launch("cudaLaunchKernelEx", cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster, kernel, args...);
  return emu::peek_error();
}
