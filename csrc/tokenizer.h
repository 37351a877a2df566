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
//            (the ReLU optional: the tokenizer leaves it to the pool, applied to its window maxima)
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
  SCOTT_HD A operator()(int64_t r, int64_t co) const {  // out == nullptr: grad comes already masked
    const int64_t i = r * c_out + co;
    return out == nullptr || to_acc<A>(out[i]) > A(0) ? to_acc<A>(grad[i]) : A(0);
  }
};

// dgrad runs per parity class of input pixel: a stride-2 conv reads input row iy only through
// taps ky with (iy + pad - ky) even, so the pixels with local (y % 2, x % 2) = (cy, cx) reduce
// over taps ky = ky0 + 2j, kx = kx0 + 2i only: a quarter of the k*k*C_out reduction.
struct ParityClass {
  int64_t cy = 0, cx = 0, ky0 = 0, kx0 = 0, n_ky = 0, n_kx = 0;
};

SCOTT_HD ParityClass parity_class_k(int64_t ksize, int64_t pad, int cls) {
  ParityClass pc;
  pc.cy = cls / 2;
  pc.cx = cls % 2;
  pc.ky0 = (pc.cy + pad) % 2;
  pc.kx0 = (pc.cx + pad) % 2;
  pc.n_ky = (ksize - pc.ky0 + 1) / 2;
  pc.n_kx = (ksize - pc.kx0 + 1) / 2;
  return pc;
}

SCOTT_HD ParityClass parity_class(const StageGeometry& g, int cls) { return parity_class_k(g.ksize, g.pad(), cls); }

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
    return out == nullptr || to_acc<A>(out[off]) > A(0) ? to_acc<A>(grad[off]) : A(0);
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

// ---- implicit GEMM path (float16/bfloat16 on tensor cores; the C++ twin runs it in float32/64) ----
// The gathered operands of the three conv GEMMs, reorganised so that all per-row work happens once
// per row and every K step moves a 16-byte vector of channels:
//   * a per-tile 3x3 neighbour table (M, 9) int32 names the visible tile at each neighbouring grid
//     position (or -1): built once per op by `tile_neighbours`, one thread per tile;
//   * a row (output pixel, or input pixel of a parity class for dgrad) knows its tile and its
//     window origin; the K loop runs over (tap, 8-channel vector), so one neighbour lookup serves
//     8 channels, and every offset is a 32-bit expression of small integers with no division.
// Valid when the conv's reach stays within one neighbouring patch (pad <= in_side), channels are
// multiples of 8 (16-byte vectors) and every tensor offset fits in 31 bits (`implicit_conv_plan`).
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

// 32-bit geometry of one conv stage on the implicit path (from StageGeometry, checked on the host).
struct ImplicitConv {
  int32_t num_tiles = 0, q = 0, s = 0, pad = 0, k = 0, c_in = 0, c_out = 0;
  FastDiv area_out, side_out;  // divisions by s*s and s
};

// Why the implicit path cannot run a stage, or nullptr when it can (then `ic` is filled): the same
// rule on the GPU and in the C++ twin. A stage it refuses runs the gather GEMM (64-bit indices).
inline const char* implicit_conv_plan(const StageGeometry& g, int64_t splits, ImplicitConv& ic) {
  if (g.src_image) return "image sources have their own kernel";
  if (g.c_in % 8 || g.c_out % 8) return "channels must be multiples of 8 (16-byte vectors)";
  if (g.pad() > g.in_side) return "the kernel reaches beyond the neighbouring patches (pad > in_side)";
  // every offset the kernels form is bounded by one of these element counts
  const int64_t limit = int64_t(1) << 31;
  const int64_t widest = g.c_in > g.c_out ? g.c_in : g.c_out;
  const int64_t weights = g.ksize * g.ksize * g.c_in * g.c_out;
  if (g.num_tiles * g.in_side * g.in_side * widest >= limit || g.num_tiles * kNeighbours >= limit ||
      (splits < 1 ? 1 : splits) * weights >= limit)
    return "a tensor passes 2^31 elements (32-bit offsets)";
  ic.num_tiles = static_cast<int32_t>(g.num_tiles);
  ic.q = static_cast<int32_t>(g.in_side);
  ic.s = static_cast<int32_t>(g.out_side());
  ic.pad = static_cast<int32_t>(g.pad());
  ic.k = static_cast<int32_t>(g.ksize);
  ic.c_in = static_cast<int32_t>(g.c_in);
  ic.c_out = static_cast<int32_t>(g.c_out);
  ic.area_out = FastDiv(static_cast<uint32_t>(ic.s * ic.s));
  ic.side_out = FastDiv(static_cast<uint32_t>(ic.s));
  return nullptr;
}

