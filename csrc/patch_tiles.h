// Gather of visible patches with their halo into dense tiles, and its adjoint.
//
// A "source" holds S patches of C x side x side values (any strides; the slot index s is
// decomposed over up to three leading dimensions, so a dense (B, C, H, W) image viewed as
// (B, GH, GW, C, side, side) and a compact (S, C, side, side) activation are both sources).
// `slot[b, gy, gx]` names the source patch at grid position (b, gy, gx), or -1 where that
// patch is masked. `tile_pos[m]` is the flat grid position of output tile m.
//
// Tile m covers rows [gy*side - halo_lo, gy*side + side + halo_hi) of its image at this
// resolution (same for columns); every value whose patch is masked or outside the image is 0.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace scott {

#if defined(__CUDACC__)
#define SCOTT_HD __host__ __device__ __forceinline__
#else
#define SCOTT_HD inline
#endif


enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline int64_t element_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
  }
  throw std::invalid_argument("unknown dtype code");
}

struct TileGeometry {
  int64_t batch = 0, grid_h = 0, grid_w = 0;  // patch grid shared by tiles and slot table
  int64_t channels = 0, side = 0;             // source patch: C x side x side
  int64_t halo_lo = 0, halo_hi = 0;           // tile side = side + halo_lo + halo_hi
  int64_t num_tiles = 0;                      // M
  int64_t slot_sizes[3] = {1, 1, 1};          // source slot dims, S = product
  int64_t slot_strides[3] = {0, 0, 0};        // in elements
  int64_t c_stride = 0, y_stride = 0, x_stride = 0;

  SCOTT_HD int64_t tile_side() const { return side + halo_lo + halo_hi; }
  SCOTT_HD int64_t num_slots() const { return slot_sizes[0] * slot_sizes[1] * slot_sizes[2]; }
  SCOTT_HD int64_t num_positions() const { return batch * grid_h * grid_w; }
};

// Floor division for possibly negative numerators (C++ '/' truncates toward zero).
SCOTT_HD int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

SCOTT_HD int64_t slot_offset(const TileGeometry& g, int64_t s) {
  const int64_t i2 = s % g.slot_sizes[2];
  const int64_t r = s / g.slot_sizes[2];
  const int64_t i1 = r % g.slot_sizes[1];
  const int64_t i0 = r / g.slot_sizes[1];
  return i0 * g.slot_strides[0] + i1 * g.slot_strides[1] + i2 * g.slot_strides[2];
}

// Source element offset read by tile element `idx` of the flat (M, C, T, T) tile array, or -1
// when that element is padding (masked patch, outside the image, or an out-of-range table entry;
// table entries are range-checked so that no input can make a kernel read out of bounds).
SCOTT_HD int64_t gather_source_offset(const TileGeometry& g, const int64_t* slot,
                                      const int64_t* tile_pos, int64_t idx) {
  const int64_t T = g.tile_side();
  const int64_t j = idx % T;
  int64_t r = idx / T;
  const int64_t i = r % T;
  r /= T;
  const int64_t c = r % g.channels;
  const int64_t m = r / g.channels;
  const int64_t pos = tile_pos[m];
  if (pos < 0 || pos >= g.num_positions()) return -1;
  const int64_t cells = g.grid_h * g.grid_w;
  const int64_t b = pos / cells;
  const int64_t gy = (pos % cells) / g.grid_w;
  const int64_t gx = pos % g.grid_w;
  const int64_t Y = gy * g.side - g.halo_lo + i;
  const int64_t X = gx * g.side - g.halo_lo + j;
  if (Y < 0 || X < 0 || Y >= g.grid_h * g.side || X >= g.grid_w * g.side) return -1;
  const int64_t s = slot[b * cells + (Y / g.side) * g.grid_w + (X / g.side)];
  if (s < 0 || s >= g.num_slots()) return -1;
  return slot_offset(g, s) + c * g.c_stride + (Y % g.side) * g.y_stride + (X % g.side) * g.x_stride;
}

