// CUDA implementation of the tokenizer stage kernels.
//   * Implicit conv GEMMs on tensor cores (namespace ig; float16/bfloat16, sm_80+): forward,
//     weight gradient and input gradient of compact stages, forward and weight gradient of the
//     image stage. Operands arrive as 16-byte vectors (cp.async) addressed through a per-tile 3x3
//     neighbour table with per-row set-up once per block; fragments by ldmatrix, math on mma.sync
//     m16n8k16 with float32 accumulation; 32-bit offsets (the host checks that they fit).
//   * The gather GEMM for everything else (float32/float64, shapes the implicit kernels refuse):
//     one tiled shared-memory GEMM template over operands gathered per element (tokenizer.h), on
//     WMMA for float16/bfloat16 on sm_80+, on CUDA cores otherwise; 64-bit indices.
//   * MaxBlurPool forward and backward (namespace pool; float16/bfloat16, sm_80+): one thread per
//     (visible tile, pooled pixel, 8-channel vector) reading its window as 16-byte vectors, the
//     backward writing relu'-masked gradients when asked; the per-element kernels (one thread per
//     output element, 64-bit indices) for everything else.
// float32/float16/bfloat16 accumulate in float32, float64 in float64; every launch is checked.
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "tokenizer.h"

namespace scott {
namespace {

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(kernel) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Block tile BM x BN, K step BK; each of the (BM / TM) * (BN / TN) threads owns a TM x TN patch of
// C. blockIdx.z splits K into chunks of k_chunk (wgrad's reduction over output pixels); each
// split stores its own result through `store(split, m, n, store.prepare(acc))` (prepare: the
// store's elementwise epilogue, applied to the accumulators).
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int kThreads = (BM / TM) * (BN / TN);

template <typename A, class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(kThreads)
gather_gemm_kernel(int64_t M, int64_t N, int64_t K, int64_t k_chunk, LoadA load_a, LoadB load_b, Store store) {
  __shared__ A a_tile[BK][BM + 1];
  __shared__ A b_tile[BK][BN];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < K ? k_begin + k_chunk : K;
  const int tid = threadIdx.x;
  const int tr = tid / (BN / TN), tc = tid % (BN / TN);
  A acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = A(0);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int i = tid; i < BK * BM; i += kThreads) {
      const int kk = i % BK, mm = i / BK;  // consecutive threads walk K: contiguous channels
      const int64_t m = m0 + mm, k = k0 + kk;
      a_tile[kk][mm] = (m < M && k < k_end) ? load_a(m, k) : A(0);
    }
    for (int i = tid; i < BK * BN; i += kThreads) {
      const int kk = i / BN, nn = i % BN;  // consecutive threads walk N: contiguous columns
      const int64_t n = n0 + nn, k = k0 + kk;
      b_tile[kk][nn] = (n < N && k < k_end) ? load_b(k, n) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      A a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = a_tile[kk][tr * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = b_tile[kk][tc * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t m = m0 + tr * TM + i, n = n0 + tc * TN + j;
      if (m < M && n < N) store(static_cast<int64_t>(blockIdx.z), m, n, store.prepare(acc[i][j]));
    }
  }
}

template <typename A, class LoadA, class LoadB, class Store>
void launch_gemm(const char* name, int64_t M, int64_t N, int64_t K, int64_t splits, LoadA a, LoadB b, Store s,
                 cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if (splits < 1) splits = 1;
  const int64_t k_chunk = ((K + splits - 1) / splits + BK - 1) / BK * BK;
  const dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>((N + BN - 1) / BN),
                  static_cast<unsigned>(splits));
  if ((M + BM - 1) / BM > 0x7fffffffLL || (N + BN - 1) / BN > 65535 || splits > 65535)
    throw std::invalid_argument(std::string(name) + ": problem too large for one launch");
  gather_gemm_kernel<A><<<grid, kThreads, 0, stream>>>(M, N, K, k_chunk, a, b, s);
  check_launch(name);
}

// ---- tensor cores (WMMA, sm_80+): float16 / bfloat16 operands, float32 accumulation ----------------
// Block tile 128 x 64, K step 32, 8 warps as 4 (M) x 2 (N), each warp 32 x 32 = 2 x 2 fragments of
// 16 x 16 x 16. Operands are gathered by the same loaders as the SIMT kernel, rounded to T in
// shared memory; the accumulators go back through shared memory to the store functor.
namespace wmma = nvcuda::wmma;
constexpr int TC_BM = 128, TC_BN = 64, TC_BK = 32, TC_THREADS = 256;
constexpr int TC_LDA = TC_BK + 8, TC_LDB = TC_BN + 8, TC_LDC = TC_BN + 4;
constexpr int TC_AB_BYTES = (TC_BM * TC_LDA + TC_BK * TC_LDB) * 2;
constexpr int TC_C_BYTES = TC_BM * TC_LDC * 4;
constexpr int TC_SMEM = TC_AB_BYTES > TC_C_BYTES ? TC_AB_BYTES : TC_C_BYTES;

bool g_tensor_cores = true;

template <typename T, class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(TC_THREADS)
wmma_gemm_kernel(int64_t M, int64_t N, int64_t K, int64_t k_chunk, LoadA load_a, LoadB load_b, Store store) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(128) unsigned char smem[TC_SMEM];
  T* a_tile = reinterpret_cast<T*>(smem);                 // [TC_BM][TC_LDA], row-major (m, k)
  T* b_tile = a_tile + TC_BM * TC_LDA;                     // [TC_BK][TC_LDB], row-major (k, n)
  float* c_tile = reinterpret_cast<float*>(smem);          // [TC_BM][TC_LDC], after the main loop
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TC_BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TC_BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = k_begin + k_chunk < K ? k_begin + k_chunk : K;
  const int tid = threadIdx.x, warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += TC_BK) {
    for (int i = tid; i < TC_BM * TC_BK; i += TC_THREADS) {
      const int kk = i % TC_BK, mm = i / TC_BK;
      const int64_t m = m0 + mm, k = k0 + kk;
      a_tile[mm * TC_LDA + kk] = from_acc<T>((m < M && k < k_end) ? load_a(m, k) : 0.0f);
    }
    for (int i = tid; i < TC_BK * TC_BN; i += TC_THREADS) {
      const int kk = i / TC_BN, nn = i % TC_BN;
      const int64_t n = n0 + nn, k = k0 + kk;
      b_tile[kk * TC_LDB + nn] = from_acc<T>((n < N && k < k_end) ? load_b(k, n) : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], a_tile + (warp_m * 32 + i * 16) * TC_LDA + kk, TC_LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], b_tile + kk * TC_LDB + warp_n * 32 + j * 16, TC_LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] = store.prepare(acc[i][j].x[t]);
    }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c_tile + (warp_m * 32 + i * 16) * TC_LDC + warp_n * 32 + j * 16, acc[i][j], TC_LDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < TC_BM * TC_BN; i += TC_THREADS) {
    const int mm = i / TC_BN, nn = i % TC_BN;
    const int64_t m = m0 + mm, n = n0 + nn;
    if (m < M && n < N) store(static_cast<int64_t>(blockIdx.z), m, n, c_tile[mm * TC_LDC + nn]);
  }
#else
  __trap();  // launched only on sm_80+ (checked on the host)
#endif
}

bool device_has_tensor_cores() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

template <typename T> struct IsTensorCoreType { static constexpr bool value = false; };
template <> struct IsTensorCoreType<__half> { static constexpr bool value = true; };
template <> struct IsTensorCoreType<__nv_bfloat16> { static constexpr bool value = true; };

// The GEMM for compute type T: tensor cores for float16/bfloat16 on sm_80+, else the SIMT kernel.
template <typename T, typename A, class LoadA, class LoadB, class Store>
void launch_gemm_for(const char* name, int64_t M, int64_t N, int64_t K, int64_t splits, LoadA a, LoadB b, Store s,
                     cudaStream_t stream) {
  if constexpr (IsTensorCoreType<T>::value) {
    if (g_tensor_cores && device_has_tensor_cores()) {
      if (M == 0 || N == 0) return;
      if (splits < 1) splits = 1;
      const int64_t k_chunk = ((K + splits - 1) / splits + TC_BK - 1) / TC_BK * TC_BK;
      if ((M + TC_BM - 1) / TC_BM > 0x7fffffffLL || (N + TC_BN - 1) / TC_BN > 65535 || splits > 65535)
        throw std::invalid_argument(std::string(name) + ": problem too large for one launch");
      const dim3 grid(static_cast<unsigned>((M + TC_BM - 1) / TC_BM), static_cast<unsigned>((N + TC_BN - 1) / TC_BN),
                      static_cast<unsigned>(splits));
      wmma_gemm_kernel<T><<<grid, TC_THREADS, 0, stream>>>(M, N, K, k_chunk, a, b, s);
      check_launch(name);
      return;
    }
  }
  launch_gemm<A>(name, M, N, K, splits, a, b, s, stream);
}

// The forward's store: relu_of(acc) with the ReLU, else acc. The float epilogue masks the bits of
// a non-positive (or NaN) accumulator with `negatives` (0: +0, relu_of's value; ~0: acc as it is),
// an operand the instruction reads from the kernel's parameters: no branch, no extra register.
template <typename T, typename A>
struct StoreRelu {
  T* out;
  int32_t cols;        // C_out
  uint32_t negatives;  // 0 with the ReLU, ~0 without
  __device__ A prepare(A acc) const {
    if constexpr (std::is_same<A, float>::value)
      return acc > 0.f ? acc : __uint_as_float(__float_as_uint(acc) & negatives);
    else
      return negatives == 0 ? relu_of(acc) : acc;
  }
  __device__ void operator()(int64_t, int64_t m, int64_t n, A acc) const { out[m * cols + n] = from_acc<T>(acc); }
};