// Local coordinate v on an axis of patch side n, -n <= v < 2n -> neighbour index 0..2 along that
// axis, and v made local to that patch.
SCOTT_HD int32_t neighbour_axis(int32_t& v, int32_t n) {
  const int32_t d = (v >= 0) + (v >= n);
  v -= (d - 1) * n;
  return d;
}

// A GEMM row of the forward / wgrad window: output pixel r = (tile, oy, ox); the window's origin
// (y0, x0) = (2 oy - pad, 2 ox - pad) in the tile's local input coordinates.
struct ImplicitRow {
  int32_t tile, y0, x0;
};

SCOTT_HD ImplicitRow conv_row(const ImplicitConv& g, int32_t r) {
  const int32_t tile = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(r)));
  const int32_t rem = r - tile * g.s * g.s;
  const int32_t oy = static_cast<int32_t>(g.side_out.div(static_cast<uint32_t>(rem)));
  return {tile, 2 * oy - g.pad, 2 * (rem - oy * g.s) - g.pad};
}

// Which of the 9 neighbouring patches tap (ky, kx) of window (y0, x0) reads (index into a tile's
// neighbour slots), with (y, x) made local to that patch.
SCOTT_HD int32_t conv_tap_neighbour(const ImplicitConv& g, int32_t y0, int32_t x0, int32_t ky, int32_t kx,
                                    int32_t& y, int32_t& x) {
  y = y0 + ky;
  x = x0 + kx;
  const int32_t dy = neighbour_axis(y, g.q), dx = neighbour_axis(x, g.q);
  return dy * 3 + dx;
}

// Offset of channel c of local pixel (y, x) of tile t in the compact (M, q, q, C_in) source, or -1
// when t is -1 (a masked patch or outside the image).
SCOTT_HD int32_t compact_src_offset(const ImplicitConv& g, int32_t t, int32_t y, int32_t x, int32_t c) {
  return t < 0 ? -1 : ((t * g.q + y) * g.q + x) * g.c_in + c;
}

// Offset of channel c of the input pixel that tap (ky, kx) of window (y0, x0) reads, in the
// compact (M, q, q, C_in) source, or -1 (masked, outside the image). nb: the tile's 9 neighbours.
SCOTT_HD int32_t conv_src_offset(const ImplicitConv& g, const int32_t* nb, int32_t y0, int32_t x0, int32_t ky,
                                 int32_t kx, int32_t c) {
  int32_t y, x;
  const int32_t d = conv_tap_neighbour(g, y0, x0, ky, kx, y, x);
  return compact_src_offset(g, nb[d], y, x, c);
}

// Row of the (k*k*C_in, C_out) forward weight (and of the wgrad result) for tap (ky, kx), channel c.
SCOTT_HD int32_t conv_weight_row(const ImplicitConv& g, int32_t ky, int32_t kx, int32_t c) {
  return (ky * g.k + kx) * g.c_in + c;
}

// dgrad row m of parity class pc: input pixel (ly, lx) = (2 ry + cy, 2 rx + cx) of `tile`; the
// output pixel it reads through tap (ky0 + 2j, kx0 + 2i) is (y0 - j, x0 - i) in the tile's local
// output coordinates, with (y0, x0) = ((ly + pad - ky0) / 2, (lx + pad - kx0) / 2) (exact by the
// class). dst: the row of the compact (M, q, q, C_in) input gradient.
struct DgradRow {
  int32_t tile, y0, x0, dst;
};

