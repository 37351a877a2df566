// The SCOTT tokenizer's stage kernels over compact visible-patch activations, shared by the C++
// CPU implementation and the CUDA one: every index computation lives here, as host/device
// functions, so the CPU build (tested in CI against the dense reference) checks the exact logic
// the GPU kernels run.
//
// Layouts (the same as the triton backend's):
//   slot      (B, GH, GW) int32   grid position -> tile index, or -1 where the patch is masked
//   tile_pos  (M,)        int64   tile index -> flat grid position b * GH * GW + gy * GW + gx
//   compact activations (M, side, side, C), channel-last, one block per visible patch
//   images (B, C, H, W) with any strides, read in place (masking fused into the load)
//   conv weights as GEMM operands: forward (k, k, C_in, C_out), input gradient (k, k, C_out, C_in)
//
// A conv stage (stride 2, pad k/2, input patch side q, output side s = q/2) is three GEMMs:
//   forward  out[r, co] = relu(sum_kk window(r, kk) * w[kk, co])          r over M*s*s outputs
//   wgrad    dw[kk, co] = sum_r window(r, kk) * g'(r, co)                 g' = grad * (out > 0)
//   dgrad    din[p, ci] = sum_(ky,kx,co) g'(out pixel reading p via (ky,kx), co) * w[ky,kx,co,ci]
//            (per parity class of p: only a quarter of the taps can read a given pixel)
// with `window` gathering the input through `slot` (zero outside the image or in masked patches).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "patch_tiles.h"  // SCOTT_HD, DType

namespace scott {

struct StageGeometry {
  int64_t num_tiles = 0;                      // M visible patches
  int64_t batch = 0, grid_h = 0, grid_w = 0;  // patch grid
  int64_t in_side = 0;                        // conv input patch side q (output side q / 2)
  int64_t ksize = 0;                          // odd kernel size k
  int64_t c_in = 0, c_out = 0;
  int64_t s_b = 0, s_c = 0, s_h = 0, s_w = 0;  // image strides in elements (src_image only)
  bool src_image = false;                      // stage 0 reads the (B, C, H, W) images
  bool normalize = false;                      // (x - mean[c]) * inv_std[c] on load (images only)

  SCOTT_HD int64_t out_side() const { return in_side / 2; }
  SCOTT_HD int64_t pad() const { return ksize / 2; }
  SCOTT_HD int64_t out_rows() const { return num_tiles * out_side() * out_side(); }
  SCOTT_HD int64_t in_rows() const { return num_tiles * in_side * in_side; }
};

// ---- scalar conversions ----------------------------------------------------------------------
template <typename A, typename T>
SCOTT_HD A to_acc(T v) { return static_cast<A>(v); }
template <typename T, typename A>
SCOTT_HD T from_acc(A v) { return static_cast<T>(v); }
#if defined(__CUDACC__)
template <> SCOTT_HD float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> SCOTT_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> SCOTT_HD __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> SCOTT_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
#endif

// ---- geometry ----------------------------------------------------------------------------------
// Row `row` of a compact (M, side, side, C) tensor -> batch and global pixel (y, x). A tile
// position outside the grid (a corrupt table) maps to a pixel far outside the image, which every
// reader treats as zero, so no table can make a kernel address memory it does not own.
SCOTT_HD void tile_coords(const int64_t* tile_pos, int64_t row, int64_t side, int64_t batch, int64_t grid_h,
                          int64_t grid_w, int64_t& b, int64_t& y, int64_t& x) {
  const int64_t area = side * side;
  const int64_t tile = row / area, rem = row % area;
  const int64_t pos = tile_pos[tile];
  const int64_t cells = grid_h * grid_w;
  if (pos < 0 || pos >= batch * cells) {
    b = 0;
    y = x = -(int64_t(1) << 40);
    return;
  }
  b = pos / cells;
  y = (pos % cells) / grid_w * side + rem / side;
  x = pos % grid_w * side + rem % side;
}

// Offset of global pixel (y, x), channel c, in a compact (M, side, side, C) tensor, or -1 when the
// pixel is outside the image or its patch is masked (or names no tile).
SCOTT_HD int64_t compact_offset(const int32_t* slot, int64_t b, int64_t y, int64_t x, int64_t c, int64_t grid_h,
                                int64_t grid_w, int64_t side, int64_t channels, int64_t num_tiles) {
  if (y < 0 || x < 0 || y >= grid_h * side || x >= grid_w * side) return -1;
  const int64_t py = y / side, px = x / side;
  const int64_t s = slot[(b * grid_h + py) * grid_w + px];
  if (s < 0 || s >= num_tiles) return -1;
  return ((s * side + (y - py * side)) * side + (x - px * side)) * channels + c;
}

// ---- GEMM operands ------------------------------------------------------------------------------
// The conv's input window: element (r, kk), kk ordered (ky, kx, ci). Forward's A and wgrad's A^T.
template <typename S, typename A>
struct ConvWindow {
  StageGeometry g;
  const S* src;
  const int32_t* slot;
  const int64_t* tile_pos;
  const A* norm;  // (2, C_in): mean, inv_std; used when g.normalize

