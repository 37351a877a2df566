// Execution model for compiling the CUDA sources in csrc/ as ordinary C++ and running their
// kernels on the CPU (the emulated module scott_kernels._emu, built by tests/emu/build.py).
// Force-included (-include) ahead of every .cu file of that build, with -x c++ -D__CUDACC__
// -D__CUDA_ARCH__=900 -DSCOTT_EMU. Each CUDA thread of a block runs as a cooperative fiber
// (runtime.cpp); __syncthreads, warp collectives and cluster barriers switch fibers, so their
// semantics are exact. The PTX wrappers of cuda_common.cuh (cp.async, ldmatrix, mma.sync) are
// supplied by ptx_host.h with the ISA's per-lane fragment layouts and with checks (bounds,
// alignment, reads of cp.async destinations before their wait).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef SCOTT_EMU
#define SCOTT_EMU 1
#endif

// ---- declaration specifiers ------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// static __shared__ arrays: one instance shared by the block's fibers (the blocks of a launch run
// one after another on one OS thread). thread_local puts them, and nothing else of the kernels'
// files, in the module's TLS block, which runtime.cpp resets per block and checks like the dynamic
// window (a section attribute would be dropped for statics of templates).
#define __shared__ static thread_local
#define CUDART_VERSION 12080

// ---- vector types ------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- 16-bit floating point types, round to nearest even ----------------------------------------
namespace emu {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned short float_to_half_bits(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<unsigned short>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // rounds to infinity
  if (a < 0x38800000u) {  // subnormal half (or zero): value / 2^-24, rounded to nearest even
    const float v = u2f(a) * 16777216.0f;  // exact scaling by 2^24
    const float r = std::nearbyint(v);     // current rounding mode: to nearest even
    return static_cast<unsigned short>(sign | static_cast<uint32_t>(r));
  }
  const uint32_t mant = a & 0x7fffffu;
  uint32_t h = ((a >> 23) - 112) << 10 | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<unsigned short>(sign | h);
}
inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112) << 23) | (m << 13));
}
inline unsigned short float_to_bf16_bits(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((x >> 16) | 0x40u);
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(unsigned short b) { return u2f(static_cast<uint32_t>(b) << 16); }
}  // namespace emu

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(emu::float_to_half_bits(f)) {}
  __half(double f) : __half(static_cast<float>(f)) {}
  __half(int v) : __half(static_cast<float>(v)) {}
  operator float() const { return emu::half_bits_to_float(__x); }
};
struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(emu::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __nv_bfloat16(static_cast<float>(f)) {}
  __nv_bfloat16(int v) : __nv_bfloat16(static_cast<float>(v)) {}
  operator float() const { return emu::bf16_bits_to_float(__x); }
};
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "16-bit layouts");
static_assert(std::is_trivially_copyable<__half>::value && std::is_trivially_default_constructible<__half>::value,
              "__half is plain data");