SCOTT_HD DgradRow dgrad_row(const ImplicitConv& g, const ParityClass& pc, int32_t m) {
  const int32_t tile = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(m)));
  const int32_t rem = m - tile * g.s * g.s;
  const int32_t ry = static_cast<int32_t>(g.side_out.div(static_cast<uint32_t>(rem)));
  const int32_t ly = 2 * ry + static_cast<int32_t>(pc.cy), lx = 2 * (rem - ry * g.s) + static_cast<int32_t>(pc.cx);
  return {tile, (ly + g.pad - static_cast<int32_t>(pc.ky0)) / 2, (lx + g.pad - static_cast<int32_t>(pc.kx0)) / 2,
          (tile * g.q + ly) * g.q + lx};
}

// Offset of channel co of the masked output gradient g' (M, s, s, C_out) that dgrad row (y0, x0)
// reads through class tap (j, i), or -1.
SCOTT_HD int32_t dgrad_grad_offset(const ImplicitConv& g, const int32_t* nb, int32_t y0, int32_t x0, int32_t j,
                                   int32_t i, int32_t co) {
  int32_t y = y0 - j, x = x0 - i;
  const int32_t dy = neighbour_axis(y, g.s), dx = neighbour_axis(x, g.s);
  const int32_t t = nb[dy * 3 + dx];
  return t < 0 ? -1 : ((t * g.s + y) * g.s + x) * g.c_out + co;
}

// Row of the (k*k*C_out, C_in) input-gradient weight for class tap (j, i), output channel co.
SCOTT_HD int32_t dgrad_weight_row(const ImplicitConv& g, const ParityClass& pc, int32_t j, int32_t i, int32_t co) {
  return ((static_cast<int32_t>(pc.ky0) + 2 * j) * g.k + static_cast<int32_t>(pc.kx0) + 2 * i) * g.c_out + co;
}

// ---- implicit path of the image stage (few input channels, any image strides) ----
// Each tile's input window (R = q - 2 + k rows x SW columns of pixels, patch plus halo) is staged
// once with masking and normalisation fused, 4 channels per pixel (3 real + zero), so that two
// horizontally adjacent pixels are one 16-byte row: taps (ky, 2p) and (ky, 2p + 1) of an output
// pixel read one such row. The K dimension is (ky, tap pair p, kx parity, channel): k * KP * 8
// with KP = ceil(k / 2) pairs per kernel row (an odd k's last pair has zero weights), and the
// weight is padded to match (cuda_backend._image_gemm_weight; `image_k_to_weight_row` maps back).
constexpr int kImageChannels = 4;

struct ImageConv {
  int32_t num_tiles = 0, q = 0, s = 0, pad = 0, k = 0, c_in = 0, c_out = 0;
  int32_t pairs = 0;              // KP
  int32_t rows = 0, width = 0;    // staged window R x SW
  int32_t batch = 0, grid_h = 0, grid_w = 0;
  int32_t s_b = 0, s_c = 0, s_h = 0, s_w = 0;
  bool normalize = false;
  FastDiv area_out, side_out, cells, grid_w_div, rows_div;  // s*s, s, GH*GW, GW, R

  SCOTT_HD int32_t k_rows() const { return k * pairs * 2 * kImageChannels; }  // padded GEMM K
  int32_t tiles = 0;               // tiles of a 128-output-pixel group: 128 / (s * s)
  SCOTT_HD int32_t group_tiles() const { return tiles; }
};

