// MaxBlurPool over compact activations: the per-element definition (forward and backward) and the
// tiled kernels' task, window and per-task functions, shared by the CUDA kernels and the C++ twin.
#pragma once

#include "stage_common.h"

namespace scott {

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

// Pooled output element (row r of (M, s/2, s/2, C), channel c); with relu, of relu(act): relu
// commutes with max, so it is applied to each window's maximum.
template <typename T, typename A>
SCOTT_HD A max_blur_pool_at(const PoolGeometry& g, const T* act, const int32_t* slot, const int64_t* tile_pos,
                            int64_t r, int64_t c, bool relu = false) {
  int64_t b, py, px;
  tile_coords(tile_pos, r, g.side / 2, g.batch, g.grid_h, g.grid_w, b, py, px);
  A acc = A(0);
  for (int dy = 0; dy < 3; ++dy) {
    for (int dx = 0; dx < 3; ++dx) {
      const int64_t my = 2 * py - 1 + dy, mx = 2 * px - 1 + dx;
      if (!max_map_has(g, my, mx)) continue;
      A m = relu_value<T, A>(g, act, slot, b, my, mx, c);
      m = max_of(m, relu_value<T, A>(g, act, slot, b, my, mx + 1, c));
      m = max_of(m, relu_value<T, A>(g, act, slot, b, my + 1, mx, c));
      m = max_of(m, relu_value<T, A>(g, act, slot, b, my + 1, mx + 1, c));
      if (relu) m = relu_of(m);
      acc += m * A(blur_tap(dy) * blur_tap(dx)) / A(16);
    }
  }
  return acc;
}

// Gradient at conv-output element (row r of (M, s, s, C), channel c): the blurred gradient of
// every max window whose maximum torch's max_pool2d routes to this pixel (max_takes: the first
// of the largest, the last NaN); with relu_mask, 0 where ReLU's backward stops it (relu_passes).
template <typename T, typename A>
SCOTT_HD A max_blur_pool_grad_at(const PoolGeometry& g, const T* grad, const T* act, const int32_t* slot,
                                 const int64_t* tile_pos, int64_t r, int64_t c, bool relu_mask = false) {
  int64_t b, cy, cx;
  tile_coords(tile_pos, r, g.side, g.batch, g.grid_h, g.grid_w, b, cy, cx);
  if (relu_mask && !relu_passes(relu_value<T, A>(g, act, slot, b, cy, cx, c))) return A(0);
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
        if (max_takes(best, v)) { best = v; arg = i; }
      }
      if (arg != (1 - wy) * 2 + (1 - wx)) continue;
      A blurred = A(0);  // the blurred pooled gradient at this window, summed before it is routed
      for (int dy = 0; dy < 3; ++dy) {
        for (int dx = 0; dx < 3; ++dx) {
          const int64_t ny = my + 1 - dy, nx = mx + 1 - dx;
          if (ny < 0 || nx < 0 || (ny & 1) || (nx & 1)) continue;
          const int64_t off = compact_offset(slot, b, ny / 2, nx / 2, c, g.grid_h, g.grid_w, pooled, g.channels,
                                             g.num_tiles);
          if (off >= 0) blurred += to_acc<A>(grad[off]) * A(blur_tap(dy) * blur_tap(dx)) / A(16);
        }
      }
      acc += blurred;
    }
  }
  return acc;
}

// ---- tiled MaxBlurPool (16-byte channel vectors, 32-bit offsets) --------------------------------
// One task per (visible tile, pooled pixel (h, w), 8-channel vector): the forward reads the 4 x 4
// window of input pixels (2h-1 .. 2h+2) x (2w-1 .. 2w+2) that the pooled pixel's 3 x 3 blur of
// 2 x 2 maxima covers and writes one pooled vector; the backward reads the same window and the
// 3 x 3 pooled gradients around (h, w) and writes the gradient of the four input pixels
// (2h .. 2h+1) x (2w .. 2w+1), each window's argmax recomputed. Vectors of a task are 16-byte
// loads straight from the compact tensors (the halo re-reads hit in cache); the tile's neighbour
// slots and grid position come from 32-bit arithmetic with no division in the task. The same
// functions run in the C++ twin. A pixel of a masked patch or outside the image reads 0, exactly
// what the per-element definition (max_blur_pool_at / max_blur_pool_grad_at) reads there.
struct TiledPool {
  bool relu = false;                           // forward: of relu(act) (max_blur_pool_at's relu)
  int32_t num_tiles = 0, side = 0, pooled = 0, channels = 0;
  int32_t vectors = 0, tasks = 0;              // C / 8; num_tiles * pooled^2 * vectors
  int32_t batch = 0, grid_h = 0, grid_w = 0, cells = 0;
  FastDiv vector_div, pooled_div, area_div, cells_div, grid_w_div;
};

