// CPU gather/scatter of patch tiles. The gather is a pure copy, so it handles every dtype by
// element size; the scatter sums, and runs in float32/float64 (callers upcast half types).
#include <algorithm>
#include <cstring>

#include "patch_tiles.h"

namespace scott {
namespace {

// Same result as gather_source_offset() per element, organised for the CPU: per tile row, the
// columns split into runs that each lie in one neighbouring patch, so the slot lookup and the
// division by the patch side happen once per run, not once per element.
template <typename Bits>
void gather_copy(const TileGeometry& g, const Bits* src, const int64_t* slot, const int64_t* tile_pos,
                 Bits* tiles) {
  const int64_t T = g.tile_side(), q = g.side, C = g.channels;
  const int64_t cells = g.grid_h * g.grid_w, H = g.grid_h * q, W = g.grid_w * q;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < g.num_tiles; ++m) {
    Bits* tile = tiles + m * C * T * T;
    const int64_t pos = tile_pos[m];
    if (pos < 0 || pos >= g.num_positions()) {
      std::fill(tile, tile + C * T * T, Bits(0));
      continue;
    }
    const int64_t b = pos / cells, gy = (pos % cells) / g.grid_w, gx = pos % g.grid_w;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t Y = gy * q - g.halo_lo + i;
      int64_t j = 0;
      while (j < T) {
        const int64_t X = gx * q - g.halo_lo + j;
        // Run of columns [j, j_end) inside one patch column (or one stretch outside the image).
        int64_t j_end;
        if (X < 0) j_end = std::min(T, j - X);
        else if (X >= W) j_end = T;
        else j_end = std::min(T, j + (q - X % q));
        int64_t base = -1;
        if (Y >= 0 && Y < H && X >= 0 && X < W) {
          const int64_t s = slot[b * cells + (Y / q) * g.grid_w + X / q];
          if (s >= 0 && s < g.num_slots())
            base = slot_offset(g, s) + (Y % q) * g.y_stride + (X % q) * g.x_stride;
        }
        for (int64_t c = 0; c < C; ++c) {
          Bits* dst = tile + (c * T + i) * T;
          if (base < 0) {
            std::fill(dst + j, dst + j_end, Bits(0));
          } else {
            const Bits* from = src + base + c * g.c_stride;
            for (int64_t jj = j; jj < j_end; ++jj) dst[jj] = from[(jj - j) * g.x_stride];
          }
        }
        j = j_end;
      }
    }
  }
}

// Same sums as for_each_reader() per element (readers visited in the same order), organised
// for the CPU: per source patch, add the overlapping rectangle of every tile that reads it.
template <typename Scalar>
void scatter_sum(const TileGeometry& g, const Scalar* grad_tiles, const int64_t* slot,
                 const int64_t* slot_pos, const int64_t* tile_of, Scalar* grad_src) {
  const int64_t T = g.tile_side(), q = g.side, C = g.channels;
  const int64_t cells = g.grid_h * g.grid_w;
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < g.num_slots(); ++s) {
    Scalar* out = grad_src + s * C * q * q;
    std::fill(out, out + C * q * q, Scalar(0));
    const int64_t pos = slot_pos[s];
    if (pos < 0 || pos >= g.num_positions() || slot[pos] != s) continue;
    const int64_t b = pos / cells, py = (pos % cells) / g.grid_w, px = pos % g.grid_w;
    const int64_t y0 = py * q, x0 = px * q;
    // Tiles whose rows [ty*q - lo, ty*q + q + hi) meet [y0, y0 + q).
    const int64_t ty_lo = std::max<int64_t>(0, floor_div(y0 - q - g.halo_hi, q) + 1);
    const int64_t ty_hi = std::min<int64_t>(g.grid_h - 1, floor_div(y0 + q - 1 + g.halo_lo, q));
    const int64_t tx_lo = std::max<int64_t>(0, floor_div(x0 - q - g.halo_hi, q) + 1);
    const int64_t tx_hi = std::min<int64_t>(g.grid_w - 1, floor_div(x0 + q - 1 + g.halo_lo, q));
    for (int64_t ty = ty_lo; ty <= ty_hi; ++ty) {
      for (int64_t tx = tx_lo; tx <= tx_hi; ++tx) {
        const int64_t m = tile_of[b * cells + ty * g.grid_w + tx];
        if (m < 0 || m >= g.num_tiles) continue;
        const int64_t oy = ty * q - g.halo_lo, ox = tx * q - g.halo_lo;  // tile origin
        const int64_t ya = std::max(y0, oy), yb = std::min(y0 + q, oy + T);
        const int64_t xa = std::max(x0, ox), xb = std::min(x0 + q, ox + T);
        for (int64_t c = 0; c < C; ++c) {
          const Scalar* tile = grad_tiles + (m * C + c) * T * T;
          Scalar* plane = out + c * q * q;
          for (int64_t Y = ya; Y < yb; ++Y)
            for (int64_t X = xa; X < xb; ++X) plane[(Y - y0) * q + (X - x0)] += tile[(Y - oy) * T + (X - ox)];
        }
      }
    }
  }
}

}  // namespace

void gather_tiles_cpu(const TileGeometry& g, DType dtype, const void* src, const int64_t* slot,
                      const int64_t* tile_pos, void* tiles) {
  // Bit patterns of zero are all-zero for every supported float type, so copy as integers.
  switch (element_size(dtype)) {
    case 2:
      return gather_copy(g, static_cast<const uint16_t*>(src), slot, tile_pos, static_cast<uint16_t*>(tiles));
    case 4:
      return gather_copy(g, static_cast<const uint32_t*>(src), slot, tile_pos, static_cast<uint32_t*>(tiles));
    case 8:
      return gather_copy(g, static_cast<const uint64_t*>(src), slot, tile_pos, static_cast<uint64_t*>(tiles));
  }
  throw std::invalid_argument("gather_tiles: unsupported element size");
}

void scatter_tiles_cpu(const TileGeometry& g, DType dtype, const void* grad_tiles,
                       const int64_t* slot, const int64_t* slot_pos, const int64_t* tile_of,
                       void* grad_src) {
  switch (dtype) {
    case DType::kFloat32:
      return scatter_sum(g, static_cast<const float*>(grad_tiles), slot, slot_pos, tile_of,
                         static_cast<float*>(grad_src));
    case DType::kFloat64:
      return scatter_sum(g, static_cast<const double*>(grad_tiles), slot, slot_pos, tile_of,
                         static_cast<double*>(grad_src));
    default:
      throw std::invalid_argument("scatter_tiles (CPU): expected float32 or float64");
  }
}

}  // namespace scott