inline const char* implicit_image_plan(const StageGeometry& g, ImageConv& ic) {
  if (!g.src_image) return "not an image source";
  if (g.c_in > kImageChannels) return "more than 4 image channels";
  if (g.c_out % 8) return "channels must be multiples of 8 (16-byte vectors)";
  if (g.pad() > g.in_side) return "the kernel reaches beyond the neighbouring patches (pad > in_side)";
  const int64_t s = g.out_side();
  if (128 % (s * s)) return "the image kernel takes patches whose output side is 1, 2, 4 or 8";
  const int64_t pairs = (g.ksize + 1) / 2;
  if ((g.ksize * pairs) % 2) return "the image kernel needs an even number of tap pairs (k = 3, 7, 11, ...)";
  const int64_t rows = g.in_side - 2 + g.ksize, width = g.in_side - 2 + 2 * pairs;
  // the kernels stage the windows with one thread per window column (blockDim / SW rows at a time)
  if (width > 128) return "the staged image window is wider than 128 pixels (one staging thread per column)";
  // shared memory: the padded weight slice (64 columns + 8 of padding) and the staged windows
  if (g.ksize * pairs * 2 * kImageChannels * 72 * 2 + (128 / (s * s)) * rows * width * kImageChannels * 2 > 96 * 1024)
    return "kernel or staged image window too large for shared memory";
  const int64_t limit = int64_t(1) << 31;
  const int64_t H = g.grid_h * g.in_side, W = g.grid_w * g.in_side;
  const auto span = [](int64_t n, int64_t stride) { return (n - 1) * (stride < 0 ? -stride : stride); };
  if (g.s_b < 0 || g.s_c < 0 || g.s_h < 0 || g.s_w < 0 ||
      span(g.batch, g.s_b) + span(g.c_in, g.s_c) + span(H, g.s_h) + span(W, g.s_w) >= limit ||
      g.num_tiles * s * s * g.c_out >= limit || g.num_tiles * kNeighbours >= limit ||
      g.batch * g.grid_h * g.grid_w >= limit)
    return "a tensor passes 2^31 elements (32-bit offsets)";
  ic.num_tiles = static_cast<int32_t>(g.num_tiles);
  ic.q = static_cast<int32_t>(g.in_side);
  ic.s = static_cast<int32_t>(s);
  ic.pad = static_cast<int32_t>(g.pad());
  ic.k = static_cast<int32_t>(g.ksize);
  ic.c_in = static_cast<int32_t>(g.c_in);
  ic.c_out = static_cast<int32_t>(g.c_out);
  ic.pairs = static_cast<int32_t>(pairs);
  ic.rows = static_cast<int32_t>(rows);
  ic.width = static_cast<int32_t>(width);
  ic.batch = static_cast<int32_t>(g.batch);
  ic.grid_h = static_cast<int32_t>(g.grid_h);
  ic.grid_w = static_cast<int32_t>(g.grid_w);
  ic.s_b = static_cast<int32_t>(g.s_b);
  ic.s_c = static_cast<int32_t>(g.s_c);
  ic.s_h = static_cast<int32_t>(g.s_h);
  ic.s_w = static_cast<int32_t>(g.s_w);
  ic.normalize = g.normalize;
  ic.area_out = FastDiv(static_cast<uint32_t>(s * s));
  ic.side_out = FastDiv(static_cast<uint32_t>(s));
  ic.cells = FastDiv(static_cast<uint32_t>(g.grid_h * g.grid_w));
  ic.grid_w_div = FastDiv(static_cast<uint32_t>(g.grid_w));
  ic.rows_div = FastDiv(static_cast<uint32_t>(rows));
  ic.tiles = static_cast<int32_t>(128 / (s * s));
  return nullptr;
}

// Image offset (channel 0) of staged pixel (0, 0) of the window of the tile at grid position pos
// (may be negative: the window's halo starts above and left of the patch); 0 for a position
// outside the grid, whose neighbour slots are all -1 so that nothing is read.
SCOTT_HD int32_t staged_tile_base(const ImageConv& g, int64_t pos) {
  if (pos < 0 || pos >= int64_t(g.batch) * g.grid_h * g.grid_w) return 0;
  const uint32_t p = static_cast<uint32_t>(pos);
  const int32_t b = static_cast<int32_t>(g.cells.div(p));
  const int32_t cell = static_cast<int32_t>(p) - b * g.grid_h * g.grid_w;
  const int32_t gy = static_cast<int32_t>(g.grid_w_div.div(static_cast<uint32_t>(cell))), gx = cell - gy * g.grid_w;
  return b * g.s_b + (gy * g.q - g.pad) * g.s_h + (gx * g.q - g.pad) * g.s_w;
}

// Staged column cx of a window: which neighbouring patch column (0..2) it lies in, and its image
// offset cx * s_w. The kernels give each thread one staged column for the whole block (the block
// stages blockDim / SW window rows at a time), so only the row part is computed per pixel.
struct StagedColumn {
  int32_t dx, off;
};

