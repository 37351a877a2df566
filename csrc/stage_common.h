// What the tokenizer's conv and pool functions share, host and device: scalar conversions, the
// compact layout's index functions, the 3x3 neighbour slots of a tile, the division-free row
// decompositions and ReLU. See tokenizer.h for the layouts.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "patch_tiles.h"  // SCOTT_HD, DType

namespace scott {

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

// relu(v) as the kernels take it: v > 0 ? v : 0 (0 for a NaN).
template <typename A>
SCOTT_HD A relu_of(A v) {
  return v > A(0) ? v : A(0);
}

// ---- neighbour slots and 32-bit row arithmetic (implicit GEMMs and tiled pools) ------------------
// The fast kernels address a tile's surroundings through its 3 x 3 neighbour slots.
constexpr int kNeighbours = 9;

// Slots of the 3x3 patches around tile t's patch (row-major, centre at 4), -1 for a patch that is
// outside the image, masked, or names no tile; all -1 for a tile position outside the grid.
SCOTT_HD void tile_neighbours(const int32_t* slot, const int64_t* tile_pos, int64_t t, int64_t batch, int64_t grid_h,
                              int64_t grid_w, int64_t num_tiles, int32_t* out) {
  const int64_t cells = grid_h * grid_w;
  const int64_t pos = tile_pos[t];
  const bool ok = pos >= 0 && pos < batch * cells;
  const int64_t b = ok ? pos / cells : 0, gy = ok ? pos % cells / grid_w : 0, gx = ok ? pos % grid_w : 0;
  for (int d = 0; d < kNeighbours; ++d) {
    const int64_t ny = gy + d / 3 - 1, nx = gx + d % 3 - 1;
    int32_t s = -1;
    if (ok && ny >= 0 && nx >= 0 && ny < grid_h && nx < grid_w) {
      const int32_t v = slot[(b * grid_h + ny) * grid_w + nx];
      s = v >= 0 && v < num_tiles ? v : -1;
    }
    out[d] = s;
  }
}

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (d >= 1 fixed for a launch), so that row
// decompositions inside loops cost no division.
struct FastDiv {
  uint32_t d = 1, mul = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    shift = 0;
    while ((uint64_t(1) << shift) < divisor) ++shift;
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  SCOTT_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * mul) >> 32);
#endif
    return (hi + n) >> shift;
  }
};

// Local coordinate v on an axis of patch side n, -n <= v < 2n -> neighbour index 0..2 along that
// axis, and v made local to that patch.
SCOTT_HD int32_t neighbour_axis(int32_t& v, int32_t n) {
  const int32_t d = (v >= 0) + (v >= n);
  v -= (d - 1) * n;
  return d;
}

// Full unrolling of the per-task loops on the GPU, so that every window index is a constant and
// the window stays in registers.
#if defined(__CUDA_ARCH__)
#define SCOTT_UNROLL _Pragma("unroll")
#else
#define SCOTT_UNROLL
#endif

}  // namespace scott