// Visits every tile element that reads source element `idx` of the flat (S, C, side, side)
// gradient array, calling fn(flat tile index). The inverse tables say where slot s sits
// (slot_pos) and which tile a grid position owns (tile_of); a slot counts only where the
// forward table really maps its position to it, so this is the exact adjoint of the gather.
template <typename Fn>
SCOTT_HD void for_each_reader(const TileGeometry& g, const int64_t* slot, const int64_t* slot_pos,
                              const int64_t* tile_of, int64_t idx, Fn&& fn) {
  const int64_t q = g.side;
  const int64_t x = idx % q;
  int64_t r = idx / q;
  const int64_t y = r % q;
  r /= q;
  const int64_t c = r % g.channels;
  const int64_t s = r / g.channels;
  const int64_t pos = slot_pos[s];
  if (pos < 0 || pos >= g.num_positions() || slot[pos] != s) return;
  const int64_t cells = g.grid_h * g.grid_w;
  const int64_t b = pos / cells;
  const int64_t Y = ((pos % cells) / g.grid_w) * q + y;
  const int64_t X = (pos % g.grid_w) * q + x;
  const int64_t T = g.tile_side();
  // Tile (ty, tx) covers rows [ty*q - lo, ty*q + q + hi): those holding Y are ty_lo..ty_hi.
  int64_t ty_lo = floor_div(Y - q - g.halo_hi, q) + 1, ty_hi = floor_div(Y + g.halo_lo, q);
  int64_t tx_lo = floor_div(X - q - g.halo_hi, q) + 1, tx_hi = floor_div(X + g.halo_lo, q);
  if (ty_lo < 0) ty_lo = 0;
  if (tx_lo < 0) tx_lo = 0;
  if (ty_hi >= g.grid_h) ty_hi = g.grid_h - 1;
  if (tx_hi >= g.grid_w) tx_hi = g.grid_w - 1;
  for (int64_t ty = ty_lo; ty <= ty_hi; ++ty) {
    for (int64_t tx = tx_lo; tx <= tx_hi; ++tx) {
      const int64_t m = tile_of[b * cells + ty * g.grid_w + tx];
      if (m < 0 || m >= g.num_tiles) continue;
      const int64_t i = Y - (ty * q - g.halo_lo);
      const int64_t j = X - (tx * q - g.halo_lo);
      fn(((m * g.channels + c) * T + i) * T + j);
    }
  }
}

// CPU implementations (patch_tiles_cpu.cpp). Tables are int64; outputs are contiguous.
// gather: tiles (M, C, T, T) from src.  scatter: grad_src (S, C, side, side) from grad_tiles,
// the exact adjoint of gather (each source value sums the tile values that read it).
void gather_tiles_cpu(const TileGeometry& g, DType dtype, const void* src, const int64_t* slot,
                      const int64_t* tile_pos, void* tiles);
void scatter_tiles_cpu(const TileGeometry& g, DType dtype, const void* grad_tiles,
                       const int64_t* slot, const int64_t* slot_pos, const int64_t* tile_of,
                       void* grad_src);

#ifdef SCOTT_WITH_CUDA
// CUDA implementations (patch_tiles_cuda.cu); `stream` is a cudaStream_t.
void gather_tiles_cuda(const TileGeometry& g, DType dtype, const void* src, const int64_t* slot,
                       const int64_t* tile_pos, void* tiles, void* stream);
void scatter_tiles_cuda(const TileGeometry& g, DType dtype, const void* grad_tiles,
                        const int64_t* slot, const int64_t* slot_pos, const int64_t* tile_of,
                        void* grad_src, void* stream);
int cuda_runtime_version();
// The architecture (major * 10 + minor) of the code this module runs on a device (the current one
// without an argument): the __CUDA_ARCH__ / 10 its kernels were compiled for, which can be below
// the device's own (an sm_80 build on an sm_86 GPU, or older PTX compiled by the driver of a
// newer one); 0 when the module holds no code the device can run. Kernels that need sm_80 code
// (tensor-core GEMMs, tiled pools) or sm_90 code (clusters) run only where this says so.
int module_code_arch(int device);
int module_code_arch();
#endif

}  // namespace scott