SCOTT_HD StagedColumn staged_column(const ImageConv& g, int32_t cx) {
  int32_t lx = cx - g.pad;
  const int32_t dx = neighbour_axis(lx, g.q);
  return {dx, cx * g.s_w};
}

// Image offset (channel 0) of staged pixel (cy, col) of a tile's window, or -1 when it reads zero
// (outside the image or in a masked patch). nb: the tile's 9 neighbour slots; base: staged_tile_base.
SCOTT_HD int32_t staged_pixel_offset(const ImageConv& g, const int32_t* nb, int32_t base, int32_t cy,
                                     StagedColumn col) {
  int32_t ly = cy - g.pad;
  const int32_t dy = neighbour_axis(ly, g.q);
  return nb[dy * 3 + col.dx] < 0 ? -1 : base + cy * g.s_h + col.off;
}

// Staged window row r of a block's tiles (r = tile * R + cy) -> (tile, cy).
SCOTT_HD void staged_row(const ImageConv& g, int32_t r, int32_t& tile, int32_t& cy) {
  tile = static_cast<int32_t>(g.rows_div.div(static_cast<uint32_t>(r)));
  cy = r - tile * g.rows;
}

// (mean, 1/std) of the 4 staged channels: the normalisation table, or (0, 1) without one (then
// (v - 0) * 1 is v exactly, so the staging needs no branch on it).
template <typename A>
struct PixelNorm {
  A mean[kImageChannels], inv_std[kImageChannels];
};

template <typename A>
SCOTT_HD PixelNorm<A> pixel_norm(const ImageConv& g, const A* norm) {
  PixelNorm<A> n;
  for (int c = 0; c < kImageChannels; ++c) {
    const bool real = g.normalize && c < g.c_in;
    n.mean[c] = real ? norm[c] : A(0);
    n.inv_std[c] = real ? norm[g.c_in + c] : A(1);
  }
  return n;
}

// Staged value of channel c (< 4) of a pixel at image offset `off` (channel 0), normalised.
template <typename S, typename A>
SCOTT_HD A staged_value(const ImageConv& g, const S* img, const PixelNorm<A>& n, int32_t off, int c) {
  if (off < 0 || c >= g.c_in) return A(0);
  return (to_acc<A>(img[off + c * g.s_c]) - n.mean[c]) * n.inv_std[c];
}

// Staged pixel index that tap pair p (row ky = p / KP, columns 2 (p % KP) + {0, 1}) of output pixel
// (oy, ox) starts at: its 8 values are K rows 8p .. 8p + 7 (kx parity, channel).
SCOTT_HD int32_t staged_pair_pixel(const ImageConv& g, int32_t oy, int32_t ox, int32_t p) {
  const int32_t ky = p / g.pairs;
  return (2 * oy + ky) * g.width + 2 * ox + 2 * (p - ky * g.pairs);
}

// Padded K row m of the image stage -> row (ky, kx, c) of the (k*k*C_in, C_out) weight gradient,
// or -1 for a padding row (kx = k of an odd k, or channel >= C_in).
SCOTT_HD int32_t image_k_to_weight_row(const ImageConv& g, int32_t m) {
  const int32_t c = m % kImageChannels, kx = (m / kImageChannels) % (2 * g.pairs);
  const int32_t ky = m / (2 * g.pairs * kImageChannels);
  return kx < g.k && c < g.c_in ? (ky * g.k + kx) * g.c_in + c : -1;
}

// The image stage's weight gradient on the implicit path.
inline const char* implicit_image_wgrad_plan(const StageGeometry& g, ImageConv& ic) {
  if (const char* why = implicit_image_plan(g, ic)) return why;
  // one warp per 32 padded K rows and 32 output channels, at most 16 warps
  if (ic.k_rows() % 32 || ic.k_rows() > 256)
    return "the image weight gradient takes kernels whose padded tap rows are a multiple of 32, at most 256 (k = 7)";
  return nullptr;
}