template <typename T, typename A>
struct StoreClassRows {
  T* out;
  StageGeometry g;
  ParityClass pc;
  __device__ A prepare(A acc) const { return acc; }
  __device__ void operator()(int64_t, int64_t m, int64_t n, A acc) const {
    out[class_row(g, pc, m) * g.c_in + n] = from_acc<T>(acc);
  }
};

template <typename A>
struct StorePartial {
  A* partial;
  int64_t rows, cols;
  __device__ A prepare(A acc) const { return acc; }
  __device__ void operator()(int64_t split, int64_t m, int64_t n, A acc) const {
    partial[(split * rows + m) * cols + n] = acc;
  }
};

// wgrad's A operand: the window transposed, (kk, r) -> window(r, kk).
template <class Window>
struct Transposed {
  Window w;
  __device__ auto operator()(int64_t kk, int64_t r) const { return w(r, kk); }
};

template <typename T, typename A, class F>
__global__ void elementwise_kernel(int64_t rows, int64_t channels, T* out, F f) {
  const int64_t total = rows * channels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_acc<T>(f(i / channels, i % channels));
  }
}

template <typename T, typename A, class F>
void launch_elementwise(const char* name, int64_t rows, int64_t channels, T* out, F f, cudaStream_t stream) {
  const int64_t total = rows * channels;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  elementwise_kernel<T, A><<<static_cast<unsigned>(blocks < 65535 * 64 ? blocks : 65535 * 64), threads, 0, stream>>>(
      rows, channels, out, f);
  check_launch(name);
}

template <typename T, typename A>
struct PoolForward {
  PoolGeometry g;
  const T* act;
  const int32_t* slot;
  const int64_t* tile_pos;
  bool relu;
  __device__ A operator()(int64_t r, int64_t c) const {
    return max_blur_pool_at<T, A>(g, act, slot, tile_pos, r, c, relu);
  }
};

template <typename T, typename A>
struct PoolBackward {
  PoolGeometry g;
  const T* grad;
  const T* act;
  const int32_t* slot;
  const int64_t* tile_pos;
  bool relu_mask;
  __device__ A operator()(int64_t r, int64_t c) const {
    return max_blur_pool_grad_at<T, A>(g, grad, act, slot, tile_pos, r, c, relu_mask);
  }
};

}  // namespace

// ---- implicit conv GEMMs on tensor cores (float16 / bfloat16, sm_80+) ------------------------------
// Hand-written rather than built on CUTLASS/CuTe: the operand gather (neighbour table, parity-class
// taps) is the whole difficulty and CuTe would need it written as custom gather layouts anyway; the
// GEMM core below is one ~100-line mainloop (cp.async 16-byte loads into a 4-stage shared-memory
// ring, ldmatrix fragments, mma.sync m16n8k16 with float32 accumulation), it needs no new build
// dependency and compiles in seconds on small CI machines. The same kernels serve sm_80 and sm_90a
// (mma.sync runs on Hopper; wgmma would be the next step there).
//
// Every block: BK = 32 K elements per step, 4 stages; warps own 64 x 32 tiles of C (4 x 4 mma tiles).
// Operand layouts in shared memory: B always [k][n] (n contiguous), A [m][k] (forward, dgrad) or
// [k][m] (wgrad, whose A is the transposed window); rows padded by 8 elements so that the 8 row
// addresses of an ldmatrix fall on distinct banks.
// (outside the anonymous namespace: the kernels' symbols, scott::ig::scott_conv_*_igemm<T>, stay
// the same from build to build for tools that read the module's machine code)
namespace ig {

constexpr int BK = 32, STAGES = 4, PAD = 8;
constexpr int A_VPT = 2, A_TPR = BK / 8 / A_VPT;  // gathered A: 16-byte vectors per thread and row; threads per row

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

template <typename T> struct Pack2;
template <> struct Pack2<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat162 make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pack2<__half> {
  static __device__ __forceinline__ __half2 make(float a, float b) { return __floats2half2_rn(a, b); }
};

template <int BM, int BN, bool A_KMAJOR>
struct Tile {
  static constexpr int kThreads = (BM / 64) * (BN / 32) * 32;
  static constexpr int kAStage = A_KMAJOR ? BK * (BM + PAD) : BM * (BK + PAD);  // elements
  static constexpr int kBStage = BK * (BN + PAD);
  static constexpr int kABytes = STAGES * (kAStage + kBStage) * 2;
};

// The pipelined K loop: `load(a_stage, b_stage)` issues the cp.async copies of the next K step
// (called in K order); acc[mi][ni] is the warp's (16 x 8) mma tile (mi, ni) of its 64 x 32 tile.
template <typename T, int BM, int BN, bool A_KMAJOR, class Load>
__device__ __forceinline__ void mainloop(float (&acc)[4][4][4], T* sa, T* sb, int kiters, Load&& load) {
  using TL = Tile<BM, BN, A_KMAJOR>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = warp / (BN / 32), wn = warp % (BN / 32);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < kiters) load(sa + s * TL::kAStage, sb + s * TL::kBStage);
    cp_async_commit();
  }
  // per-lane ldmatrix offsets (elements) within a stage, for k sub-step 0
  const int mat = lane / 8, mrow = lane % 8;
  int a_off[4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
    a_off[mi] = A_KMAJOR ? (mrow + (mat / 2) * 8) * (BM + PAD) + wm * 64 + mi * 16 + (mat % 2) * 8
                         : (wm * 64 + mi * 16 + lane % 16) * (BK + PAD) + (lane / 16) * 8;
  int b_off[2];
#pragma unroll
  for (int nj = 0; nj < 2; ++nj) b_off[nj] = (mrow + (mat % 2) * 8) * (BN + PAD) + wn * 32 + nj * 16 + (mat / 2) * 8;

  for (int kit = 0; kit < kiters; ++kit) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // step kit has landed; every warp is done with the stage refilled below
    const int next = kit + STAGES - 1;
    if (next < kiters) load(sa + (next % STAGES) * TL::kAStage, sb + (next % STAGES) * TL::kBStage);
    cp_async_commit();
    const uint32_t a_base = smem_u32(sa + (kit % STAGES) * TL::kAStage);
    const uint32_t b_base = smem_u32(sb + (kit % STAGES) * TL::kBStage);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        if constexpr (A_KMAJOR)
          ldmatrix_x4_trans(af[mi], a_base + 2 * (a_off[mi] + kk * (BM + PAD)));
        else
          ldmatrix_x4(af[mi], a_base + 2 * (a_off[mi] + kk));
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, b_base + 2 * (b_off[nj] + kk * (BN + PAD)));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();
}

// The accumulators as (row, column, value pair) of the block tile: f(m, n, v[n], v[n + 1]).
template <int BN, class F>
__device__ __forceinline__ void for_each_pair(const float (&acc)[4][4][4], F&& f) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = warp / (BN / 32), wn = warp % (BN / 32);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        f(wm * 64 + mi * 16 + h * 8 + lane / 4, wn * 32 + ni * 8 + (lane % 4) * 2, acc[mi][ni][2 * h],
          acc[mi][ni][2 * h + 1]);
}

// A block's tiles' neighbour slots, copied once into shared memory; returns the first tile.
__device__ __forceinline__ int32_t stage_neighbours(const ImplicitConv& g, const int32_t* nbr, int32_t m0,
                                                    int32_t m_last, int32_t* snb) {
  const int32_t t0 = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(m0)));
  const int32_t t1 = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(m_last)));
  for (int i = threadIdx.x; i < (t1 - t0 + 1) * kNeighbours; i += blockDim.x) snb[i] = nbr[t0 * kNeighbours + i];
  return t0;
}

template <typename T>
struct FwdArgs {
  ImplicitConv g;
  const T* src;      // (M, q, q, C_in)
  const T* weight;   // (k*k*C_in, C_out)
  const int32_t* nbr;
  T* out;            // (M, s, s, C_out)
  int32_t rows;      // M * s * s
  bool relu;         // out = relu(conv), else conv
};

constexpr int FWD_BM = 128, FWD_BN = 128;
using FwdTile = Tile<FWD_BM, FWD_BN, false>;
constexpr int FWD_SMEM = FwdTile::kABytes + (FWD_BM + 1) * kNeighbours * 4;