  SCOTT_HD A operator()(int64_t r, int64_t kk) const {
    int64_t b, oy, ox;
    tile_coords(tile_pos, r, g.out_side(), g.batch, g.grid_h, g.grid_w, b, oy, ox);
    const int64_t ky = kk / (g.ksize * g.c_in), kx = kk / g.c_in % g.ksize, ci = kk % g.c_in;
    const int64_t iy = 2 * oy - g.pad() + ky, ix = 2 * ox - g.pad() + kx;
    if (g.src_image) {
      if (iy < 0 || ix < 0 || iy >= g.grid_h * g.in_side || ix >= g.grid_w * g.in_side) return A(0);
      const int64_t s = slot[(b * g.grid_h + iy / g.in_side) * g.grid_w + ix / g.in_side];
      if (s < 0 || s >= g.num_tiles) return A(0);
      A v = to_acc<A>(src[b * g.s_b + ci * g.s_c + iy * g.s_h + ix * g.s_w]);
      if (g.normalize) v = (v - norm[ci]) * norm[g.c_in + ci];
      return v;
    }
    const int64_t off = compact_offset(slot, b, iy, ix, ci, g.grid_h, g.grid_w, g.in_side, g.c_in, g.num_tiles);
    return off < 0 ? A(0) : to_acc<A>(src[off]);
  }
};

// A dense row-major (rows, cols) matrix: the weight operands.
template <typename T, typename A>
struct DenseMatrix {
  const T* data;
  int64_t cols;
  SCOTT_HD A operator()(int64_t r, int64_t c) const { return to_acc<A>(data[r * cols + c]); }
};

// The output gradient through the ReLU, g'(r, co), at compact output row r.
template <typename T, typename A>
struct ReluGrad {
  const T* grad;
  const T* out;
  int64_t c_out;
  SCOTT_HD A operator()(int64_t r, int64_t co) const {
    const int64_t i = r * c_out + co;
    return to_acc<A>(out[i]) > A(0) ? to_acc<A>(grad[i]) : A(0);
  }
};

// dgrad runs per parity class of input pixel: a stride-2 conv reads input row iy only through
// taps ky with (iy + pad - ky) even, so the pixels with local (y % 2, x % 2) = (cy, cx) reduce
// over taps ky = ky0 + 2j, kx = kx0 + 2i only: a quarter of the k*k*C_out reduction.
struct ParityClass {
  int64_t cy = 0, cx = 0, ky0 = 0, kx0 = 0, n_ky = 0, n_kx = 0;
};

SCOTT_HD ParityClass parity_class(const StageGeometry& g, int cls) {
  ParityClass pc;
  pc.cy = cls / 2;
  pc.cx = cls % 2;
  pc.ky0 = (pc.cy + g.pad()) % 2;
  pc.kx0 = (pc.cx + g.pad()) % 2;
  pc.n_ky = (g.ksize - pc.ky0 + 1) / 2;
  pc.n_kx = (g.ksize - pc.kx0 + 1) / 2;
  return pc;
}

// Class row m (tile, ry, rx) -> row of the compact (M, q, q, C_in) input.
SCOTT_HD int64_t class_row(const StageGeometry& g, const ParityClass& pc, int64_t m) {
  const int64_t half = g.in_side / 2;
  const int64_t tile = m / (half * half), rem = m % (half * half);
  const int64_t ly = 2 * (rem / half) + pc.cy, lx = 2 * (rem % half) + pc.cx;
  return (tile * g.in_side + ly) * g.in_side + lx;
}

// Reduction index kk = (j, i, co) of a class -> tap (ky0 + 2j, kx0 + 2i) and output channel co.
SCOTT_HD void class_tap(const StageGeometry& g, const ParityClass& pc, int64_t kk, int64_t& ky, int64_t& kx,
                        int64_t& co) {
  ky = pc.ky0 + 2 * (kk / (pc.n_kx * g.c_out));
  kx = pc.kx0 + 2 * (kk / g.c_out % pc.n_kx);
  co = kk % g.c_out;
}

// dgrad's A for one class: (m, kk) with kk = (j, i, co) -> the ReLU'd gradient of the output pixel
// that reads input pixel class_row(m) through tap (ky0 + 2j, kx0 + 2i), or 0 if there is none.
template <typename T, typename A>
struct ReluGradWindow {
  StageGeometry g;
  ParityClass pc;
  const T* grad;
  const T* out;
  const int32_t* slot;
  const int64_t* tile_pos;