// g' = grad * (out > 0), element i: the masked output gradient both backward GEMMs read (out ==
// nullptr: grad is g' already, as the MaxBlurPool backward writes it with relu_mask).
template <typename T, typename A>
SCOTT_HD T relu_grad_value(const T* grad, const T* out, int64_t i) {
  return out == nullptr || to_acc<A>(out[i]) > A(0) ? grad[i] : from_acc<T>(A(0));
}

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

// relu(v) as the conv epilogues take it (0 for a NaN).
template <typename A>
SCOTT_HD A relu_of(A v) {
  return v > A(0) ? v : A(0);
}

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
      A v = relu_value<T, A>(g, act, slot, b, my, mx + 1, c);
      m = v > m ? v : m;
      v = relu_value<T, A>(g, act, slot, b, my + 1, mx, c);
      m = v > m ? v : m;
      v = relu_value<T, A>(g, act, slot, b, my + 1, mx + 1, c);
      m = v > m ? v : m;
      if (relu) m = relu_of(m);
      acc += m * A(blur_tap(dy) * blur_tap(dx)) / A(16);
    }
  }
  return acc;
}

// Gradient at conv-output element (row r of (M, s, s, C), channel c): the blurred gradient of
// every max window whose first (row-major) maximum is this pixel, as torch's max_pool2d routes;
// with relu_mask, 0 where the element (as the pool reads it) is not positive.
template <typename T, typename A>
SCOTT_HD A max_blur_pool_grad_at(const PoolGeometry& g, const T* grad, const T* act, const int32_t* slot,
                                 const int64_t* tile_pos, int64_t r, int64_t c, bool relu_mask = false) {
  int64_t b, cy, cx;
  tile_coords(tile_pos, r, g.side, g.batch, g.grid_h, g.grid_w, b, cy, cx);
  if (relu_mask && !(relu_value<T, A>(g, act, slot, b, cy, cx, c) > A(0))) return A(0);
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

// Full unrolling of the per-task loops on the GPU, so that every window index is a constant and
// the window stays in registers.
#if defined(__CUDA_ARCH__)
#define SCOTT_UNROLL _Pragma("unroll")
#else
#define SCOTT_UNROLL
#endif

// Why the tiled kernels cannot run a pool, or nullptr when they can (then `tp` is filled): the same
// rule on the GPU and in the C++ twin. A pool it refuses runs the per-element kernels.
inline const char* tiled_pool_plan(const PoolGeometry& g, TiledPool& tp) {
  if (g.channels % 8) return "channels must be multiples of 8 (16-byte vectors)";
  if (g.side % 2 || g.side < 2) return "the side must be even";
  const int64_t limit = int64_t(1) << 31;
  if (g.num_tiles * g.side * g.side * g.channels >= limit || g.batch * g.grid_h * g.grid_w >= limit ||
      g.num_tiles >= limit / kNeighbours)
    return "a tensor passes 2^31 elements (32-bit offsets)";
  tp.num_tiles = static_cast<int32_t>(g.num_tiles);
  tp.side = static_cast<int32_t>(g.side);
  tp.pooled = tp.side / 2;
  tp.channels = static_cast<int32_t>(g.channels);
  tp.vectors = tp.channels / 8;
  tp.tasks = tp.num_tiles * tp.pooled * tp.pooled * tp.vectors;  // < 2^31 / 32 by the test above
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

// Maximum of a 2x2 window as max_blur_pool_at takes it: the first of the largest, row-major.
template <typename A>
SCOTT_HD A pool_window_max(A p00, A p01, A p10, A p11) {
  A m = p00;
  m = p01 > m ? p01 : m;
  m = p10 > m ? p10 : m;
  return p11 > m ? p11 : m;
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

// Whether the pixel at place `own` (row-major) of a 2x2 window p0..p3 is the window's first
// maximum m, as torch's max_pool2d routes: it equals m and no earlier pixel does.
template <typename A>
SCOTT_HD bool pool_first_max(A m, A p0, A p1, A p2, A p3, int own) {
  bool first = (own == 0 ? p0 : own == 1 ? p1 : own == 2 ? p2 : p3) == m;
  if (own > 0) first = first && p0 != m;
  if (own > 1) first = first && p1 != m;
  if (own > 2) first = first && p2 != m;
  return first;
}

// Gradient at the four local pixels (2h + a, 2w + b), a, b = 0..1, of a tile, N channels, into
// acc[a][b]: each 2x2 window at max-map position (2h - 1 + i, 2w - 1 + j), i, j = 0..2, blurs the
// pooled gradient once and routes it to the pixels of the four that are its first maximum.
// Window-local indices, all constants once unrolled: grad(i, j, e) is the pooled gradient at
// (h - 1 + i, w - 1 + j); routed(i, j, own, e, v) is v when the pixel at place `own` of window (i, j)
// is its first maximum (pool_first_max) in channel e, else 0. Windows run row-major, so each pixel
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

// ---- entry points ---------------------------------------------------------------------------------
// dtype: the compute dtype (activations, weights, gradients); src_dtype: the source's (may be
// uint8 for images, code 4). Every pointer is a device pointer for the CUDA versions.
constexpr int kUInt8 = 4;

// The implicit conv GEMMs on (default) or off: off, every stage runs the gather GEMM. Shared by the
// CUDA kernels and the C++ twin, so the twin tests can run either path.
bool& implicit_gemm_enabled();
// The tiled MaxBlurPool kernels on (default) or off (always the per-element ones); nullptr when a
// pool runs tiled, else why not (shape rules; CUDA adds its dtype rules in cuda_tiled_pool).
bool& tiled_pool_enabled();
const char* pool_refusal(const PoolGeometry& g);
// nullptr when a stage's GEMM `op` runs on the implicit path, else why not (shape rules; CUDA adds
// its dtype rules in cuda_implicit_conv).
enum class ConvOp : int { kForward = 0, kWeightGrad = 1, kInputGrad = 2 };
const char* conv_gemm_refusal(const StageGeometry& g, int64_t splits, ConvOp op);

// relu: out = relu(conv), else the conv alone (then the pool after it takes the ReLU).
void conv_relu_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                   const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu);
void conv_relu_wgrad_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                         const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                         void* grad_weight_t);
void conv_relu_dgrad_cpu(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                         const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src);
// relu: the pool of relu(act), applied to the window maxima.
void max_blur_pool_cpu(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                       const int64_t* tile_pos, void* out, bool relu);
// relu_mask: the gradient comes multiplied by (act > 0), for act = relu(y) the gradient with
// respect to y (what both backward GEMMs of the conv before it read).
void max_blur_pool_backward_cpu(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                const int32_t* slot, const int64_t* tile_pos, void* grad_act, bool relu_mask);

#ifdef SCOTT_WITH_CUDA
void conv_relu_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                    const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu,
                    int32_t* nbr, void* stream);
