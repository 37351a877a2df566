// CPU gather/scatter of patch tiles. The gather is a pure copy, so it handles every dtype by
// element size; the scatter sums, and runs in float32/float64 (callers upcast half types).
#include <cstring>

#include "patch_tiles.h"

namespace scott {
namespace {

template <typename Bits>
void gather_copy(const TileGeometry& g, const Bits* src, const int64_t* slot, const int64_t* tile_pos,
                 Bits* tiles) {
  const int64_t T = g.tile_side();
  const int64_t total = g.num_tiles * g.channels * T * T;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t off = gather_source_offset(g, slot, tile_pos, idx);
    tiles[idx] = off < 0 ? Bits(0) : src[off];
  }
}

template <typename Scalar>
void scatter_sum(const TileGeometry& g, const Scalar* grad_tiles, const int64_t* slot,
                 const int64_t* slot_pos, const int64_t* tile_of, Scalar* grad_src) {
  const int64_t total = g.num_slots() * g.channels * g.side * g.side;
  for (int64_t idx = 0; idx < total; ++idx) {
    Scalar acc = 0;
    for_each_reader(g, slot, slot_pos, tile_of, idx, [&](int64_t t) { acc += grad_tiles[t]; });
    grad_src[idx] = acc;
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