// Forward: out[r, co] = relu(sum over (tap, ci) window(r, tap, ci) * w[tap, ci, co]) (relu when
// p.relu). Block: 128
// output pixels x 128 output channels; K steps (ky, kx, 32 input channels).
template <typename T>
__global__ void __launch_bounds__(FwdTile::kThreads, 2) scott_conv_fwd_igemm(FwdArgs<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = FWD_BM, BN = FWD_BN, NT = FwdTile::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + STAGES * FwdTile::kAStage;
  int32_t* snb = reinterpret_cast<int32_t*>(sb + STAGES * FwdTile::kBStage);
  const ImplicitConv& g = p.g;
  const int tid = threadIdx.x;
  const int32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int32_t t0 = stage_neighbours(g, p.nbr, m0, min(m0 + BM, p.rows) - 1, snb);

  // A: thread -> rows (tid / 4 + 64 p), channel vector tid % 4; per-row work once, here.
  // A: thread -> rows tid / 2 (+ NT / 2 per pass), two 16-byte channel vectors (tid % 2) * 16 + {0, 8}:
  // one neighbour lookup per row and K step serves both; the row's coordinates are set up here, once.
  constexpr int A_ROWS = NT / A_TPR, A_PASSES = BM / A_ROWS;
  int32_t a_nb[A_PASSES], a_y0[A_PASSES], a_x0[A_PASSES];
#pragma unroll
  for (int i = 0; i < A_PASSES; ++i) {
    const int32_t r = m0 + tid / A_TPR + i * A_ROWS;
    const ImplicitRow row = conv_row(g, r < p.rows ? r : 0);
    a_nb[i] = r < p.rows ? (row.tile - t0) * kNeighbours : -1;
    a_y0[i] = row.y0;
    a_x0[i] = row.x0;
  }
  const int a_vec = (tid % A_TPR) * 8 * A_VPT;
  // B: thread -> k rows (tid / 16 + 16 p), columns n0 + 8 (tid % 16)
  constexpr int B_ROWS = NT / (BN / 8), B_PASSES = BK / B_ROWS;
  const int32_t b_col = n0 + (tid % (BN / 8)) * 8;
  const bool b_ok = b_col < g.c_out;
  __syncthreads();

  int32_t ky = 0, kx = 0, c0 = 0;  // the next K step to load
  const int kiters = g.k * g.k * ((g.c_in + BK - 1) / BK);
  auto load = [&](T* a, T* b) {
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) {
      const int32_t c = c0 + a_vec;
      const int32_t off = (a_nb[i] >= 0 && c < g.c_in)
                              ? conv_src_offset(g, snb + a_nb[i], a_y0[i], a_x0[i], ky, kx, c) : -1;
      const uint32_t dst = smem_u32(a + (tid / A_TPR + i * A_ROWS) * (BK + PAD) + a_vec);
      cp_async16(dst, p.src + (off < 0 ? 0 : off), off >= 0);
      cp_async16(dst + 16, p.src + (off < 0 ? 0 : off + 8), off >= 0 && c + 8 < g.c_in);
    }
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const int kr = tid / (BN / 8) + i * B_ROWS;
      const bool ok = b_ok && c0 + kr < g.c_in;
      const int32_t w = ok ? conv_weight_row(g, ky, kx, c0 + kr) * g.c_out + b_col : 0;
      cp_async16(smem_u32(b + kr * (BN + PAD) + (tid % (BN / 8)) * 8), p.weight + w, ok);
    }
    c0 += BK;
    if (c0 >= g.c_in) {
      c0 = 0;
      if (++kx == g.k) { kx = 0; ++ky; }
    }
  };
  float acc[4][4][4] = {};
  mainloop<T, BM, BN, false>(acc, sa, sb, kiters, load);
  for_each_pair<BN>(acc, [&](int mm, int nn, float v0, float v1) {
    const int32_t m = m0 + mm, n = n0 + nn;
    if (m < p.rows && n < g.c_out)
      *reinterpret_cast<decltype(Pack2<T>::make(0.f, 0.f))*>(p.out + m * g.c_out + n) =
          p.relu ? Pack2<T>::make(fmaxf(v0, 0.f), fmaxf(v1, 0.f)) : Pack2<T>::make(v0, v1);
  });
#else
  __trap();
#endif
}

template <typename T>
struct DgradArgs {
  ImplicitConv g;
  const T* gmask;    // g' (M, s, s, C_out)
  const T* weight;   // (k*k*C_out, C_in)
  const int32_t* nbr;
  T* dsrc;           // (M, q, q, C_in)
  int32_t rows;      // rows per parity class: M * s * s
};

constexpr int DG_BM = 128, DG_BN = 64;
using DgTile = Tile<DG_BM, DG_BN, false>;
constexpr int DG_SMEM = DgTile::kABytes + (DG_BM + 1) * kNeighbours * 4;

// Input gradient, one parity class of input pixels per blockIdx.z (the class with most taps first):
// dsrc[p, ci] = sum over (class tap, co) g'(output pixel reading p, co) * w[tap, co, ci]. Block: 128
// input pixels x 64 input channels; K steps (j, i, 32 output channels).
template <typename T>
__global__ void __launch_bounds__(DgTile::kThreads, 4) scott_conv_dgrad_igemm(DgradArgs<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = DG_BM, BN = DG_BN, NT = DgTile::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + STAGES * DgTile::kAStage;
  int32_t* snb = reinterpret_cast<int32_t*>(sb + STAGES * DgTile::kBStage);
  const ImplicitConv& g = p.g;
  const ParityClass pc = parity_class_k(g.k, g.pad, 3 - static_cast<int>(blockIdx.z));  // (1,1) first: most taps at odd pad
  const int tid = threadIdx.x;
  const int32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int32_t t0 = stage_neighbours(g, p.nbr, m0, min(m0 + BM, p.rows) - 1, snb);

  // A: thread -> rows tid / 2 (+ NT / 2 per pass), two 16-byte channel vectors (tid % 2) * 16 + {0, 8}:
  // one neighbour lookup per row and K step serves both; the row's coordinates are set up here, once.
  constexpr int A_ROWS = NT / A_TPR, A_PASSES = BM / A_ROWS;
  int32_t a_nb[A_PASSES], a_y0[A_PASSES], a_x0[A_PASSES];
#pragma unroll
  for (int i = 0; i < A_PASSES; ++i) {
    const int32_t r = m0 + tid / A_TPR + i * A_ROWS;
    const DgradRow row = dgrad_row(g, pc, r < p.rows ? r : 0);
    a_nb[i] = r < p.rows ? (row.tile - t0) * kNeighbours : -1;
    a_y0[i] = row.y0;
    a_x0[i] = row.x0;
  }
  const int a_vec = (tid % A_TPR) * 8 * A_VPT;
  constexpr int B_ROWS = NT / (BN / 8), B_PASSES = BK / B_ROWS;
  const int32_t b_col = n0 + (tid % (BN / 8)) * 8;
  const bool b_ok = b_col < g.c_in;
  __syncthreads();

  const int32_t n_kx = static_cast<int32_t>(pc.n_kx);
  int32_t j = 0, i_tap = 0, c0 = 0;
  const int kiters = static_cast<int>(pc.n_ky * pc.n_kx) * ((g.c_out + BK - 1) / BK);
  auto load = [&](T* a, T* b) {
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) {
      const int32_t c = c0 + a_vec;
      const int32_t off = (a_nb[i] >= 0 && c < g.c_out)
                              ? dgrad_grad_offset(g, snb + a_nb[i], a_y0[i], a_x0[i], j, i_tap, c) : -1;
      const uint32_t dst = smem_u32(a + (tid / A_TPR + i * A_ROWS) * (BK + PAD) + a_vec);
      cp_async16(dst, p.gmask + (off < 0 ? 0 : off), off >= 0);
      cp_async16(dst + 16, p.gmask + (off < 0 ? 0 : off + 8), off >= 0 && c + 8 < g.c_out);
    }
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const int kr = tid / (BN / 8) + i * B_ROWS;
      const bool ok = b_ok && c0 + kr < g.c_out;
      const int32_t w = ok ? dgrad_weight_row(g, pc, j, i_tap, c0 + kr) * g.c_in + b_col : 0;
      cp_async16(smem_u32(b + kr * (BN + PAD) + (tid % (BN / 8)) * 8), p.weight + w, ok);
    }
    c0 += BK;
    if (c0 >= g.c_out) {
      c0 = 0;
      if (++i_tap == n_kx) { i_tap = 0; ++j; }
    }
  };
  float acc[4][4][4] = {};
  mainloop<T, BM, BN, false>(acc, sa, sb, kiters, load);
  for_each_pair<BN>(acc, [&](int mm, int nn, float v0, float v1) {
    const int32_t m = m0 + mm, n = n0 + nn;
    if (m < p.rows && n < g.c_in)
      *reinterpret_cast<decltype(Pack2<T>::make(0.f, 0.f))*>(p.dsrc + dgrad_row(g, pc, m).dst * g.c_in + n) =
          Pack2<T>::make(v0, v1);
  });
#else
  __trap();
#endif
}

template <typename T>
struct WgradArgs {
  ImplicitConv g;
  const T* src;      // (M, q, q, C_in)
  const T* gmask;    // g' (M, s, s, C_out)
  const int32_t* nbr;
  float* partial;    // (splits, k*k*C_in, C_out)
  int32_t rows;      // M * s * s
  int32_t chunk;     // output pixels per split, a multiple of BK
};

constexpr int WG_BM = 64, WG_BN = 128;
using WgTile = Tile<WG_BM, WG_BN, true>;
constexpr int WG_SMEM = WgTile::kABytes;