// Why the tiled kernels cannot run a pool, or nullptr when they can (then `tp` is filled): the same
// rule on the GPU and in the C++ twin. A pool it refuses runs the per-element kernels.
inline const char* tiled_pool_plan(const PoolGeometry& g, TiledPool& tp) {
  if (g.channels % 8) return "channels must be multiples of 8 (16-byte vectors)";
  if (g.side % 2 || g.side < 2) return "the side must be even";
  const int64_t limit = kOffsetLimit;
  if (g.num_tiles * g.side * g.side * g.channels >= limit || g.batch * g.grid_h * g.grid_w >= limit ||
      g.num_tiles >= limit / kNeighbours)
    return kOffsetRefusal;
  tp.num_tiles = static_cast<int32_t>(g.num_tiles);
  tp.side = static_cast<int32_t>(g.side);
  tp.pooled = tp.side / 2;
  tp.channels = static_cast<int32_t>(g.channels);
  tp.vectors = tp.channels / 8;
  tp.tasks = tp.num_tiles * tp.pooled * tp.pooled * tp.vectors;  // < kOffsetLimit / 32 by the test above
  tp.batch = static_cast<int32_t>(g.batch);
  tp.grid_h = static_cast<int32_t>(g.grid_h);
  tp.grid_w = static_cast<int32_t>(g.grid_w);
  tp.cells = tp.grid_h * tp.grid_w;
  tp.vector_div = FastDiv(static_cast<uint32_t>(tp.vectors));
  tp.pooled_div = FastDiv(static_cast<uint32_t>(tp.pooled));
  tp.area_div = FastDiv(static_cast<uint32_t>(tp.pooled * tp.pooled));
  tp.cells_div = FastDiv(static_cast<uint32_t>(tp.cells > 0 ? tp.cells : 1));
  tp.grid_w_div = FastDiv(static_cast<uint32_t>(tp.grid_w > 0 ? tp.grid_w : 1));
  return nullptr;
}

// A task: tile t, pooled pixel (h, w), vector v; tasks are numbered in the (M, s/2, s/2, C / 8)
// order of the pooled tensor, so task i's pooled vector starts at element 8 i.
struct PoolTask {
  int32_t t, h, w, v;
};

SCOTT_HD PoolTask pool_task(const TiledPool& g, int32_t task) {
  PoolTask k;
  const int32_t pix = static_cast<int32_t>(g.vector_div.div(static_cast<uint32_t>(task)));
  k.v = task - pix * g.vectors;
  k.t = static_cast<int32_t>(g.area_div.div(static_cast<uint32_t>(pix)));
  const int32_t rem = pix - k.t * g.pooled * g.pooled;
  k.h = static_cast<int32_t>(g.pooled_div.div(static_cast<uint32_t>(rem)));
  k.w = rem - k.h * g.pooled;
  return k;
}

// A tile's 9 neighbour slots (tile_neighbours' rule: -1 outside the image, masked, or naming no
// tile; all -1 for a tile position outside the grid, which reads as grid position (0, 0)) and its
// grid position, in 32-bit arithmetic (tiled_pool_plan checks that the grid fits).
struct PoolTile {
  int32_t nb[kNeighbours];
  int32_t gy, gx;
};

