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

// ---- ReLU and max as torch computes them, NaN and Inf included ---------------------------------
// torch.relu: 0 for v <= 0, v otherwise, so a NaN stays NaN (+0 for -0 and negatives, as before).
template <typename A>
SCOTT_HD A relu_of(A v) {
  return v <= A(0) ? A(0) : v;
}

// Whether ReLU's backward passes the gradient at output v: torch masks it only where v <= 0, so it
// passes at a NaN.
template <typename A>
SCOTT_HD bool relu_passes(A v) {
  return !(v <= A(0));
}

// One step of torch's max_pool2d scan: v replaces the running maximum m when v > m or v is NaN.
// The scan's value is NaN when the window holds a NaN; its index is the first of the largest
// values, or the last NaN (what F.max_pool2d(return_indices=True) returns and routes to).
template <typename A>
SCOTT_HD bool max_takes(A m, A v) {
  return v > m || v != v;
}

template <typename A>
SCOTT_HD A max_of(A m, A v) {
  return max_takes(m, v) ? v : m;
}

#if defined(__CUDACC__)
// The same on packed pairs of float16 / bfloat16 (two channels per instruction, tiled pools):
// lane-wise max_of's value (NaN when either lane holds one), and 0xffff masks per lane.
template <typename T> struct Packed2Of;
template <> struct Packed2Of<__half> { using type = __half2; };
template <> struct Packed2Of<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T>
__device__ __forceinline__ typename Packed2Of<T>::type as_packed2(uint32_t a) {
  return *reinterpret_cast<const typename Packed2Of<T>::type*>(&a);
}

template <typename T>
__device__ __forceinline__ uint32_t max_of2(uint32_t a, uint32_t b) {
  const typename Packed2Of<T>::type m = __hmax2_nan(as_packed2<T>(a), as_packed2<T>(b));
  return *reinterpret_cast<const uint32_t*>(&m);
}

// relu_passes per lane: a > 0 or a NaN (unordered greater-than).
template <typename T>
__device__ __forceinline__ uint32_t relu_passes2(uint32_t a) {
  return __hgtu2_mask(as_packed2<T>(a), as_packed2<T>(0u));
}

// The route of a packed 2x2 window p0..p3, per lane: all ones where torch's scan
// (pool_window_argmax) picks the pixel at place `own`: the first pixel equal to the window's
// maximum (max_of2; no pixel equals a NaN maximum), or in a lane holding a NaN the last NaN.
template <typename T>
__device__ __forceinline__ uint32_t route2(uint32_t p0, uint32_t p1, uint32_t p2, uint32_t p3, int own);

// a is NaN per lane (unordered not-equal to itself).
template <typename T>
__device__ __forceinline__ uint32_t is_nan2(uint32_t a) {
  return __hneu2_mask(as_packed2<T>(a), as_packed2<T>(a));
}

// a == b per lane (ordered: a NaN equals nothing).
template <typename T>
__device__ __forceinline__ uint32_t eq2(uint32_t a, uint32_t b) {
  return __heq2_mask(as_packed2<T>(a), as_packed2<T>(b));
}

template <typename T>
__device__ __forceinline__ uint32_t route2(uint32_t p0, uint32_t p1, uint32_t p2, uint32_t p3, int own) {
  const uint32_t m = max_of2<T>(max_of2<T>(p0, p1), max_of2<T>(p2, p3));
  const uint32_t p[4] = {p0, p1, p2, p3};
  uint32_t hit = eq2<T>(p[own], m) | is_nan2<T>(p[own]);
  for (int k = 0; k < own; ++k) hit &= ~eq2<T>(p[k], m);     // an earlier pixel equal to m wins
  for (int k = own + 1; k < 4; ++k) hit &= ~is_nan2<T>(p[k]);  // a later NaN wins
  return hit;
}
#endif

// ---- the 32-bit offset rule ------------------------------------------------------------------------
// The kernels that form 32-bit element offsets (the implicit GEMMs, the tiled pools) take a stage
// only while every tensor they address holds fewer than SCOTT_OFFSET_LIMIT elements: the plans
// (implicit_conv_plan, implicit_image_plan, implicit_image_wgrad_plan, tiled_pool_plan) refuse it
// otherwise with kOffsetRefusal, and the 64-bit kernels run it (the gather GEMM, the per-element
// pools). 2^31 by default; a build may lower it (-DSCOTT_OFFSET_LIMIT=N, 1024 <= N: the emulated
// tests run both sides of the rule at small shapes). build_info()["offset_limit"] reports it.
#ifndef SCOTT_OFFSET_LIMIT
#define SCOTT_OFFSET_LIMIT 2147483648
#define SCOTT_OFFSET_LIMIT_TEXT "2^31"
#endif
#ifndef SCOTT_OFFSET_LIMIT_TEXT
#define SCOTT_OFFSET_LIMIT_STR2(x) #x
#define SCOTT_OFFSET_LIMIT_STR(x) SCOTT_OFFSET_LIMIT_STR2(x)
#define SCOTT_OFFSET_LIMIT_TEXT SCOTT_OFFSET_LIMIT_STR(SCOTT_OFFSET_LIMIT)
#endif
constexpr int64_t kOffsetLimit = SCOTT_OFFSET_LIMIT;
static_assert(kOffsetLimit >= 1024 && kOffsetLimit <= (int64_t(1) << 31), "SCOTT_OFFSET_LIMIT: 1024 .. 2^31");
constexpr const char* kOffsetRefusal = "a tensor passes " SCOTT_OFFSET_LIMIT_TEXT " elements (32-bit offsets)";

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

// ---- the visible tables of one image row (scott_visible_tables and its twin) --------------------
// Row b of a (batch, N) keep mask numbers its visible patches: slot[b * N + n] = b * K + (visible
// patches before n), or -1, and tile_pos of that tile = b * N + n, for K visible patches per row. A
// row holding more than K numbers its first K (the others read as masked); one holding fewer gives
// its missing tiles the row's first position. Either is an error the caller reports, and no index
// leaves its table. The optional neighbour table (K tiles x (2R+1)^2 per row) is built from the
// row's own slots: entry e of the row is the tile at offset (d / nb - R, d % nb - R), d = e % nb^2,
// from the row's tile e / nb^2, or -1 (masked or outside the image).
SCOTT_HD int32_t row_neighbour(const int32_t* slot, const int64_t* tile_pos, int64_t b, int64_t positions,
                               int64_t num_visible, int64_t grid_w, int32_t radius, int64_t e) {
  const int64_t nb = 2 * radius + 1, row = b * positions;
  const int64_t n = tile_pos[b * num_visible + e / (nb * nb)] - row;  // in [0, N): the row's own position
  const int64_t d = e % (nb * nb);
  const int64_t gy = n / grid_w + d / nb - radius, gx = n % grid_w + d % nb - radius;
  if (gy < 0 || gx < 0 || gy >= positions / grid_w || gx >= grid_w) return -1;
  return slot[row + gy * grid_w + gx];
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