// Weight gradient: dw[(tap, ci), co] = sum over output pixels r of window(r, tap, ci) * g'(r, co).
// Block: one tap x 64 input channels (blockIdx.x) x 128 output channels (blockIdx.y), reducing over
// its split's output pixels (blockIdx.z) in K steps of 32 pixels; A lands [pixel][channel].
template <typename T>
__global__ void __launch_bounds__(WgTile::kThreads, 4) scott_conv_wgrad_igemm(WgradArgs<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = WG_BM, BN = WG_BN, NT = WgTile::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + STAGES * WgTile::kAStage;
  const ImplicitConv& g = p.g;
  const int tid = threadIdx.x;
  const int32_t ci_blocks = (g.c_in + BM - 1) / BM;
  const int32_t tap = blockIdx.x / ci_blocks, ci0 = (blockIdx.x - tap * ci_blocks) * BM;
  const int32_t ky = tap / g.k, kx = tap - ky * g.k;
  const int32_t n0 = blockIdx.y * BN;
  const int32_t r_begin = blockIdx.z * p.chunk;
  const int32_t r_end = min(r_begin + p.chunk, p.rows);
  // (an empty split runs no K step and stores zeros: every partial is written)

  // A: thread -> pixel row tid / 4 of the K step, two 16-byte channel vectors (tid % 4) * 16 + {0, 8}.
  // The pixel's neighbour slot is fetched one K step ahead (a global load whose latency the
  // pipeline hides); the (ky, kx) tap is fixed for the block.
  constexpr int A_TPR_W = BM / 8 / A_VPT;
  static_assert(NT / A_TPR_W == BK, "one A row per thread group and K step");
  const int a_row = tid / A_TPR_W;
  const int32_t a_ci = ci0 + (tid % A_TPR_W) * 8 * A_VPT;
  const bool a_ok = a_ci < g.c_in;
  constexpr int B_ROWS = NT / (BN / 8), B_PASSES = BK / B_ROWS;
  const int32_t b_col = n0 + (tid % (BN / 8)) * 8;
  const bool b_ok = b_col < g.c_out;

  int32_t r0 = r_begin;
  int32_t a_t = -1, a_y = 0, a_x = 0;  // the next step's neighbour slot and local pixel
  auto prepare = [&](int32_t r) {
    a_t = -1;
    if (a_ok && r < r_end) {
      const ImplicitRow row = conv_row(g, r);
      const int32_t d = conv_tap_neighbour(g, row.y0, row.x0, ky, kx, a_y, a_x);
      a_t = __ldg(p.nbr + row.tile * kNeighbours + d);
    }
  };
  prepare(r0 + a_row);
  const int kiters = (r_end - r_begin + BK - 1) / BK;
  auto load = [&](T* a, T* b) {
    {
      const int32_t off = compact_src_offset(g, a_t, a_y, a_x, a_ci);
      const uint32_t dst = smem_u32(a + a_row * (BM + PAD) + (tid % A_TPR_W) * 8 * A_VPT);
      cp_async16(dst, p.src + (off < 0 ? 0 : off), off >= 0);
      cp_async16(dst + 16, p.src + (off < 0 ? 0 : off + 8), off >= 0 && a_ci + 8 < g.c_in);
    }
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const int lr = tid / (BN / 8) + i * B_ROWS;
      const bool ok = b_ok && r0 + lr < r_end;
      cp_async16(smem_u32(b + lr * (BN + PAD) + (tid % (BN / 8)) * 8), p.gmask + (ok ? (r0 + lr) * g.c_out + b_col : 0),
                 ok);
    }
    r0 += BK;
    prepare(r0 + a_row);
  };
  float acc[4][4][4] = {};
  mainloop<T, BM, BN, true>(acc, sa, sb, kiters, load);
  const int32_t k_total = g.k * g.k * g.c_in;
  float* part = p.partial + static_cast<int32_t>(blockIdx.z) * k_total * g.c_out;
  for_each_pair<BN>(acc, [&](int mm, int nn, float v0, float v1) {
    const int32_t ci = ci0 + mm, n = n0 + nn;
    if (ci < g.c_in && n < g.c_out)
      *reinterpret_cast<float2*>(part + conv_weight_row(g, ky, kx, ci) * g.c_out + n) = make_float2(v0, v1);
  });
#else
  __trap();
#endif
}

__global__ void scott_neighbour_table(const int32_t* slot, const int64_t* tile_pos, int64_t batch, int64_t grid_h,
                                      int64_t grid_w, int32_t num_tiles, int32_t* nbr) {
  const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tiles) tile_neighbours(slot, tile_pos, t, batch, grid_h, grid_w, num_tiles, nbr + t * kNeighbours);
}

// g' = grad * (out > 0), 8 elements (16 bytes) per thread.
template <typename T>
__global__ void scott_relu_grad_mask(const T* grad, const T* out, T* gmask, int32_t vectors) {
  const int32_t v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= vectors) return;
  uint4 gv = reinterpret_cast<const uint4*>(grad)[v];
  const uint4 ov = reinterpret_cast<const uint4*>(out)[v];
  T* ge = reinterpret_cast<T*>(&gv);
  const T* oe = reinterpret_cast<const T*>(&ov);
#pragma unroll
  for (int e = 0; e < 8; ++e) ge[e] = relu_grad_value<T, float>(ge, oe, e);
  reinterpret_cast<uint4*>(gmask)[v] = gv;
}

// ---- the image stage (few input channels) -------------------------------------------------------
// Blocks are persistent over groups of 128 / (s*s) tiles (128 output pixels) and one 64-wide slice
// of output channels: the padded weight slice is loaded into shared memory once per block; per group
// the tiles' input windows are staged once (masking and uint8 normalisation fused, 4 channels per
// pixel), then A fragments come straight from the staged window by ldmatrix: each lane points at
// the 16-byte tap pair its output pixel reads, so no im2col copy is made.
template <typename T, typename S>
struct ImageArgs {
  ImageConv g;
  const S* img;
  const float* norm;     // (2, C_in) mean, 1/std, when g.normalize
  const T* weight;       // padded (k * KP * 8, C_out) (rows: image_k_to_weight_row)
  const int32_t* nbr;
  const int64_t* tile_pos;
  T* out;                // (M, s, s, C_out)
  int32_t groups;        // ceil(M / tiles per group)
  bool relu;             // out = relu(conv), else conv
};

constexpr int IM_BM = 128, IM_BN = 64;
using ImTile = Tile<IM_BM, IM_BN, false>;
// the epilogue's per-warp buffer: one 16-row slice of the warp's 64 x 32 tile, rows padded so that
// the accumulator pairs' 4-byte writes fall on distinct banks
constexpr int IM_OUT_LD = 32 + PAD;

inline int image_smem_bytes(const ImageConv& g) {
  const int tiles = g.group_tiles();
  return g.k_rows() * (IM_BN + PAD) * 2 + tiles * g.rows * g.width * kImageChannels * 2 +
         tiles * (kNeighbours + 1) * 4 + g.k * g.pairs * 4 + 16 + ImTile::kThreads / 32 * 16 * IM_OUT_LD * 2;
}

// A group's tiles' neighbour slots and window bases into shared memory (tiles = g.group_tiles()).
__device__ __forceinline__ void stage_group_tables(const ImageConv& g, const int32_t* nbr, const int64_t* tile_pos,
                                                   int32_t t_first, int32_t* s_base, int32_t* s_nb) {
  const int32_t tiles = g.group_tiles();
  for (int i = threadIdx.x; i < tiles * (kNeighbours + 1); i += blockDim.x) {
    const int32_t tl = i / (kNeighbours + 1), d = i - tl * (kNeighbours + 1), t = t_first + tl;
    if (d == kNeighbours)
      s_base[tl] = staged_tile_base(g, t < g.num_tiles ? tile_pos[t] : -1);
    else
      s_nb[tl * kNeighbours + d] = t < g.num_tiles ? nbr[t * kNeighbours + d] : -1;
  }
}

// A thread's place in the window staging: blockDim / SW window rows at a time (SW <= 128 <=
// blockDim, implicit_image_plan), one staged column per thread, fixed for the block (threads past
// the last full row idle).
struct StagingLane {
  StagedColumn col;
  int32_t row, step;  // first staged row (>= step: this thread stages nothing), rows per pass
};

__device__ __forceinline__ StagingLane staging_lane(const ImageConv& g) {
  StagingLane s;
  s.step = static_cast<int32_t>(blockDim.x) / g.width;
  s.row = static_cast<int32_t>(threadIdx.x) / g.width;
  s.col = staged_column(g, static_cast<int32_t>(threadIdx.x) - s.row * g.width);
  return s;
}

// A group's windows into shared memory ([tiles][R][SW][4]): a staged pixel costs its row's
// neighbour lookup, three loads and one 8-byte store.
template <typename T, typename S>
__device__ __forceinline__ void stage_group_windows(const ImageConv& g, const S* img, const PixelNorm<float>& pn,
                                                    const StagingLane& sl, const int32_t* s_base, const int32_t* s_nb,
                                                    T* sx) {
  if (sl.row >= sl.step) return;
  const int32_t rows = g.tiles * g.rows;
  T* dst = sx + threadIdx.x * kImageChannels;  // staged pixel (row, column) = thread (r * SW + cx)
  const int32_t dst_step = sl.step * g.width * kImageChannels;
  for (int32_t r = sl.row; r < rows; r += sl.step, dst += dst_step) {
    int32_t tl, cy;
    staged_row(g, r, tl, cy);
    const int32_t off = staged_pixel_offset(g, s_nb + tl * kNeighbours, s_base[tl], cy, sl.col);
    T v[kImageChannels];
#pragma unroll
    for (int c = 0; c < kImageChannels; ++c) v[c] = from_acc<T>(staged_value<S, float>(g, img, pn, off, c));
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(v);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(ImTile::kThreads, 4) scott_conv_image_igemm(ImageArgs<T, S> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BN = IM_BN, NT = ImTile::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  const ImageConv& g = p.g;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / (BN / 32), wn = warp % (BN / 32);
  const int32_t area = g.s * g.s, tiles = g.group_tiles(), window = g.rows * g.width;
  const int32_t k_rows = g.k_rows();
  T* sb = reinterpret_cast<T*>(smem);                        // [k_rows][BN + PAD]
  T* sx = sb + k_rows * (BN + PAD);                          // [tiles][rows][width][4]
  int32_t* s_base = reinterpret_cast<int32_t*>(sx + tiles * window * kImageChannels);  // [tiles]
  int32_t* s_nb = s_base + tiles;                            // [tiles][9]
  int32_t* s_pair = s_nb + tiles * kNeighbours;              // [k * KP]: staged pixel of each tap pair
  // this warp's [16][IM_OUT_LD], 16-byte aligned; an offset from smem (not a rounded address) keeps
  // the accesses in the shared space (STS / LDS.128, not generic ST / LD)
  const int32_t pair_end = static_cast<int32_t>(reinterpret_cast<unsigned char*>(s_pair + g.k * g.pairs) - smem);
  const int32_t out_at = (pair_end + 15) & ~15;
  T* s_out = reinterpret_cast<T*>(smem + out_at) + warp * 16 * IM_OUT_LD;
  const int32_t n0 = blockIdx.y * BN;

  for (int v = tid; v < k_rows * (BN / 8); v += NT) {
    const int32_t row = v / (BN / 8), col = n0 + (v % (BN / 8)) * 8;
    cp_async16(smem_u32(sb + row * (BN + PAD) + (v % (BN / 8)) * 8), p.weight + (col < g.c_out ? row * g.c_out + col : 0),
               col < g.c_out);
  }
  cp_async_commit();
  for (int i = tid; i < g.k * g.pairs; i += NT) s_pair[i] = staged_pair_pixel(g, 0, 0, i);

  // per lane: the staged pixel its A rows start at (for tap pair 0), for its 4 row fragments
  int32_t a_pix[4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    const int32_t row = wm * 64 + mi * 16 + lane % 16;
    const int32_t tl = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(row)));
    const int32_t rem = row - tl * area;
    const int32_t oy = static_cast<int32_t>(g.side_out.div(static_cast<uint32_t>(rem)));
    a_pix[mi] = tl * window + staged_pair_pixel(g, oy, rem - oy * g.s, 0);
  }
  int b_off[2];
#pragma unroll
  for (int nj = 0; nj < 2; ++nj)
    b_off[nj] = (lane % 8 + ((lane / 8) % 2) * 8) * (BN + PAD) + wn * 32 + nj * 16 + (lane / 16) * 8;
  const uint32_t sx_u32 = smem_u32(sx), sb_u32 = smem_u32(sb);
  const PixelNorm<float> pn = pixel_norm(g, p.norm);  // in registers for the whole block
  const StagingLane sl = staging_lane(g);
  const int32_t rows_total = g.num_tiles * area;

  for (int32_t grp = blockIdx.x; grp < p.groups; grp += gridDim.x) {
    const int32_t t_first = grp * tiles;
    __syncthreads();  // the previous group's fragments are read
    stage_group_tables(g, p.nbr, p.tile_pos, t_first, s_base, s_nb);
    __syncthreads();
    stage_group_windows<T, S>(g, p.img, pn, sl, s_base, s_nb, sx);
    cp_async_wait<0>();
    __syncthreads();

    float acc[4][4][4] = {};
    for (int32_t ks = 0; ks < k_rows / 16; ++ks) {
      const int32_t pair = s_pair[2 * ks + lane / 16];  // = staged_pair_pixel(g, 0, 0, 2 ks + lane / 16)
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) ldmatrix_x4(af[mi], sx_u32 + (a_pix[mi] + pair) * kImageChannels * 2);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, sb_u32 + 2 * (b_off[nj] + ks * 16 * (BN + PAD)));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
    // epilogue: ReLU (with p.relu), then per 16-row slice through the warp's shared buffer so that each row's
    // 32 channels leave as four 16-byte stores (c_out % 8 == 0: a vector is all in or all out)
    const int32_t m0 = t_first * area + wm * 64, nw = n0 + wn * 32;
    using P2 = decltype(Pack2<T>::make(0.f, 0.f));
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          *reinterpret_cast<P2*>(s_out + (h * 8 + lane / 4) * IM_OUT_LD + ni * 8 + (lane % 4) * 2) =
              p.relu ? Pack2<T>::make(fmaxf(acc[mi][ni][2 * h], 0.f), fmaxf(acc[mi][ni][2 * h + 1], 0.f))
                     : Pack2<T>::make(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int v = lane + 32 * j, row = v / 4, c8 = (v % 4) * 8;
        const int32_t m = m0 + mi * 16 + row, n = nw + c8;
        const uint4 val = *reinterpret_cast<const uint4*>(s_out + row * IM_OUT_LD + c8);
        if (m < rows_total && n < g.c_out) *reinterpret_cast<uint4*>(p.out + m * g.c_out + n) = val;
      }
      __syncwarp();
    }
  }