inline float __half2float(__half h) { return emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { __half h; h.__x = emu::float_to_half_bits(f); return h; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { __nv_bfloat16 b; b.__x = emu::float_to_bf16_bits(f); return b; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// 16-bit comparisons, maxima and masks (a maximum of representable values is exact in float)
namespace emu {
template <typename H> inline H canonical_nan() { H h; h.__x = 0x7fffu; return h; }
template <typename H> inline H hmax_nan(H a, H b) {
  const float x = static_cast<float>(a), y = static_cast<float>(b);
  if (std::isnan(x) || std::isnan(y)) return canonical_nan<H>();
  return x >= y ? a : b;  // (+0 vs -0: either; callers compare values)
}
template <typename H> inline H hmax(H a, H b) {
  const float x = static_cast<float>(a), y = static_cast<float>(b);
  if (std::isnan(x)) return std::isnan(y) ? canonical_nan<H>() : b;
  if (std::isnan(y)) return a;
  return x >= y ? a : b;
}
template <typename H> inline H hmin(H a, H b) {
  const float x = static_cast<float>(a), y = static_cast<float>(b);
  if (std::isnan(x)) return std::isnan(y) ? canonical_nan<H>() : b;
  if (std::isnan(y)) return a;
  return x <= y ? a : b;
}
}  // namespace emu
#define SCOTT_EMU_HALF_OPS(H, H2)                                                                          \
  inline H __hmax(H a, H b) { return emu::hmax(a, b); }                                                   \
  inline H __hmin(H a, H b) { return emu::hmin(a, b); }                                                   \
  inline H __hmax_nan(H a, H b) { return emu::hmax_nan(a, b); }                                           \
  inline bool __hgt(H a, H b) { return static_cast<float>(a) > static_cast<float>(b); }                   \
  inline bool __hge(H a, H b) { return static_cast<float>(a) >= static_cast<float>(b); }                  \
  inline bool __hlt(H a, H b) { return static_cast<float>(a) < static_cast<float>(b); }                   \
  inline bool __heq(H a, H b) { return static_cast<float>(a) == static_cast<float>(b); }                  \
  inline bool __hisnan(H a) { return std::isnan(static_cast<float>(a)); }                                 \
  inline H2 __hmax2(H2 a, H2 b) { return {emu::hmax(a.x, b.x), emu::hmax(a.y, b.y)}; }                    \
  inline H2 __hmin2(H2 a, H2 b) { return {emu::hmin(a.x, b.x), emu::hmin(a.y, b.y)}; }                    \
  inline H2 __hmax2_nan(H2 a, H2 b) { return {emu::hmax_nan(a.x, b.x), emu::hmax_nan(a.y, b.y)}; }        \
  inline unsigned __heq2_mask(H2 a, H2 b) {                                                              \
    return (__heq(a.x, b.x) ? 0xffffu : 0u) | (__heq(a.y, b.y) ? 0xffff0000u : 0u);                       \
  }                                                                                                        \
  inline unsigned __hgt2_mask(H2 a, H2 b) {                                                              \
    return (__hgt(a.x, b.x) ? 0xffffu : 0u) | (__hgt(a.y, b.y) ? 0xffff0000u : 0u);                       \
  }                                                                                                        \
  inline unsigned __hge2_mask(H2 a, H2 b) {                                                              \
    return (__hge(a.x, b.x) ? 0xffffu : 0u) | (__hge(a.y, b.y) ? 0xffff0000u : 0u);                       \
  }                                                                                                        \
  /* unordered comparisons: also true where either side is NaN */                                          \
  inline unsigned __hgtu2_mask(H2 a, H2 b) {                                                             \
    return (!__hge(b.x, a.x) ? 0xffffu : 0u) | (!__hge(b.y, a.y) ? 0xffff0000u : 0u);                     \
  }                                                                                                        \
  inline unsigned __hneu2_mask(H2 a, H2 b) {                                                             \
    return (!__heq(a.x, b.x) ? 0xffffu : 0u) | (!__heq(a.y, b.y) ? 0xffff0000u : 0u);                     \
  }
SCOTT_EMU_HALF_OPS(__half, __half2)
SCOTT_EMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162)
#undef SCOTT_EMU_HALF_OPS

// ---- scalar intrinsics ---------------------------------------------------------------------------
inline unsigned __float_as_uint(float f) { return emu::f2u(f); }
inline float __uint_as_float(unsigned u) { return emu::u2f(u); }
inline int __float_as_int(float f) { return static_cast<int>(emu::f2u(f)); }
inline float __int_as_float(int i) { return emu::u2f(static_cast<uint32_t>(i)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
using std::max;
using std::min;
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : (a == a ? a : 0.f)); }

// ---- the execution model (runtime.cpp) -----------------------------------------------------------
namespace emu {

struct Block;
struct Thread {
  uint3 idx;       // threadIdx
  int linear;      // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  int lane, warp;
  Block* block;
};
struct Block {
  uint3 idx;       // blockIdx
  int rank;        // rank in its cluster
};
struct Launch {
  const char* kernel;
  dim3 grid, block;
  size_t dyn_smem;
  unsigned cluster;
};

extern Thread* g_thread;        // the running fiber's thread
extern const Launch* g_launch;  // the running launch
extern unsigned char* g_dyn_smem;  // the running block's dynamic shared memory (a fixed window)

// Runs `body` once per thread of every block (clusters of `cluster` blocks along x run together).
// (body(ctx) in each thread: a plain function and a pointer into the launching frame, so that the
// kernel's arguments stay in memory the global-memory check allows)
void run_kernel(const char* kernel, dim3 grid, dim3 block, size_t dyn_smem, unsigned cluster, void (*body)(void*),
                void* ctx);

void sync_block(const char* site = "");     // __syncthreads at `site`
void sync_warp();                          // __syncwarp / the entry of a warp collective
void* const* warp_exchange(void* mine);    // all 32 lanes' pointers, after all lanes arrived
void sync_cluster();                       // cluster.sync()
unsigned cluster_rank();
void* map_cluster_shared(void* p, unsigned rank);
[[noreturn]] void trap(const char* why);   // the thread stops; the launch fails
void report(const char* kind, const void* addr, const std::string& what);  // a check failed

// dynamic shared memory window and its shadow (cp.async destinations in flight)
constexpr size_t kMaxSmem = 232448;        // sm_90's 227 KiB opt-in limit
size_t smem_offset(const void* p, size_t bytes, const char* op);   // checks bounds and returns the offset
void smem_check_read(size_t off, size_t bytes, const char* op);     // no cp.async in flight there
void cp_async(uint32_t dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

// device the launches see
int device_arch();   // 80 or 90
int device_sms();
bool set_max_dyn_smem(const void* kernel, int bytes);
size_t max_dyn_smem(const void* kernel);
std::string kernel_name(const void* fn, const char* fallback);  // the symbol's demangled name

template <class K, class... Args>
void launch(const char* name, dim3 grid, dim3 block, size_t smem, unsigned cluster, K* kernel, Args... args) {
  if (smem > 48 * 1024 && smem > max_dyn_smem(reinterpret_cast<const void*>(kernel))) {
    report("launch", nullptr, std::string(name) + ": " + std::to_string(smem) +
                                  " bytes of dynamic shared memory without cudaFuncSetAttribute");
    return;
  }
  const std::string full = kernel_name(reinterpret_cast<const void*>(kernel), name);
  struct Call {
    K* kernel;
    std::tuple<Args...> args;
  } call{kernel, std::tuple<Args...>(args...)};
  run_kernel(full.c_str(), grid, block, smem, cluster,
             [](void* p) {
               Call* c = static_cast<Call*>(p);
               std::apply(c->kernel, c->args);  // each thread its own copies of the parameters
             },
             &call);
}

template <class K>
struct Launcher {
  const char* name;
  dim3 grid, block;
  size_t smem;
  K* kernel;
  template <class... Args>
  void operator()(Args&&... args) const {
    launch(name, grid, block, smem, 1, kernel, std::forward<Args>(args)...);
  }
};
template <class K>
Launcher<K> launcher(const char* name, dim3 grid, dim3 block, size_t smem, K* kernel) {
  return {name, grid, block, smem, kernel};
}

}  // namespace emu

#define threadIdx (::emu::g_thread->idx)
#define blockIdx (::emu::g_thread->block->idx)
// plain identifiers (cudaLaunchConfig_t has members of these names)
extern uint3 scott_emu_block_dim, scott_emu_grid_dim;
#define blockDim scott_emu_block_dim
#define gridDim scott_emu_grid_dim
#define warpSize 32

// (each call site names itself: threads of a block waiting at different barriers are reported)
#define SCOTT_EMU_STR2(x) #x
#define SCOTT_EMU_STR(x) SCOTT_EMU_STR2(x)
#define __syncthreads() ::emu::sync_block(__FILE__ ":" SCOTT_EMU_STR(__LINE__))
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { emu::trap("__trap"); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline size_t __cvta_generic_to_shared(const void* p) { return emu::smem_offset(p, 0, "cvta.to.shared"); }

// the launch syntax of the kernels' host code: SCOTT_LAUNCH(grid, block, smem, stream, kernel)(args...)
#define SCOTT_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::launcher(#__VA_ARGS__, dim3(grid), dim3(block), static_cast<size_t>(smem), &__VA_ARGS__)
// a block's dynamic shared memory (extern __shared__ under nvcc)
#define SCOTT_DYNAMIC_SMEM(name) unsigned char* const name = ::emu::g_dyn_smem

#include "cuda_runtime_host.h"