// partial: (splits, K, C_out) accumulator-typed (float, or double for float64) buffer
void conv_relu_wgrad_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                          const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                          void* partial, int64_t splits, int32_t* nbr, void* gmask, void* stream);
void conv_relu_dgrad_cuda(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                          const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src,
                          int32_t* nbr, void* gmask, void* stream);
void max_blur_pool_cuda(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                        const int64_t* tile_pos, void* out, bool relu, void* stream);
void max_blur_pool_backward_cuda(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                 const int32_t* slot, const int64_t* tile_pos, void* grad_act, bool relu_mask,
                                 void* stream);
// The CUDA conv entry points take scratch: nbr (M, 9) int32 and, for the backward GEMMs, gmask
// (M, s, s, C_out) in the compute dtype; both used only on the implicit path (cuda_implicit_conv),
// gmask only when `out` is given. The backward GEMMs (CUDA and twin) take out == nullptr for a
// gradient already multiplied by relu'(out), then read it as is.
bool cuda_implicit_conv(const StageGeometry& g, DType dtype, int64_t splits, ConvOp op);
// whether the image weight gradient, on the current device, runs as clusters of two blocks that
// write one partial per cluster (the caller sizes its partials by this)
bool cuda_image_wgrad_clusters(DType dtype, int src_dtype);
// float16/bfloat16 GEMMs on tensor cores (default) or on the SIMT kernel (for comparison)
void set_tensor_cores(bool enabled);
bool cuda_tiled_pool(const PoolGeometry& g, DType dtype);
#endif

}  // namespace scott