#else
  __trap();
#endif
}

// Weight gradient of the image stage: C[padded K row m, co] = sum over output pixels r of
// window(r, m) * g'(r, co). Blocks are persistent over tile groups (128 output pixels) like the
// forward and keep C (k_rows x 64 output channels) in registers across groups, one warp per 32
// K rows x 32 output channels; per group the windows are staged as in the forward and g' arrives
// by cp.async. A fragments are read transposed (ldmatrix.trans) from the staged windows: the rows
// it gathers are the 16-byte tap pairs of 8 output pixels. One block per SM (k_rows / 16 warps:
// 14 for k = 7), each writing one partial, or on sm_90 one per cluster of two blocks (see the
// end of the kernel): the partials are the only bytes this kernel adds to the image and g' it
// must read, so there are as few as fill the GPU.
template <typename T, typename S>
struct ImageWgradArgs {
  ImageConv g;
  const S* img;
  const float* norm;
  const T* gmask;        // g' (M, s, s, C_out)
  const int32_t* nbr;
  const int64_t* tile_pos;
  float* partial;        // (gridDim.x / cluster, k*k*C_in, C_out)
  int32_t groups;
  int32_t cluster;       // 1, or 2: the launch's cluster of two blocks writes one partial
};

constexpr int IW_BN = 64, IW_WN = 32, IW_MAX_WARPS = 16;

inline int image_wgrad_threads(const ImageConv& g) { return g.k_rows() / 32 * (IW_BN / IW_WN) * 32; }

// (the staging buffers; a clustered launch reuses them for its accumulators, 2 * WN / 8 float4s a thread)
inline int image_wgrad_smem_bytes(const ImageConv& g, bool cluster) {
  const int tiles = g.group_tiles();
  const int staging = IM_BM * (IW_BN + PAD) * 2 + tiles * g.rows * g.width * kImageChannels * 2 +
                      tiles * (kNeighbours + 1) * 4 + IM_BM * 4;
  const int exchange = cluster ? 2 * IW_WN / 8 * 16 * image_wgrad_threads(g) : 0;
  return staging > exchange ? staging : exchange;
}

// Whether the image weight gradient runs as clusters of two blocks (one partial per cluster): a
// device that launches clusters, running code compiled for sm_90 or later (code from sm_80,
// native or JIT-compiled from its PTX on a newer GPU, has no cluster path and traps).
template <class Kernel>
bool image_wgrad_cluster(Kernel kernel) {
  int device = 0, major = 0, clusters = 0;
  cudaFuncAttributes attr;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9 ||
      cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device) != cudaSuccess || !clusters ||
      cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.ptxVersion < 90 || attr.binaryVersion < 90) {
    cudaGetLastError();  // a failed query is an answer (no clusters), not a pending error
    return false;
  }
  return true;
}

template <typename T, typename S>
__global__ void __launch_bounds__(IW_MAX_WARPS * 32) scott_conv_image_wgrad_igemm(ImageWgradArgs<T, S> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BN = IW_BN, WN = IW_WN;
  extern __shared__ __align__(128) unsigned char smem[];
  const ImageConv& g = p.g;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nt = blockDim.x;
  const int wk = warp / (BN / WN), wn = warp % (BN / WN);  // 32 K rows x 32 channels per warp
  const int32_t area = g.s * g.s, tiles = g.group_tiles(), window = g.rows * g.width;
  T* sg = reinterpret_cast<T*>(smem);                           // g' [128 pixels][BN + PAD]
  T* sx = sg + IM_BM * (BN + PAD);                              // staged windows
  int32_t* s_base = reinterpret_cast<int32_t*>(sx + tiles * window * kImageChannels);
  int32_t* s_nb = s_base + tiles;
  int32_t* s_pix = s_nb + tiles * kNeighbours;                  // [128]: staged pixel of output pixel r
  const int32_t n0 = blockIdx.y * BN;
  for (int r = tid; r < IM_BM; r += nt) {
    const int32_t tl = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(r))), rem = r - tl * area;
    const int32_t oy = static_cast<int32_t>(g.side_out.div(static_cast<uint32_t>(rem)));
    s_pix[r] = tl * window + staged_pair_pixel(g, oy, rem - oy * g.s, 0);
  }
  // per lane: the staged offset (pixels) of the tap pair its A rows read, per 16-row fragment
  const int mat = lane / 8;
  int32_t a_pair[2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) a_pair[mi] = staged_pair_pixel(g, 0, 0, (wk * 32 + mi * 16) / 8 + mat % 2);
  const int a_pix_row = lane % 8 + (mat / 2) * 8;  // pixel within a 16-pixel K step
  int b_off[WN / 16];
#pragma unroll
  for (int nj = 0; nj < WN / 16; ++nj)
    b_off[nj] = (lane % 8 + (mat % 2) * 8) * (BN + PAD) + wn * WN + nj * 16 + (mat / 2) * 8;
  const uint32_t sx_u32 = smem_u32(sx), sg_u32 = smem_u32(sg);
  const PixelNorm<float> pn = pixel_norm(g, p.norm);
  const StagingLane sl = staging_lane(g);
  const int32_t rows_total = g.num_tiles * area;

  float acc[2][WN / 8][4] = {};
  for (int32_t grp = blockIdx.x; grp < p.groups; grp += gridDim.x) {
    const int32_t t_first = grp * tiles, m0 = t_first * area;
    __syncthreads();  // the previous group's fragments are read
    for (int v = tid; v < IM_BM * (BN / 8); v += nt) {
      const int32_t r = v / (BN / 8), col8 = n0 + (v % (BN / 8)) * 8;
      const bool ok = m0 + r < rows_total && col8 < g.c_out;
      cp_async16(sg_u32 + 2 * (r * (BN + PAD) + (v % (BN / 8)) * 8), p.gmask + (ok ? (m0 + r) * g.c_out + col8 : 0), ok);
    }
    cp_async_commit();
    stage_group_tables(g, p.nbr, p.tile_pos, t_first, s_base, s_nb);
    __syncthreads();
    stage_group_windows<T, S>(g, p.img, pn, sl, s_base, s_nb, sx);
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll 2
    for (int ks = 0; ks < IM_BM / 16; ++ks) {
      const int32_t pix = s_pix[ks * 16 + a_pix_row];
      uint32_t af[2][4], bf[WN / 8][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) ldmatrix_x4_trans(af[mi], sx_u32 + (pix + a_pair[mi]) * kImageChannels * 2);
#pragma unroll
      for (int nj = 0; nj < WN / 16; ++nj) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, sg_u32 + 2 * (b_off[nj] + ks * 16 * (BN + PAD)));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < WN / 8; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  // A cluster of two blocks (sm_90, image_wgrad_cluster) sums its two accumulators through
  // distributed shared memory and writes one partial: rank r adds its peer's half mi = r to its
  // own and stores that half. The same thread of both blocks holds the same (row, column) entries.
  const int32_t ranks = p.cluster;
  int32_t rank = 0;
  if (ranks == 2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    rank = static_cast<int32_t>(cluster.block_rank());
    float4* buf = reinterpret_cast<float4*>(smem);  // [2 * WN / 8][threads]; the staging buffers are done
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < WN / 8; ++ni)
        buf[(mi * (WN / 8) + ni) * nt + tid] = make_float4(acc[mi][ni][0], acc[mi][ni][1], acc[mi][ni][2], acc[mi][ni][3]);
    cluster.sync();  // both blocks' accumulators are in shared memory
    const float4* peer = cluster.map_shared_rank(buf, rank ^ 1);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
      if (mi == rank) {
#pragma unroll
        for (int ni = 0; ni < WN / 8; ++ni) {
          const float4 v = peer[(mi * (WN / 8) + ni) * nt + tid];
          acc[mi][ni][0] += v.x;
          acc[mi][ni][1] += v.y;
          acc[mi][ni][2] += v.z;
          acc[mi][ni][3] += v.w;
        }
      }
    cluster.sync();  // the peer has read this block's shared memory before either exits
#else
    __trap();  // launched as clusters only where this code is sm_90's (image_wgrad_cluster)
#endif
  }
  const int32_t k_total = g.k * g.k * g.c_in;
  float* part = p.partial + static_cast<int32_t>(blockIdx.x) / ranks * k_total * g.c_out;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
    if (ranks == 2 && mi != rank) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int32_t row = image_k_to_weight_row(g, wk * 32 + mi * 16 + h * 8 + lane / 4);
