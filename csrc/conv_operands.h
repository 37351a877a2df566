// The conv stages' GEMM operands: the gather GEMM's per-element operand functions, the implicit
// GEMMs' row and offset functions (compact stages) and the image stage's staging functions, shared
// by the CUDA kernels and the C++ twin. See tokenizer.h for the layouts and the three GEMMs.
#pragma once

#include "stage_common.h"

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
    return out == nullptr || relu_passes(to_acc<A>(out[i])) ? to_acc<A>(grad[i]) : A(0);
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
    return out == nullptr || relu_passes(to_acc<A>(out[off])) ? to_acc<A>(grad[off]) : A(0);
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
// multiples of 8 (16-byte vectors) and every tensor offset fits in 31 bits (`implicit_conv_plan`,
// kOffsetLimit).

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
  const int64_t limit = kOffsetLimit;
  const int64_t widest = g.c_in > g.c_out ? g.c_in : g.c_out;
  const int64_t weights = g.ksize * g.ksize * g.c_in * g.c_out;
  if (g.num_tiles * g.in_side * g.in_side * widest >= limit || g.num_tiles * kNeighbours >= limit ||
      (splits < 1 ? 1 : splits) * weights >= limit)
    return kOffsetRefusal;
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
  const int64_t limit = kOffsetLimit;
  const int64_t H = g.grid_h * g.in_side, W = g.grid_w * g.in_side;
  const auto span = [](int64_t n, int64_t stride) { return (n - 1) * (stride < 0 ? -stride : stride); };
  if (g.s_b < 0 || g.s_c < 0 || g.s_h < 0 || g.s_w < 0 ||
      span(g.batch, g.s_b) + span(g.c_in, g.s_c) + span(H, g.s_h) + span(W, g.s_w) >= limit ||
      g.num_tiles * s * s * g.c_out >= limit || g.num_tiles * kNeighbours >= limit ||
      g.batch * g.grid_h * g.grid_w >= limit)
    return kOffsetRefusal;
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

// Whether tap pair p's second column is the padding of an odd k (its weight is 0). Its staged pixel
// is a real one (another output's tap), so the GEMMs must not multiply it by that 0: a NaN or Inf
// there would give NaN (0 * Inf) where the convolution reads nothing. The twin skips the term, the
// tensor-core kernel zeroes the pixel's A fragment values.
SCOTT_HD bool image_pair_padded(const ImageConv& g, int32_t p) {
  return 2 * (p % g.pairs) + 1 >= g.k;
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

// The image stage's weight gradient on the implicit path, into `splits` (k*k*C_in, C_out) partials.
inline const char* implicit_image_wgrad_plan(const StageGeometry& g, int64_t splits, ImageConv& ic) {
  if (const char* why = implicit_image_plan(g, ic)) return why;
  // the partials' offsets (split * k*k*C_in * C_out + ...) are 32-bit too
  if ((splits < 1 ? 1 : splits) * g.ksize * g.ksize * g.c_in * g.c_out >= kOffsetLimit) return kOffsetRefusal;
  // one warp per 32 padded K rows and 32 output channels, at most 16 warps
  if (ic.k_rows() % 32 || ic.k_rows() > 256)
    return "the image weight gradient takes kernels whose padded tap rows are a multiple of 32, at most 256 (k = 7)";
  return nullptr;
}

// g' = grad * relu'(out) (relu_passes), element i: the masked output gradient both backward GEMMs read (out ==
// nullptr: grad is g' already, as the MaxBlurPool backward writes it with relu_mask).
template <typename T, typename A>
SCOTT_HD T relu_grad_value(const T* grad, const T* out, int64_t i) {
  return out == nullptr || relu_passes(to_acc<A>(out[i])) ? grad[i] : from_acc<T>(A(0));
}

}  // namespace scott