  SCOTT_HD A operator()(int64_t m, int64_t kk) const {
    int64_t b, iy, ix, ky, kx, co;
    tile_coords(tile_pos, class_row(g, pc, m), g.in_side, g.batch, g.grid_h, g.grid_w, b, iy, ix);
    class_tap(g, pc, kk, ky, kx, co);
    const int64_t ny = iy + g.pad() - ky, nx = ix + g.pad() - kx;  // even by the class
    if (ny < 0 || nx < 0) return A(0);
    const int64_t off = compact_offset(slot, b, ny / 2, nx / 2, co, g.grid_h, g.grid_w, g.out_side(), g.c_out,
                                       g.num_tiles);
    if (off < 0) return A(0);
    return to_acc<A>(out[off]) > A(0) ? to_acc<A>(grad[off]) : A(0);
  }
};

// dgrad's B for one class: (kk, ci) -> w[ky, kx, co, ci] of a (k, k, C_out, C_in) weight.
template <typename T, typename A>
struct ClassWeights {
  StageGeometry g;
  ParityClass pc;
  const T* w;
  SCOTT_HD A operator()(int64_t kk, int64_t ci) const {
    int64_t ky, kx, co;
    class_tap(g, pc, kk, ky, kx, co);
    return to_acc<A>(w[((ky * g.ksize + kx) * g.c_out + co) * g.c_in + ci]);
  }
};

// ---- MaxBlurPool ------------------------------------------------------------------------------------
struct PoolGeometry {
  int64_t num_tiles = 0, batch = 0, grid_h = 0, grid_w = 0;
  int64_t side = 0;      // input (conv output) patch side s; output side s / 2
  int64_t channels = 0;
};

template <typename T, typename A>
SCOTT_HD A relu_value(const PoolGeometry& g, const T* act, const int32_t* slot, int64_t b, int64_t y, int64_t x,
                      int64_t c) {
  const int64_t off = compact_offset(slot, b, y, x, c, g.grid_h, g.grid_w, g.side, g.channels, g.num_tiles);
  return off < 0 ? A(0) : to_acc<A>(act[off]);
}

SCOTT_HD bool max_map_has(const PoolGeometry& g, int64_t my, int64_t mx) {
  // the 2x2 stride-1 max-pool map of an R-wide map is R-1 wide; beyond it the blur pads with 0
  return my >= 0 && mx >= 0 && my < g.grid_h * g.side - 1 && mx < g.grid_w * g.side - 1;
}

SCOTT_HD int blur_tap(int d) { return d == 1 ? 2 : 1; }

// Pooled output element (row r of (M, s/2, s/2, C), channel c).
template <typename T, typename A>
SCOTT_HD A max_blur_pool_at(const PoolGeometry& g, const T* act, const int32_t* slot, const int64_t* tile_pos,
                            int64_t r, int64_t c) {
  int64_t b, py, px;
  tile_coords(tile_pos, r, g.side / 2, g.batch, g.grid_h, g.grid_w, b, py, px);
  A acc = A(0);
  for (int dy = 0; dy < 3; ++dy) {
    for (int dx = 0; dx < 3; ++dx) {
      const int64_t my = 2 * py - 1 + dy, mx = 2 * px - 1 + dx;
      if (!max_map_has(g, my, mx)) continue;
      A m = relu_value<T, A>(g, act, slot, b, my, mx, c);
      A v = relu_value<T, A>(g, act, slot, b, my, mx + 1, c);
      m = v > m ? v : m;
      v = relu_value<T, A>(g, act, slot, b, my + 1, mx, c);
      m = v > m ? v : m;
      v = relu_value<T, A>(g, act, slot, b, my + 1, mx + 1, c);
      m = v > m ? v : m;
      acc += m * A(blur_tap(dy) * blur_tap(dx)) / A(16);
    }
  }
  return acc;
}

// Gradient at conv-output element (row r of (M, s, s, C), channel c): the blurred gradient of
// every max window whose first (row-major) maximum is this pixel, as torch's max_pool2d routes.
template <typename T, typename A>
SCOTT_HD A max_blur_pool_grad_at(const PoolGeometry& g, const T* grad, const T* act, const int32_t* slot,
                                 const int64_t* tile_pos, int64_t r, int64_t c) {
  int64_t b, cy, cx;
  tile_coords(tile_pos, r, g.side, g.batch, g.grid_h, g.grid_w, b, cy, cx);
  const int64_t pooled = g.side / 2;
  A acc = A(0);
  for (int wy = 0; wy < 2; ++wy) {
    for (int wx = 0; wx < 2; ++wx) {
      const int64_t my = cy - 1 + wy, mx = cx - 1 + wx;
      if (!max_map_has(g, my, mx)) continue;
      A best = relu_value<T, A>(g, act, slot, b, my, mx, c);
      int arg = 0;
      for (int i = 1; i < 4; ++i) {
        const A v = relu_value<T, A>(g, act, slot, b, my + i / 2, mx + i % 2, c);
        if (v > best) { best = v; arg = i; }
      }
      if (arg != (1 - wy) * 2 + (1 - wx)) continue;
      for (int dy = 0; dy < 3; ++dy) {
        for (int dx = 0; dx < 3; ++dx) {
          const int64_t ny = my + 1 - dy, nx = mx + 1 - dx;
          if (ny < 0 || nx < 0 || (ny & 1) || (nx & 1)) continue;
          const int64_t off = compact_offset(slot, b, ny / 2, nx / 2, c, g.grid_h, g.grid_w, pooled, g.channels,
                                             g.num_tiles);
          if (off >= 0) acc += to_acc<A>(grad[off]) * A(blur_tap(dy) * blur_tap(dx)) / A(16);
        }
      }
    }
  }
  return acc;
}

// ---- entry points ---------------------------------------------------------------------------------
// dtype: the compute dtype (activations, weights, gradients); src_dtype: the source's (may be
// uint8 for images, code 4). Every pointer is a device pointer for the CUDA versions.
constexpr int kUInt8 = 4;

void conv_relu_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                   const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out);
void conv_relu_wgrad_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                         const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                         void* grad_weight_t);
void conv_relu_dgrad_cpu(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                         const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src);
void max_blur_pool_cpu(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                       const int64_t* tile_pos, void* out);
void max_blur_pool_backward_cpu(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                const int32_t* slot, const int64_t* tile_pos, void* grad_act);

#ifdef SCOTT_WITH_CUDA
void conv_relu_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                    const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, void* stream);
// partial: (splits, K, C_out) accumulator-typed (float, or double for float64) buffer
void conv_relu_wgrad_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                          const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                          void* partial, int64_t splits, void* stream);
void conv_relu_dgrad_cuda(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                          const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src,
                          void* stream);
void max_blur_pool_cuda(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                        const int64_t* tile_pos, void* out, void* stream);
void max_blur_pool_backward_cuda(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                 const int32_t* slot, const int64_t* tile_pos, void* grad_act, void* stream);
// float16/bfloat16 GEMMs on tensor cores (default) or on the SIMT kernel (for comparison)
void set_tensor_cores(bool enabled);
#endif

}  // namespace scott