#pragma unroll
      for (int ni = 0; ni < WN / 8; ++ni) {
        const int32_t n = n0 + wn * WN + ni * 8 + (lane % 4) * 2;
        if (row >= 0 && n < g.c_out)
          *reinterpret_cast<float2*>(part + row * g.c_out + n) = make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
    }
  }
#else
  __trap();
#endif
}

int multiprocessors() {
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

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void launch_neighbours(const StageGeometry& g, const int32_t* slot, const int64_t* tile_pos, int32_t* nbr,
                       cudaStream_t stream) {
  const int threads = 256;
  scott_neighbour_table<<<static_cast<unsigned>((g.num_tiles + threads - 1) / threads), threads, 0, stream>>>(
      slot, tile_pos, g.batch, g.grid_h, g.grid_w, static_cast<int32_t>(g.num_tiles), nbr);
  check_launch("scott_neighbour_table");
}

template <typename T>
void launch_relu_grad_mask(const StageGeometry& g, const T* grad, const T* out, T* gmask, cudaStream_t stream) {
  const int32_t vectors = static_cast<int32_t>(g.out_rows() * g.c_out / 8);
  const int threads = 256;
  scott_relu_grad_mask<T><<<static_cast<unsigned>((vectors + threads - 1) / threads), threads, 0, stream>>>(
      grad, out, gmask, vectors);
  check_launch("scott_relu_grad_mask");
}

// The g' a backward GEMM reads: grad itself when out is nullptr (the MaxBlurPool backward wrote it
// masked already, the usual path), else grad * relu'(out) written to gmask first.
template <typename T>
const T* masked_grad(const StageGeometry& g, const void* grad, const void* out, void* gmask, cudaStream_t stream) {
  if (out == nullptr) return static_cast<const T*>(grad);
  launch_relu_grad_mask<T>(g, static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<T*>(gmask), stream);
  return static_cast<const T*>(gmask);
}

}  // namespace ig

// ---- tiled MaxBlurPool (float16 / bfloat16, sm_80+) ---------------------------------------------------
// Memory-bound: one thread per task (tokenizer.h: tile, pooled pixel, 8-channel vector), so a warp
// covers consecutive vectors of neighbouring pixels and every load is a coalesced 16-byte vector.
// No shared-memory staging and no block-wide set-up: the window's neighbours come from the tile's
// 9 slots held in registers, and the ~4x re-reads of the overlapping windows hit L1/L2, not HBM.
// Window maxima are taken two channels per instruction; the blur and the routed gradient run in
// float32 in the order of the per-element kernels (bit-identical results). Symbols
// scott::pool::scott_pool_*<T>.
namespace pool {

// Channel e (0..7) of a 16-byte vector of float16/bfloat16, as float; e is a constant after
// unrolling, so this is a register select, never an indexed (local-memory) access.
template <typename T>
__device__ __forceinline__ float lane(const uint4& v, int e) {
  const uint32_t w = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
  const unsigned short h = static_cast<unsigned short>(e & 1 ? w >> 16 : w & 0xffffu);
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  else return __half2float(__ushort_as_half(h));
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&r)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T lo = from_acc<T>(r[2 * i]), hi = from_acc<T>(r[2 * i + 1]);
    w[i] = static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&lo)) |
           static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&hi)) << 16;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ uint32_t max2(uint32_t a, uint32_t b) {
  using T2 = typename std::conditional<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat162, __half2>::type;
  const T2 m = __hmax2_nan(*reinterpret_cast<const T2*>(&a), *reinterpret_cast<const T2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&m);
}

template <typename T>
__device__ __forceinline__ uint4 max4(const uint4& a, const uint4& b, const uint4& c, const uint4& d) {
  return make_uint4(max2<T>(max2<T>(a.x, b.x), max2<T>(c.x, d.x)), max2<T>(max2<T>(a.y, b.y), max2<T>(c.y, d.y)),
                    max2<T>(max2<T>(a.z, b.z), max2<T>(c.z, d.z)), max2<T>(max2<T>(a.w, b.w), max2<T>(c.w, d.w)));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

// Lane-wise a == b of two packed pairs: 0xffff per equal lane (IEEE: a NaN equals nothing).
template <typename T>
__device__ __forceinline__ uint32_t eq_mask(uint32_t a, uint32_t b) {
  using T2 = typename std::conditional<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat162, __half2>::type;
  return __heq2_mask(*reinterpret_cast<const T2*>(&a), *reinterpret_cast<const T2*>(&b));
}

// Lane-wise a > 0 of a packed pair: 0xffff per lane.
template <typename T>
__device__ __forceinline__ uint32_t gt0_mask(uint32_t a) {
  using T2 = typename std::conditional<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat162, __half2>::type;
  const uint32_t zero = 0;
  return __hgt2_mask(*reinterpret_cast<const T2*>(&a), *reinterpret_cast<const T2*>(&zero));
}

// The R x R window of 16-byte vectors at the given offsets (pool_window_offsets), 0 where -1.
template <int R, typename T>
__device__ __forceinline__ void load_window(const T* base, const int32_t (&off)[R][R], uint4 (&win)[R][R]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j)
      win[i][j] = off[i][j] < 0 ? make_uint4(0, 0, 0, 0) : __ldg(reinterpret_cast<const uint4*>(base + off[i][j]));
}

// The 3x3 window maxima of a 4x4 window, two channels per instruction: a maximum is exact in any
// precision, so this is pool_window_max's value (a NaN anywhere in a window gives NaN, as torch).
template <typename T>
__device__ __forceinline__ void window_maxima(const uint4 (&win)[4][4], uint4 (&wm)[3][3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) wm[i][j] = max4<T>(win[i][j], win[i][j + 1], win[i + 1][j], win[i + 1][j + 1]);
}

template <typename T>
__global__ void __launch_bounds__(128) scott_pool_forward(TiledPool g, const T* act, const int32_t* slot,
                                                           const int64_t* tile_pos, T* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int32_t task = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (task >= g.tasks) return;
  const PoolTask k = pool_task(g, task);
  const PoolTile pt = pool_tile(g, slot, tile_pos, k.t);
  int32_t off[4][4];
  pool_window_offsets<4>(g, pt, g.side, 2 * k.h - 1, 2 * k.w - 1, k.v, off);
  uint4 win[4][4], wm[3][3];
  load_window<4>(act, off, win);
  window_maxima<T>(win, wm);
  float r[8];
  // the pool of relu(act): relu commutes with max, so it applies to the window maxima
  tiled_pool_values<8, float>(g, pt, k.h, k.w, [&](int i, int j, int e) {
    const float v = lane<T>(wm[i][j], e);
    return g.relu ? fmaxf(v, 0.f) : v;
  }, r);
  reinterpret_cast<uint4*>(out)[task] = pack<T>(r);
#else
  __trap();
#endif
}

template <typename T>
__global__ void __launch_bounds__(128) scott_pool_backward(TiledPool g, const T* grad, const T* act,
                                                            const int32_t* slot, const int64_t* tile_pos,
                                                            T* grad_act, bool relu_mask) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int32_t task = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (task >= g.tasks) return;
  const PoolTask k = pool_task(g, task);
  const PoolTile pt = pool_tile(g, slot, tile_pos, k.t);
  int32_t off[4][4], goff[3][3];
  pool_window_offsets<4>(g, pt, g.side, 2 * k.h - 1, 2 * k.w - 1, k.v, off);
  pool_window_offsets<3>(g, pt, g.pooled, k.h - 1, k.w - 1, k.v, goff);
  uint4 win[4][4], wm[3][3], gq[3][3];
  load_window<4>(act, off, win);
  load_window<3>(grad, goff, gq);
  window_maxima<T>(win, wm);
  // pool_first_max of every window and place, two channels per instruction: a lane of first[i][j][own][q]
  // is all ones where the pixel at place `own` of window (i, j) is the first maximum (exact compares
  // of the same values; a NaN maximum routes nowhere, as in float32)
  uint32_t first[3][3][4][4];
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t m = word(wm[i][j], q);
        const uint32_t e0 = eq_mask<T>(word(win[i][j], q), m), e1 = eq_mask<T>(word(win[i][j + 1], q), m);
        const uint32_t e2 = eq_mask<T>(word(win[i + 1][j], q), m), e3 = eq_mask<T>(word(win[i + 1][j + 1], q), m);
        first[i][j][0][q] = e0;
        first[i][j][1][q] = e1 & ~e0;
        first[i][j][2][q] = e2 & ~(e0 | e1);
        first[i][j][3][q] = e3 & ~(e0 | e1 | e2);
      }
  const auto routed = [&](int i, int j, int own, int e, float v) {
    const uint32_t lanes = __byte_perm(first[i][j][own][e >> 1], 0u, (e & 1) ? 0x3232u : 0x1010u);
    return __uint_as_float(__float_as_uint(v) & lanes);
  };
  float r[2][2][8];
  tiled_pool_quad_grads<8, float>(g, pt, k.h, k.w, routed, [&](int i, int j, int e) { return lane<T>(gq[i][j], e); },
                                  r);
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      uint4 out = pack<T>(r[a][b]);
      if (relu_mask) {  // g' = g * (act > 0), two channels per instruction, on the rounded values
        const uint4& own = win[a + 1][b + 1];
        out.x &= gt0_mask<T>(own.x);
        out.y &= gt0_mask<T>(own.y);
        out.z &= gt0_mask<T>(own.z);
        out.w &= gt0_mask<T>(own.w);
      }
      const int32_t y = 2 * k.h + a, x = 2 * k.w + b;
      *reinterpret_cast<uint4*>(grad_act + ((k.t * g.side + y) * g.side + x) * g.channels + k.v * 8) = out;
    }