SCOTT_HD PoolTile pool_tile(const TiledPool& g, const int32_t* slot, const int64_t* tile_pos, int32_t t) {
  PoolTile pt;
  const int64_t pos = tile_pos[t];
  const bool ok = pos >= 0 && pos < int64_t(g.batch) * g.cells;
  const uint32_t p = ok ? static_cast<uint32_t>(pos) : 0u;
  const int32_t b = static_cast<int32_t>(g.cells_div.div(p)), cell = static_cast<int32_t>(p) - b * g.cells;
  pt.gy = static_cast<int32_t>(g.grid_w_div.div(static_cast<uint32_t>(cell)));
  pt.gx = cell - pt.gy * g.grid_w;
  SCOTT_UNROLL
  for (int d = 0; d < kNeighbours; ++d) {
    const int32_t ny = pt.gy + d / 3 - 1, nx = pt.gx + d % 3 - 1;
    int32_t s = -1;
    if (ok && ny >= 0 && nx >= 0 && ny < g.grid_h && nx < g.grid_w) {
      const int32_t v = slot[(b * g.grid_h + ny) * g.grid_w + nx];
      s = v >= 0 && v < g.num_tiles ? v : -1;
    }
    pt.nb[d] = s;
  }
  return pt;
}

// Slot of the neighbour (dy, dx) of a tile, by selects from the 9 slots (constant indices: the
// slots stay in registers on the GPU).
SCOTT_HD int32_t pool_slot(const PoolTile& t, int32_t dy, int32_t dx) {
  const int32_t r0 = dx == 0 ? t.nb[0] : dx == 1 ? t.nb[1] : t.nb[2];
  const int32_t r1 = dx == 0 ? t.nb[3] : dx == 1 ? t.nb[4] : t.nb[5];
  const int32_t r2 = dx == 0 ? t.nb[6] : dx == 1 ? t.nb[7] : t.nb[8];
  return dy == 0 ? r0 : dy == 1 ? r1 : r2;
}

// Element offsets (channel 0 of vector v) of the R x R window of an (M, n, n, C) tensor whose
// local rows / columns start at y0, x0 (-1 <= y0, x0; y0 + R - 1 <= n: only a window's first and
// last rows and columns can reach into a neighbouring patch), or -1 for a zero (masked patch,
// outside the image).
template <int R>
SCOTT_HD void pool_window_offsets(const TiledPool& g, const PoolTile& t, int32_t n, int32_t y0, int32_t x0,
                                  int32_t v, int32_t (&off)[R][R]) {
  int32_t dy[R], ly[R], dx[R], lx[R];
  SCOTT_UNROLL
  for (int i = 0; i < R; ++i) {
    ly[i] = y0 + i;
    lx[i] = x0 + i;
    // the inner rows and columns lie in the tile itself: a constant slot choice once unrolled
    dy[i] = i == 0 || i == R - 1 ? neighbour_axis(ly[i], n) : 1;
    dx[i] = i == 0 || i == R - 1 ? neighbour_axis(lx[i], n) : 1;
  }
  SCOTT_UNROLL
  for (int i = 0; i < R; ++i) {
    SCOTT_UNROLL
    for (int j = 0; j < R; ++j) {
      const int32_t s = pool_slot(t, dy[i], dx[j]);
      off[i][j] = s < 0 ? -1 : ((s * n + ly[i]) * n + lx[j]) * g.channels + v * 8;
    }
  }
}

// Does local max-map coordinate m (-1 <= m <= side - 1) of a tile at grid coordinate gc (of n)
// lie on the image's 2x2 max map (max_map_has)?
SCOTT_HD bool pool_map_has(int32_t m, int32_t gc, int32_t n, int32_t side) {
  return !(m < 0 && gc == 0) && !(m >= side - 1 && gc == n - 1);
}

// Maximum of a 2x2 window as max_blur_pool_at takes it (torch's scan, max_of: NaN if any is NaN).
template <typename A>
SCOTT_HD A pool_window_max(A p00, A p01, A p10, A p11) {
  return max_of(max_of(max_of(p00, p01), p10), p11);
}

// Pooled output (h, w) of a tile, N channels; wmax(i, j, e): channel e of the maximum of the 2x2
// window at local max-map position (2h - 1 + i, 2w - 1 + j), i, j = 0..2 (pool_window_max of the
// window's pixels; any exact maximum gives the same value). Per channel the same sums in the same
// order as max_blur_pool_at; the border test runs once per window for all N channels.
template <int N, typename A, class WindowMax>
SCOTT_HD void tiled_pool_values(const TiledPool& g, const PoolTile& t, int32_t h, int32_t w, const WindowMax& wmax,
                                A (&acc)[N]) {
  SCOTT_UNROLL
  for (int e = 0; e < N; ++e) acc[e] = A(0);
  SCOTT_UNROLL
  for (int dy = 0; dy < 3; ++dy) {
    SCOTT_UNROLL
    for (int dx = 0; dx < 3; ++dx) {
      if (!pool_map_has(2 * h - 1 + dy, t.gy, g.grid_h, g.side) ||
          !pool_map_has(2 * w - 1 + dx, t.gx, g.grid_w, g.side))
        continue;
      SCOTT_UNROLL
      for (int e = 0; e < N; ++e) acc[e] += wmax(dy, dx, e) * A(blur_tap(dy) * blur_tap(dx)) / A(16);
    }
  }
}

