// MaxBlurPool forward and backward on CUDA: the tiled kernels (float16 / bfloat16, sm_80+) and the
// per-element kernels for everything else (one thread per output element, 64-bit indices).
#include "cuda_common.cuh"

namespace scott {

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
__device__ __forceinline__ uint4 max4(const uint4& a, const uint4& b, const uint4& c, const uint4& d) {
  return make_uint4(max_of2<T>(max_of2<T>(a.x, b.x), max_of2<T>(c.x, d.x)),
                    max_of2<T>(max_of2<T>(a.y, b.y), max_of2<T>(c.y, d.y)),
                    max_of2<T>(max_of2<T>(a.z, b.z), max_of2<T>(c.z, d.z)),
                    max_of2<T>(max_of2<T>(a.w, b.w), max_of2<T>(c.w, d.w)));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
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
    return g.relu ? relu_of(v) : v;
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
  uint4 win[4][4], gq[3][3];
  load_window<4>(act, off, win);
  load_window<3>(grad, goff, gq);
  // pool_window_argmax per window, place and pair of channels (route2, two channels per instruction),
  // taken where the routed gradient is summed: a lane of the mask is all ones where window (i, j)
  // routes to the pixel at place `own`
  const auto routed = [&](int i, int j, int own, int e, float v) {
    const int q = e >> 1;
    const uint32_t mask = route2<T>(word(win[i][j], q), word(win[i][j + 1], q), word(win[i + 1][j], q),
                                    word(win[i + 1][j + 1], q), own);
    const uint32_t lanes = __byte_perm(mask, 0u, (e & 1) ? 0x3232u : 0x1010u);
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
      if (relu_mask) {  // g' = g * relu'(act) (relu_passes), two channels per instruction, on the rounded values
        const uint4& own = win[a + 1][b + 1];
        out.x &= relu_passes2<T>(own.x);
        out.y &= relu_passes2<T>(own.y);
        out.z &= relu_passes2<T>(own.z);
        out.w &= relu_passes2<T>(own.w);
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
  if (!cuda_tiled_pool(geo, dtype) || tiled_pool_plan(geo, g) != nullptr || !aligned16(act) ||
      !aligned16(out))
    return false;
  g.relu = relu;
  if (g.tasks == 0) return true;
  SCOTT_LAUNCH(static_cast<unsigned>((g.tasks + 127) / 128), 128, 0, stream, scott_pool_forward<T>)(
      g, static_cast<const T*>(act), slot, tile_pos, static_cast<T*>(out));
  check_launch("scott_pool_forward");
  return true;
}

template <typename T>
bool launch_backward(const PoolGeometry& geo, DType dtype, const void* grad, const void* act, const int32_t* slot,
                     const int64_t* tile_pos, void* grad_act, bool relu_mask, cudaStream_t stream) {
  TiledPool g;
  if (!cuda_tiled_pool(geo, dtype) || tiled_pool_plan(geo, g) != nullptr || !aligned16(grad) ||
      !aligned16(act) || !aligned16(grad_act))
    return false;
  if (g.tasks == 0) return true;
  SCOTT_LAUNCH(static_cast<unsigned>((g.tasks + 127) / 128), 128, 0, stream, scott_pool_backward<T>)(
      g, static_cast<const T*>(grad), static_cast<const T*>(act), slot, tile_pos, static_cast<T*>(grad_act),
      relu_mask);
  check_launch("scott_pool_backward");
  return true;
}

}  // namespace pool

namespace {

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
  SCOTT_LAUNCH(static_cast<unsigned>(blocks < 65535 * 64 ? blocks : 65535 * 64), threads, 0, stream, elementwise_kernel<T, A, F>)(
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