#else
  __trap();
#endif
}

template <typename T>
bool launch_forward(const PoolGeometry& geo, DType dtype, const void* act, const int32_t* slot,
                    const int64_t* tile_pos, void* out, bool relu, cudaStream_t stream) {
  TiledPool g;
  if (!cuda_tiled_pool(geo, dtype) || tiled_pool_plan(geo, g) != nullptr || !ig::aligned16(act) ||
      !ig::aligned16(out))
    return false;
  g.relu = relu;
  if (g.tasks == 0) return true;
  scott_pool_forward<T><<<static_cast<unsigned>((g.tasks + 127) / 128), 128, 0, stream>>>(
      g, static_cast<const T*>(act), slot, tile_pos, static_cast<T*>(out));
  check_launch("scott_pool_forward");
  return true;
}

template <typename T>
bool launch_backward(const PoolGeometry& geo, DType dtype, const void* grad, const void* act, const int32_t* slot,
                     const int64_t* tile_pos, void* grad_act, bool relu_mask, cudaStream_t stream) {
  TiledPool g;
  if (!cuda_tiled_pool(geo, dtype) || tiled_pool_plan(geo, g) != nullptr || !ig::aligned16(grad) ||
      !ig::aligned16(act) || !ig::aligned16(grad_act))
    return false;
  if (g.tasks == 0) return true;
  scott_pool_backward<T><<<static_cast<unsigned>((g.tasks + 127) / 128), 128, 0, stream>>>(
      g, static_cast<const T*>(grad), static_cast<const T*>(act), slot, tile_pos, static_cast<T*>(grad_act),
      relu_mask);
  check_launch("scott_pool_backward");
  return true;
}

}  // namespace pool

namespace {

}  // namespace

#define SCOTT_CUDA_DISPATCH(dtype, ...)                        \
  do {                                                         \
    switch (dtype) {                                           \
      case DType::kFloat32: { using T = float; __VA_ARGS__; break; }            \
      case DType::kFloat64: { using T = double; __VA_ARGS__; break; }           \
      case DType::kFloat16: { using T = __half; __VA_ARGS__; break; }           \
      case DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }   \
    }                                                          \
  } while (0)

bool cuda_implicit_conv(const StageGeometry& g, DType dtype, int64_t splits, ConvOp op) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && g_tensor_cores && device_has_tensor_cores() &&
         conv_gemm_refusal(g, splits, op) == nullptr;
}

namespace {
// The implicit path when it applies (and every pointer is 16-byte aligned), else false.
template <typename T>
bool implicit_forward(const StageGeometry& g, DType dtype, const void* src, const void* weight_t, const int32_t* slot,
                      const int64_t* tile_pos, void* out, bool relu, int32_t* nbr, cudaStream_t stream) {
  if constexpr (IsTensorCoreType<T>::value) {
    ImplicitConv ic;
    if (g.src_image || !cuda_implicit_conv(g, dtype, 1, ConvOp::kForward) || nbr == nullptr || !ig::aligned16(src) || !ig::aligned16(weight_t) ||
        !ig::aligned16(out) || !ig::aligned16(nbr))
      return false;
    implicit_conv_plan(g, 1, ic);
    ig::launch_neighbours(g, slot, tile_pos, nbr, stream);
    ig::FwdArgs<T> args{ic, static_cast<const T*>(src), static_cast<const T*>(weight_t), nbr, static_cast<T*>(out),
                        static_cast<int32_t>(g.out_rows()), relu};
    const dim3 grid((args.rows + ig::FWD_BM - 1) / ig::FWD_BM, (ic.c_out + ig::FWD_BN - 1) / ig::FWD_BN);
    ig::allow_smem(ig::scott_conv_fwd_igemm<T>, ig::FWD_SMEM);
    ig::scott_conv_fwd_igemm<T><<<grid, ig::FwdTile::kThreads, ig::FWD_SMEM, stream>>>(args);
    check_launch("scott_conv_fwd_igemm");
    return true;
  }
  return false;
}

template <typename T, typename S>
bool implicit_image(const StageGeometry& g, DType dtype, const void* src, const void* weight_pad, const void* norm,
                    const int32_t* slot, const int64_t* tile_pos, void* out, bool relu, int32_t* nbr,
                    cudaStream_t stream) {
  if constexpr (IsTensorCoreType<T>::value) {
    ImageConv ic;
    if (!g.src_image || !cuda_implicit_conv(g, dtype, 1, ConvOp::kForward)) return false;
    // the caller passes the padded weight exactly when this path applies (conv_gemm_path), so there
    // is no falling back from here
    if (nbr == nullptr || !ig::aligned16(weight_pad) || !ig::aligned16(out) || (g.normalize && norm == nullptr))
      throw std::invalid_argument("conv_relu: the image stage's implicit GEMM needs a neighbour scratch table and "
                                  "16-byte aligned padded weight and output");
    implicit_image_plan(g, ic);
    ig::launch_neighbours(g, slot, tile_pos, nbr, stream);
    const int tiles = ic.group_tiles();
    const int32_t groups = (ic.num_tiles + tiles - 1) / tiles;
    ig::ImageArgs<T, S> args{ic, static_cast<const S*>(src), static_cast<const float*>(norm),
                             static_cast<const T*>(weight_pad), nbr, tile_pos, static_cast<T*>(out), groups, relu};
    const int persistent = 4 * ig::multiprocessors();  // about the blocks that fit at once: the weight slice loads once per block
    const dim3 grid(static_cast<unsigned>(groups < persistent ? groups : persistent),
                    static_cast<unsigned>((ic.c_out + ig::IM_BN - 1) / ig::IM_BN));
    const int bytes = ig::image_smem_bytes(ic);
    ig::allow_smem(ig::scott_conv_image_igemm<T, S>, bytes);
    ig::scott_conv_image_igemm<T, S><<<grid, ig::ImTile::kThreads, bytes, stream>>>(args);
    check_launch("scott_conv_image_igemm");
    return true;
  }
  return false;
}

template <typename T, typename S>
bool implicit_image_wgrad(const StageGeometry& g, DType dtype, const void* src, const void* grad, const void* out,
                          const void* norm, const int32_t* slot, const int64_t* tile_pos, void* partial,
                          int64_t splits, int32_t* nbr, void* gmask, cudaStream_t stream) {
  if constexpr (IsTensorCoreType<T>::value) {
    ImageConv ic;
    if (!g.src_image || !cuda_implicit_conv(g, dtype, splits, ConvOp::kWeightGrad)) return false;
    implicit_image_wgrad_plan(g, ic);
    const int tiles = ic.group_tiles();
    const int32_t groups = (ic.num_tiles + tiles - 1) / tiles;
    // `splits` partials: the caller sizes them (conv_gemm_path says this path applies)
    if (nbr == nullptr || (out != nullptr && gmask == nullptr) || splits < 1 || splits > 65535 ||
        (g.normalize && norm == nullptr) || !ig::aligned16(grad) || !ig::aligned16(out) || !ig::aligned16(gmask) ||
        !ig::aligned16(partial))
      throw std::invalid_argument("conv_relu_wgrad: the image stage's implicit GEMM needs scratch tables, at least "
                                  "one split and 16-byte aligned buffers");
    ig::launch_neighbours(g, slot, tile_pos, nbr, stream);
    const T* gm = ig::masked_grad<T>(g, grad, out, gmask, stream);
    ig::ImageWgradArgs<T, S> args{ic, static_cast<const S*>(src), static_cast<const float*>(norm),
                                  gm, nbr, tile_pos, static_cast<float*>(partial), groups,
                                  1};
    // one partial per block, or per cluster of two blocks (sm_90): `splits` partials either way
    auto kernel = ig::scott_conv_image_wgrad_igemm<T, S>;
    const bool cluster = splits <= 32767 && ig::image_wgrad_cluster(kernel);
    args.cluster = cluster ? 2 : 1;
    const int bytes = ig::image_wgrad_smem_bytes(ic, cluster);
    ig::allow_smem(kernel, bytes);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(splits * (cluster ? 2 : 1)),
                       static_cast<unsigned>((ic.c_out + ig::IW_BN - 1) / ig::IW_BN));
    cfg.blockDim = dim3(static_cast<unsigned>(ig::image_wgrad_threads(ic)));
    cfg.dynamicSmemBytes = static_cast<size_t>(bytes);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster ? 2 : 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = cluster ? 1 : 0;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args);
    cudaGetLastError();
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("scott_conv_image_wgrad_igemm: CUDA launch failed: ") +
                               cudaGetErrorString(err));
    return true;
  }
  return false;
}