// Place (row-major) of the pixel of a 2x2 window p0..p3 that torch's max_pool2d routes the
// gradient to: its scan (max_takes) picks the first of the largest, or the last NaN.
template <typename A>
SCOTT_HD int pool_window_argmax(A p0, A p1, A p2, A p3) {
  A m = p0;
  int arg = 0;
  if (max_takes(m, p1)) { m = p1; arg = 1; }
  if (max_takes(m, p2)) { m = p2; arg = 2; }
  if (max_takes(m, p3)) arg = 3;
  return arg;
}

// Gradient at the four local pixels (2h + a, 2w + b), a, b = 0..1, of a tile, N channels, into
// acc[a][b]: each 2x2 window at max-map position (2h - 1 + i, 2w - 1 + j), i, j = 0..2, blurs the
// pooled gradient once and routes it to the pixels of the four that are its first maximum.
// Window-local indices, all constants once unrolled: grad(i, j, e) is the pooled gradient at
// (h - 1 + i, w - 1 + j); routed(i, j, own, e, v) is v when the pixel at place `own` of window (i, j)
// is the pixel its maximum routes to (pool_window_argmax) in channel e, else 0. Windows run row-major, so each pixel
// sums its windows in the order of max_blur_pool_grad_at, and each window's blur in its order too
// (a skipped term adds an exact 0, as does a pooled pixel that reads zero).
template <int N, typename A, class Routed, class Grad>
SCOTT_HD void tiled_pool_quad_grads(const TiledPool& g, const PoolTile& t, int32_t h, int32_t w, const Routed& routed,
                                    const Grad& grad, A (&acc)[2][2][N]) {
  SCOTT_UNROLL
  for (int a = 0; a < 2; ++a)
    SCOTT_UNROLL
    for (int b = 0; b < 2; ++b)
      SCOTT_UNROLL
      for (int e = 0; e < N; ++e) acc[a][b][e] = A(0);
  SCOTT_UNROLL
  for (int i = 0; i < 3; ++i) {
    SCOTT_UNROLL
    for (int j = 0; j < 3; ++j) {
      if (!pool_map_has(2 * h - 1 + i, t.gy, g.grid_h, g.side) ||
          !pool_map_has(2 * w - 1 + j, t.gx, g.grid_w, g.side))
        continue;
      A blurred[N];
      SCOTT_UNROLL
      for (int e = 0; e < N; ++e) blurred[e] = A(0);
      SCOTT_UNROLL
      for (int dy = 0; dy < 3; ++dy) {
        SCOTT_UNROLL
        for (int dx = 0; dx < 3; ++dx) {
          // pooled pixel (2h + i - dy, 2w + j - dx) / 2 when both are even
          if ((i - dy) % 2 || (j - dx) % 2) continue;
          SCOTT_UNROLL
          for (int e = 0; e < N; ++e)
            blurred[e] += grad((i - dy) / 2 + 1, (j - dx) / 2 + 1, e) * A(blur_tap(dy) * blur_tap(dx)) / A(16);
        }
      }
      SCOTT_UNROLL
      for (int a = 0; a < 2; ++a) {
        SCOTT_UNROLL
        for (int b = 0; b < 2; ++b) {
          const int wy = i - a, wx = j - b;  // the window's place relative to the pixel
          if (wy < 0 || wy > 1 || wx < 0 || wx > 1) continue;
          const int own = (1 - wy) * 2 + (1 - wx);  // the pixel's place in the window
          SCOTT_UNROLL
          for (int e = 0; e < N; ++e) acc[a][b][e] += routed(i, j, own, e, blurred[e]);
        }
      }
    }
  }
}

}  // namespace scott
