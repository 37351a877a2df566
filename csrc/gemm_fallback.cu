// The conv stages' gather GEMM, for everything the implicit GEMMs refuse (float32/float64, shapes
// they do not take): one tiled shared-memory GEMM template over operands gathered per element
// (conv_operands.h), on WMMA for float16/bfloat16 on sm_80+, on CUDA cores otherwise; 64-bit
// indices. Also the conv entry points, which try the implicit paths first.
#include <mma.h>

#include "cuda_common.cuh"

namespace scott {
namespace {

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
  SCOTT_LAUNCH(grid, kThreads, 0, stream, gather_gemm_kernel<A, LoadA, LoadB, Store>)(M, N, K, k_chunk, a, b, s);
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
      SCOTT_LAUNCH(grid, TC_THREADS, 0, stream, wmma_gemm_kernel<T, LoadA, LoadB, Store>)(M, N, K, k_chunk, a, b, s);
      check_launch(name);
      return;
    }
  }
  launch_gemm<A>(name, M, N, K, splits, a, b, s, stream);
}

// The forward's store: relu_of(acc) with the ReLU, else acc. The float epilogue masks the bits of
// a non-positive accumulator with `negatives` (0: +0, relu_of's value; ~0: acc as it is),
// an operand the instruction reads from the kernel's parameters: no branch, no extra register.
template <typename T, typename A>
struct StoreRelu {
  T* out;
  int32_t cols;        // C_out
  uint32_t negatives;  // 0 with the ReLU, ~0 without
  __device__ A prepare(A acc) const {
    if constexpr (std::is_same<A, float>::value)
      return relu_passes(acc) ? acc : __uint_as_float(__float_as_uint(acc) & negatives);
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

}  // namespace

bool cuda_implicit_conv(const StageGeometry& g, DType dtype, int64_t splits, ConvOp op) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && g_tensor_cores && device_has_tensor_cores() &&
         conv_gemm_refusal(g, splits, op) == nullptr;
}

void conv_relu_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                    const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu,
                    int32_t* nbr, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (ig::launch_image(g, dtype, src_dtype, src, weight_t, norm, slot, tile_pos, out, relu, nbr, s) ||
      ig::launch_forward(g, dtype, src, weight_t, slot, tile_pos, out, relu, nbr, s))
    return;
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
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

void conv_relu_wgrad_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                          const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                          void* partial, int64_t splits, int32_t* nbr, void* gmask, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (ig::launch_image_wgrad(g, dtype, src_dtype, src, grad, out, norm, slot, tile_pos, partial, splits, nbr, gmask,
                             s) ||
      ig::launch_wgrad(g, dtype, src, grad, out, slot, tile_pos, partial, splits, nbr, gmask, s))
    return;
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
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
  if (ig::launch_dgrad(g, dtype, grad, out, weight_t, slot, tile_pos, grad_src, nbr, gmask, s)) return;
  SCOTT_CUDA_DISPATCH(dtype, {
    using A = typename Acc<T>::type;
    for (int cls = 0; cls < 4; ++cls) {  // parity classes of input pixels (conv_operands.h)
      const ParityClass pc = parity_class(g, cls);
      ReluGradWindow<T, A> win{g, pc, static_cast<const T*>(grad), static_cast<const T*>(out), slot, tile_pos};
      ClassWeights<T, A> w{g, pc, static_cast<const T*>(weight_t)};
      StoreClassRows<T, A> st{static_cast<T*>(grad_src), g, pc};
      launch_gemm_for<T, A>("conv_relu_dgrad_cuda", g.in_rows() / 4, g.c_in, pc.n_ky * pc.n_kx * g.c_out, 1, win, w, st, s);
    }
  });
}

void set_tensor_cores(bool enabled) { g_tensor_cores = enabled; }

}  // namespace scott