template <typename T>
bool implicit_wgrad(const StageGeometry& g, DType dtype, const void* src, const void* grad, const void* out,
                    const int32_t* slot, const int64_t* tile_pos, void* partial, int64_t splits, int32_t* nbr,
                    void* gmask, cudaStream_t stream) {
  if constexpr (IsTensorCoreType<T>::value) {
    ImplicitConv ic;
    if (splits < 1) splits = 1;
    if (g.src_image || !cuda_implicit_conv(g, dtype, splits, ConvOp::kWeightGrad) || splits > 65535 || nbr == nullptr ||
        (out != nullptr && gmask == nullptr) ||
        !ig::aligned16(src) || !ig::aligned16(grad) || !ig::aligned16(out) || !ig::aligned16(gmask) ||
        !ig::aligned16(partial) || !ig::aligned16(nbr))
      return false;
    implicit_conv_plan(g, splits, ic);
    ig::launch_neighbours(g, slot, tile_pos, nbr, stream);
    const T* gm = ig::masked_grad<T>(g, grad, out, gmask, stream);
    const int32_t rows = static_cast<int32_t>(g.out_rows());
    const int32_t chunk = static_cast<int32_t>(((rows + splits - 1) / splits + ig::BK - 1) / ig::BK * ig::BK);
    ig::WgradArgs<T> args{ic, static_cast<const T*>(src), gm, nbr,
                          static_cast<float*>(partial), rows, chunk};
    const dim3 grid(ic.k * ic.k * ((ic.c_in + ig::WG_BM - 1) / ig::WG_BM), (ic.c_out + ig::WG_BN - 1) / ig::WG_BN,
                    static_cast<unsigned>(splits));
    ig::allow_smem(ig::scott_conv_wgrad_igemm<T>, ig::WG_SMEM);
    ig::scott_conv_wgrad_igemm<T><<<grid, ig::WgTile::kThreads, ig::WG_SMEM, stream>>>(args);
    check_launch("scott_conv_wgrad_igemm");
    return true;
  }
  return false;
}

template <typename T>
bool implicit_dgrad(const StageGeometry& g, DType dtype, const void* grad, const void* out, const void* weight_t,
                    const int32_t* slot, const int64_t* tile_pos, void* grad_src, int32_t* nbr, void* gmask,
                    cudaStream_t stream) {
  if constexpr (IsTensorCoreType<T>::value) {
    ImplicitConv ic;
    if (g.src_image || !cuda_implicit_conv(g, dtype, 1, ConvOp::kInputGrad) || nbr == nullptr ||
        (out != nullptr && gmask == nullptr) || !ig::aligned16(grad) ||
        !ig::aligned16(out) || !ig::aligned16(weight_t) || !ig::aligned16(grad_src) || !ig::aligned16(gmask) ||
        !ig::aligned16(nbr))
      return false;
    implicit_conv_plan(g, 1, ic);
    ig::launch_neighbours(g, slot, tile_pos, nbr, stream);
    const T* gm = ig::masked_grad<T>(g, grad, out, gmask, stream);
    ig::DgradArgs<T> args{ic, gm, static_cast<const T*>(weight_t), nbr,
                          static_cast<T*>(grad_src), static_cast<int32_t>(g.out_rows())};
    const dim3 grid((args.rows + ig::DG_BM - 1) / ig::DG_BM, (ic.c_in + ig::DG_BN - 1) / ig::DG_BN, 4);
    ig::allow_smem(ig::scott_conv_dgrad_igemm<T>, ig::DG_SMEM);
    ig::scott_conv_dgrad_igemm<T><<<grid, ig::DgTile::kThreads, ig::DG_SMEM, stream>>>(args);
    check_launch("scott_conv_dgrad_igemm");
    return true;
  }
  return false;
}
}  // namespace

void conv_relu_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                    const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu,
                    int32_t* nbr, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
    if (src_dtype == kUInt8
            ? implicit_image<T, uint8_t>(g, dtype, src, weight_t, norm, slot, tile_pos, out, relu, nbr, s)
            : (implicit_image<T, T>(g, dtype, src, weight_t, norm, slot, tile_pos, out, relu, nbr, s) ||
               implicit_forward<T>(g, dtype, src, weight_t, slot, tile_pos, out, relu, nbr, s)))
      break;
    DenseMatrix<T, A> w{static_cast<const T*>(weight_t), g.c_out};
    StoreRelu<T, A> st{static_cast<T*>(out), static_cast<int32_t>(g.c_out), relu ? 0u : ~0u};
    const int64_t K = g.ksize * g.ksize * g.c_in;
    if (src_dtype == kUInt8) {
      ConvWindow<uint8_t, A> win{g, static_cast<const uint8_t*>(src), slot, tile_pos, static_cast<const A*>(norm)};
      launch_gemm_for<T, A>("conv_relu_cuda", g.out_rows(), g.c_out, K, 1, win, w, st, s);
    } else {
      ConvWindow<T, A> win{g, static_cast<const T*>(src), slot, tile_pos, static_cast<const A*>(norm)};
      launch_gemm_for<T, A>("conv_relu_cuda", g.out_rows(), g.c_out, K, 1, win, w, st, s);
    }
  });
}

bool cuda_image_wgrad_clusters(DType dtype, int src_dtype) {
  // the launch's own test (implicit_image_wgrad) on the kernel it would launch
  const bool u8 = src_dtype == kUInt8;
  if (dtype == DType::kFloat16)
    return u8 ? ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__half, uint8_t>)
              : ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__half, __half>);
  if (dtype == DType::kBFloat16)
    return u8 ? ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__nv_bfloat16, uint8_t>)
              : ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__nv_bfloat16, __nv_bfloat16>);
  return false;
}

void conv_relu_wgrad_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                          const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                          void* partial, int64_t splits, int32_t* nbr, void* gmask, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
    if (src_dtype == kUInt8
            ? implicit_image_wgrad<T, uint8_t>(g, dtype, src, grad, out, norm, slot, tile_pos, partial, splits, nbr,
                                               gmask, s)
            : (implicit_image_wgrad<T, T>(g, dtype, src, grad, out, norm, slot, tile_pos, partial, splits, nbr, gmask,
                                          s) ||
               implicit_wgrad<T>(g, dtype, src, grad, out, slot, tile_pos, partial, splits, nbr, gmask, s)))
      break;
    ReluGrad<T, A> g_relu{static_cast<const T*>(grad), static_cast<const T*>(out), g.c_out};
    const int64_t K_total = g.ksize * g.ksize * g.c_in;
    StorePartial<A> st{static_cast<A*>(partial), K_total, g.c_out};
    if (src_dtype == kUInt8) {
      ConvWindow<uint8_t, A> win{g, static_cast<const uint8_t*>(src), slot, tile_pos, static_cast<const A*>(norm)};
      launch_gemm_for<T, A>("conv_relu_wgrad_cuda", K_total, g.c_out, g.out_rows(), splits, Transposed<decltype(win)>{win},
                     g_relu, st, s);
    } else {
      ConvWindow<T, A> win{g, static_cast<const T*>(src), slot, tile_pos, static_cast<const A*>(norm)};
      launch_gemm_for<T, A>("conv_relu_wgrad_cuda", K_total, g.c_out, g.out_rows(), splits, Transposed<decltype(win)>{win},
                     g_relu, st, s);
    }
  });
}

void conv_relu_dgrad_cuda(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                          const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src,
                          int32_t* nbr, void* gmask, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
    if (implicit_dgrad<T>(g, dtype, grad, out, weight_t, slot, tile_pos, grad_src, nbr, gmask, s)) break;
    for (int cls = 0; cls < 4; ++cls) {  // parity classes of input pixels (tokenizer.h)
      const ParityClass pc = parity_class(g, cls);
      ReluGradWindow<T, A> win{g, pc, static_cast<const T*>(grad), static_cast<const T*>(out), slot, tile_pos};
      ClassWeights<T, A> w{g, pc, static_cast<const T*>(weight_t)};
      StoreClassRows<T, A> st{static_cast<T*>(grad_src), g, pc};
      launch_gemm_for<T, A>("conv_relu_dgrad_cuda", g.in_rows() / 4, g.c_in, pc.n_ky * pc.n_kx * g.c_out, 1, win, w, st, s);
    }
  });
}

void set_tensor_cores(bool enabled) { g_tensor_cores = enabled; }

bool cuda_tiled_pool(const PoolGeometry& g, DType dtype) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && device_has_tensor_cores() &&
         pool_refusal(g) == nullptr;
}

void max_blur_pool_cuda(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                        const int64_t* tile_pos, void* out, bool relu, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t rows = g.num_tiles * (g.side / 2) * (g.side / 2);
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
    if constexpr (!std::is_same<T, A>::value) {
      if (pool::launch_forward<T>(g, dtype, act, slot, tile_pos, out, relu, s)) break;
    }
    PoolForward<T, A> f{g, static_cast<const T*>(act), slot, tile_pos, relu};
    launch_elementwise<T, A>("max_blur_pool_cuda", rows, g.channels, static_cast<T*>(out), f, s);
  });
}

void max_blur_pool_backward_cuda(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                 const int32_t* slot, const int64_t* tile_pos, void* grad_act, bool relu_mask,
                                 void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t rows = g.num_tiles * g.side * g.side;
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
    if constexpr (!std::is_same<T, A>::value) {
      if (pool::launch_backward<T>(g, dtype, grad, act, slot, tile_pos, grad_act, relu_mask, s)) break;
    }
    PoolBackward<T, A> f{g, static_cast<const T*>(grad), static_cast<const T*>(act), slot, tile_pos, relu_mask};
    launch_elementwise<T, A>("max_blur_pool_backward_cuda", rows, g.channels, static_cast<T*>(grad_act), f, s);
  });
}

}  // namespace scott
