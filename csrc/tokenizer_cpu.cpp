// C++ CPU implementation of the tokenizer stage kernels (float32 and float64). It runs the same
// operand and pooling functions as the CUDA kernels (tokenizer.h) with plain loops, so the tests
// that compare it with the dense reference check the CUDA kernels' index logic too.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <algorithm>
#include <vector>

#include "tokenizer.h"

namespace scott {
namespace {

// C[m, n] = sum_k a(m, k) * b(k, n), handed to store(m, n, acc). Rows in parallel; each row's
// operand values are read once.
template <typename A, class LoadA, class LoadB, class Store>
void gemm(int64_t M, int64_t N, int64_t K, const LoadA& a, const LoadB& b, const Store& store) {
#pragma omp parallel
  {
    std::vector<A> row(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) row[k] = a(m, k);
      for (int64_t n = 0; n < N; ++n) {
        A acc = A(0);
        for (int64_t k = 0; k < K; ++k) acc += row[k] * b(k, n);
        store(m, n, acc);
      }
    }
  }
}

template <typename T, typename S>
void conv_relu_typed(const StageGeometry& g, const void* src, const void* weight_t, const void* norm,
                     const int32_t* slot, const int64_t* tile_pos, void* out, bool relu) {
  using A = T;
  ConvWindow<S, A> window{g, static_cast<const S*>(src), slot, tile_pos, static_cast<const A*>(norm)};
  DenseMatrix<T, A> w{static_cast<const T*>(weight_t), g.c_out};
  T* o = static_cast<T*>(out);
  const int64_t n_out = g.c_out;
  gemm<A>(g.out_rows(), g.c_out, g.ksize * g.ksize * g.c_in, window, w,
          [&](int64_t m, int64_t n, A acc) { o[m * n_out + n] = T(relu ? relu_of(acc) : acc); });
}

template <typename T, typename S>
void wgrad_typed(const StageGeometry& g, const void* src, const void* grad, const void* out, const void* norm,
                 const int32_t* slot, const int64_t* tile_pos, void* grad_weight_t) {
  using A = T;
  ConvWindow<S, A> window{g, static_cast<const S*>(src), slot, tile_pos, static_cast<const A*>(norm)};
  auto window_t = [&](int64_t kk, int64_t r) { return window(r, kk); };
  ReluGrad<T, A> g_relu{static_cast<const T*>(grad), static_cast<const T*>(out), g.c_out};
  T* dw = static_cast<T*>(grad_weight_t);
  const int64_t n_out = g.c_out;
  gemm<A>(g.ksize * g.ksize * g.c_in, g.c_out, g.out_rows(), window_t, g_relu,
          [&](int64_t m, int64_t n, A acc) { dw[m * n_out + n] = T(acc); });
}

template <typename T>
void dgrad_typed(const StageGeometry& g, const void* grad, const void* out, const void* weight_t,
                 const int32_t* slot, const int64_t* tile_pos, void* grad_src) {
  using A = T;
  T* d = static_cast<T*>(grad_src);
  const int64_t n_in = g.c_in;
  for (int cls = 0; cls < 4; ++cls) {
    const ParityClass pc = parity_class(g, cls);
    ReluGradWindow<T, A> g_window{g, pc, static_cast<const T*>(grad), static_cast<const T*>(out), slot, tile_pos};
    ClassWeights<T, A> w{g, pc, static_cast<const T*>(weight_t)};
    gemm<A>(g.in_rows() / 4, g.c_in, pc.n_ky * pc.n_kx * g.c_out, g_window, w,
            [&](int64_t m, int64_t n, A acc) { d[class_row(g, pc, m) * n_in + n] = T(acc); });
  }
}

// ---- the implicit GEMM path, computed through the same index functions as the CUDA kernels ----
std::vector<int32_t> neighbour_table(const StageGeometry& g, const int32_t* slot, const int64_t* tile_pos) {
  std::vector<int32_t> nb(static_cast<size_t>(g.num_tiles) * kNeighbours);
  for (int64_t t = 0; t < g.num_tiles; ++t)
    tile_neighbours(slot, tile_pos, t, g.batch, g.grid_h, g.grid_w, g.num_tiles, &nb[t * kNeighbours]);
  return nb;
}

template <typename T>
std::vector<T> masked_grad(const StageGeometry& g, const T* grad, const T* out) {
  const int64_t n = g.out_rows() * g.c_out;
  std::vector<T> gm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) gm[i] = relu_grad_value<T, T>(grad, out, i);
  return gm;
}

// Each (row, tap, 8-channel vector) step below is one 16-byte operand load of the CUDA kernel.
template <typename T>
void implicit_forward(const StageGeometry& g, const ImplicitConv& ic, const T* src, const T* w, const int32_t* slot,
                      const int64_t* tile_pos, T* out, bool relu) {
  const std::vector<int32_t> nb = neighbour_table(g, slot, tile_pos);
  const int32_t rows = static_cast<int32_t>(g.out_rows());
#pragma omp parallel
  {
    std::vector<T> acc(static_cast<size_t>(ic.c_out));
#pragma omp for schedule(static)
    for (int32_t r = 0; r < rows; ++r) {
      const ImplicitRow row = conv_row(ic, r);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int32_t ky = 0; ky < ic.k; ++ky)
        for (int32_t kx = 0; kx < ic.k; ++kx)
          for (int32_t c = 0; c < ic.c_in; c += 8) {
            const int32_t off = conv_src_offset(ic, &nb[row.tile * kNeighbours], row.y0, row.x0, ky, kx, c);
            if (off < 0) continue;
            const int32_t wr = conv_weight_row(ic, ky, kx, c);
            for (int e = 0; e < 8; ++e)
              for (int32_t n = 0; n < ic.c_out; ++n) acc[n] += src[off + e] * w[(wr + e) * ic.c_out + n];
          }
      for (int32_t n = 0; n < ic.c_out; ++n) out[r * ic.c_out + n] = relu ? relu_of(acc[n]) : acc[n];
    }
  }
}

// The image stage, in groups of tiles (128 output pixels) as the CUDA kernels run it: the group's
// windows staged once (masking, normalisation, 4 channels per pixel) one window row at a time
// through the same row / column functions, then every output pixel reads 16-byte tap pairs from
// them, as the CUDA kernel's ldmatrix rows do.
template <typename T, typename S>
void stage_image_group(const ImageConv& ic, const S* img, const PixelNorm<T>& pn, const std::vector<int32_t>& nb,
                       const int64_t* tile_pos, int32_t t_first, std::vector<T>& staged) {
  const int32_t tiles = ic.group_tiles(), window = ic.rows * ic.width;
  staged.assign(static_cast<size_t>(tiles * window * kImageChannels), T(0));
  int32_t base[128], nbs[128 * kNeighbours];
  for (int32_t tl = 0; tl < tiles; ++tl) {
    const int32_t t = t_first + tl;
    base[tl] = staged_tile_base(ic, t < ic.num_tiles ? tile_pos[t] : -1);
    for (int d = 0; d < kNeighbours; ++d) nbs[tl * kNeighbours + d] = t < ic.num_tiles ? nb[t * kNeighbours + d] : -1;
  }
  for (int32_t r = 0; r < tiles * ic.rows; ++r) {
    int32_t tl, cy;
    staged_row(ic, r, tl, cy);
    for (int32_t cx = 0; cx < ic.width; ++cx) {
      const int32_t off = staged_pixel_offset(ic, &nbs[tl * kNeighbours], base[tl], cy, staged_column(ic, cx));
      for (int c = 0; c < kImageChannels; ++c)
        staged[(r * ic.width + cx) * kImageChannels + c] = staged_value<S, T>(ic, img, pn, off, c);
    }
  }
}

template <typename T, typename S>
void implicit_image_forward(const StageGeometry& g, const ImageConv& ic, const S* img, const T* norm,
                            const T* w_pad, const int32_t* slot, const int64_t* tile_pos, T* out, bool relu) {
  const std::vector<int32_t> nb = neighbour_table(g, slot, tile_pos);
  const int32_t n_pairs = ic.k * ic.pairs, tiles = ic.group_tiles(), window = ic.rows * ic.width;
  const int32_t groups = (ic.num_tiles + tiles - 1) / tiles;
  const PixelNorm<T> pn = pixel_norm(ic, norm);
#pragma omp parallel
  {
    std::vector<T> staged;
    std::vector<T> acc(static_cast<size_t>(ic.c_out));
#pragma omp for schedule(static)
    for (int32_t grp = 0; grp < groups; ++grp) {
      stage_image_group(ic, img, pn, nb, tile_pos, grp * tiles, staged);
      for (int32_t tl = 0; tl < tiles && grp * tiles + tl < ic.num_tiles; ++tl)
        for (int32_t oy = 0; oy < ic.s; ++oy)
          for (int32_t ox = 0; ox < ic.s; ++ox) {
            std::fill(acc.begin(), acc.end(), T(0));
            for (int32_t p = 0; p < n_pairs; ++p) {
              const T* a = &staged[(tl * window + staged_pair_pixel(ic, oy, ox, p)) * kImageChannels];
              const int taps = image_pair_padded(ic, p) ? kImageChannels : 2 * kImageChannels;
              for (int e = 0; e < taps; ++e)
                for (int32_t n = 0; n < ic.c_out; ++n) acc[n] += a[e] * w_pad[(p * 2 * kImageChannels + e) * ic.c_out + n];
            }
            const int32_t r = ((grp * tiles + tl) * ic.s + oy) * ic.s + ox;
            for (int32_t n = 0; n < ic.c_out; ++n) out[r * ic.c_out + n] = relu ? relu_of(acc[n]) : acc[n];
          }
    }
  }
}

// Weight gradient of the image stage: the staged windows as the GEMM's A^T, reduced over output
// pixels into the padded K rows, then mapped back to (ky, kx, c) rows.
template <typename T, typename S>
void implicit_image_wgrad(const StageGeometry& g, const ImageConv& ic, const S* img, const T* norm, const T* grad,
                          const T* out, const int32_t* slot, const int64_t* tile_pos, T* dw) {
  const std::vector<int32_t> nb = neighbour_table(g, slot, tile_pos);
  const std::vector<T> gm = masked_grad(g, grad, out);
  const PixelNorm<T> pn = pixel_norm(ic, norm);
  const int32_t n_pairs = ic.k * ic.pairs, k_rows = ic.k_rows(), tiles = ic.group_tiles();
  const int32_t window = ic.rows * ic.width, groups = (ic.num_tiles + tiles - 1) / tiles;
  std::vector<T> acc(static_cast<size_t>(k_rows) * ic.c_out, T(0));
  std::vector<T> staged;
  for (int32_t grp = 0; grp < groups; ++grp) {
    stage_image_group(ic, img, pn, nb, tile_pos, grp * tiles, staged);
#pragma omp parallel for schedule(static)
    for (int32_t m = 0; m < k_rows; ++m) {  // rows of the padded result: disjoint per thread
      const int32_t p = m / (2 * kImageChannels), e = m % (2 * kImageChannels);
      if (p >= n_pairs) continue;
      for (int32_t tl = 0; tl < tiles && grp * tiles + tl < ic.num_tiles; ++tl)
        for (int32_t oy = 0; oy < ic.s; ++oy)
          for (int32_t ox = 0; ox < ic.s; ++ox) {
            const T a = staged[(tl * window + staged_pair_pixel(ic, oy, ox, p)) * kImageChannels + e];
            const T* gr = &gm[static_cast<size_t>(((grp * tiles + tl) * ic.s + oy) * ic.s + ox) * ic.c_out];
            for (int32_t n = 0; n < ic.c_out; ++n) acc[static_cast<size_t>(m) * ic.c_out + n] += a * gr[n];
          }
    }
  }
  for (int32_t m = 0; m < k_rows; ++m) {
    const int32_t row = image_k_to_weight_row(ic, m);
    if (row >= 0)
      for (int32_t n = 0; n < ic.c_out; ++n) dw[row * ic.c_out + n] = acc[static_cast<size_t>(m) * ic.c_out + n];
  }
}

template <typename T>
void implicit_wgrad(const StageGeometry& g, const ImplicitConv& ic, const T* src, const T* grad, const T* out,
                    const int32_t* slot, const int64_t* tile_pos, T* dw) {
  const std::vector<int32_t> nb = neighbour_table(g, slot, tile_pos);
  const std::vector<T> gm = masked_grad(g, grad, out);
  const int32_t rows = static_cast<int32_t>(g.out_rows());
  std::fill(dw, dw + ic.k * ic.k * ic.c_in * ic.c_out, T(0));
#pragma omp parallel for schedule(static)
  for (int32_t tap = 0; tap < ic.k * ic.k; ++tap) {  // taps own disjoint result rows
    const int32_t ky = tap / ic.k, kx = tap % ic.k;
    for (int32_t r = 0; r < rows; ++r) {
      const ImplicitRow row = conv_row(ic, r);
      for (int32_t c = 0; c < ic.c_in; c += 8) {
        const int32_t off = conv_src_offset(ic, &nb[row.tile * kNeighbours], row.y0, row.x0, ky, kx, c);
        if (off < 0) continue;
        const int32_t wr = conv_weight_row(ic, ky, kx, c);
        for (int e = 0; e < 8; ++e)
          for (int32_t n = 0; n < ic.c_out; ++n) dw[(wr + e) * ic.c_out + n] += src[off + e] * gm[r * ic.c_out + n];
      }
    }
  }
}

template <typename T>
void implicit_dgrad(const StageGeometry& g, const ImplicitConv& ic, const T* grad, const T* out, const T* wt,
                    const int32_t* slot, const int64_t* tile_pos, T* dsrc) {
  const std::vector<int32_t> nb = neighbour_table(g, slot, tile_pos);
  const std::vector<T> gm = masked_grad(g, grad, out);
  const int32_t rows = static_cast<int32_t>(g.out_rows());  // rows per parity class: M * (q/2)^2
  for (int cls = 0; cls < 4; ++cls) {
    const ParityClass pc = parity_class(g, cls);
#pragma omp parallel
    {
      std::vector<T> acc(static_cast<size_t>(ic.c_in));
#pragma omp for schedule(static)
      for (int32_t m = 0; m < rows; ++m) {
        const DgradRow row = dgrad_row(ic, pc, m);
        std::fill(acc.begin(), acc.end(), T(0));
        for (int32_t j = 0; j < pc.n_ky; ++j)
          for (int32_t i = 0; i < pc.n_kx; ++i)
            for (int32_t co = 0; co < ic.c_out; co += 8) {
              const int32_t off = dgrad_grad_offset(ic, &nb[row.tile * kNeighbours], row.y0, row.x0, j, i, co);
              if (off < 0) continue;
              const int32_t wr = dgrad_weight_row(ic, pc, j, i, co);
              for (int e = 0; e < 8; ++e)
                for (int32_t n = 0; n < ic.c_in; ++n) acc[n] += gm[off + e] * wt[(wr + e) * ic.c_in + n];
            }
        for (int32_t n = 0; n < ic.c_in; ++n) dsrc[row.dst * ic.c_in + n] = acc[n];
      }
    }
  }
}

template <typename F>
void for_each_element(int64_t rows, int64_t channels, const F& f) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c) f(r, c);
}

}  // namespace

int64_t visible_tables_cpu(const uint8_t* keep, int64_t batch, int64_t positions, int64_t num_visible,
                           int64_t grid_w, int32_t radius, int32_t* slot, int64_t* tile_pos, int32_t* nbr) {
  int64_t wrong = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = b * positions, first_tile = b * num_visible;
    int64_t seen = 0;
    for (int64_t n = 0; n < positions; ++n) {
      const int64_t index = keep[row + n] != 0 ? seen++ : -1;
      const bool visible = index >= 0 && index < num_visible;
      slot[row + n] = visible ? static_cast<int32_t>(first_tile + index) : -1;
      if (visible) tile_pos[first_tile + index] = row + n;
    }
    for (int64_t j = seen; j < num_visible; ++j) tile_pos[first_tile + j] = row;
    wrong += seen != num_visible;
  }
  if (radius >= 0) {
    const int64_t nb2 = (2 * radius + 1) * (2 * radius + 1);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t e = 0; e < num_visible * nb2; ++e)
        nbr[b * num_visible * nb2 + e] = row_neighbour(slot, tile_pos, b, positions, num_visible, grid_w, radius, e);
  }
  return wrong;
}

#define SCOTT_CPU_DISPATCH(dtype, name, ...)                                   \
  do {                                                                         \
    if ((dtype) == DType::kFloat32) {                                          \
      using T = float;                                                         \
      __VA_ARGS__;                                                             \
    } else if ((dtype) == DType::kFloat64) {                                   \
      using T = double;                                                        \
      __VA_ARGS__;                                                             \
    } else {                                                                   \
      throw std::invalid_argument(std::string(name) +                          \
                                  ": the CPU kernels compute in float32 or float64"); \
    }                                                                          \
  } while (0)

bool& implicit_gemm_enabled() {
  static bool enabled = true;
  return enabled;
}

const char* conv_gemm_refusal(const StageGeometry& g, int64_t splits, ConvOp op) {
  if (!implicit_gemm_enabled()) return "the implicit GEMM is switched off";
  if (g.src_image) {
    ImageConv ic;
    if (op == ConvOp::kInputGrad) return "images get their gradient from the gather GEMM";
    return op == ConvOp::kWeightGrad ? implicit_image_wgrad_plan(g, splits, ic) : implicit_image_plan(g, ic);
  }
  ImplicitConv ic;
  return implicit_conv_plan(g, splits, ic);
}

void conv_relu_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                   const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu) {
  ImplicitConv ic;
  const bool implicit = conv_gemm_refusal(g, 1, ConvOp::kForward) == nullptr;
  ImageConv image;
  SCOTT_CPU_DISPATCH(dtype, "conv_relu", {
    if (implicit && g.src_image) {
      implicit_image_plan(g, image);
      if (src_dtype == kUInt8)
        implicit_image_forward<T, uint8_t>(g, image, static_cast<const uint8_t*>(src), static_cast<const T*>(norm),
                                           static_cast<const T*>(weight_t), slot, tile_pos, static_cast<T*>(out),
                                           relu);
      else
        implicit_image_forward<T, T>(g, image, static_cast<const T*>(src), static_cast<const T*>(norm),
                                     static_cast<const T*>(weight_t), slot, tile_pos, static_cast<T*>(out), relu);
    } else if (implicit && implicit_conv_plan(g, 1, ic) == nullptr)
      implicit_forward<T>(g, ic, static_cast<const T*>(src), static_cast<const T*>(weight_t), slot, tile_pos,
                          static_cast<T*>(out), relu);
    else if (src_dtype == kUInt8)
      conv_relu_typed<T, uint8_t>(g, src, weight_t, norm, slot, tile_pos, out, relu);
    else
      conv_relu_typed<T, T>(g, src, weight_t, norm, slot, tile_pos, out, relu);
  });
}

void conv_relu_wgrad_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                         const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                         void* grad_weight_t) {
  ImplicitConv ic;
  ImageConv image;
  const bool implicit = conv_gemm_refusal(g, 1, ConvOp::kWeightGrad) == nullptr;
  SCOTT_CPU_DISPATCH(dtype, "conv_relu_wgrad", {
    if (implicit && g.src_image) {
      implicit_image_wgrad_plan(g, 1, image);
      if (src_dtype == kUInt8)
        implicit_image_wgrad<T, uint8_t>(g, image, static_cast<const uint8_t*>(src), static_cast<const T*>(norm),
                                         static_cast<const T*>(grad), static_cast<const T*>(out), slot, tile_pos,
                                         static_cast<T*>(grad_weight_t));
      else
        implicit_image_wgrad<T, T>(g, image, static_cast<const T*>(src), static_cast<const T*>(norm),
                                   static_cast<const T*>(grad), static_cast<const T*>(out), slot, tile_pos,
                                   static_cast<T*>(grad_weight_t));
    } else if (implicit && implicit_conv_plan(g, 1, ic) == nullptr)
      implicit_wgrad<T>(g, ic, static_cast<const T*>(src), static_cast<const T*>(grad), static_cast<const T*>(out),
                        slot, tile_pos, static_cast<T*>(grad_weight_t));
    else if (src_dtype == kUInt8)
      wgrad_typed<T, uint8_t>(g, src, grad, out, norm, slot, tile_pos, grad_weight_t);
    else
      wgrad_typed<T, T>(g, src, grad, out, norm, slot, tile_pos, grad_weight_t);
  });
}

void conv_relu_dgrad_cpu(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                         const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src) {
  ImplicitConv ic;
  const bool implicit = conv_gemm_refusal(g, 1, ConvOp::kInputGrad) == nullptr && implicit_conv_plan(g, 1, ic) == nullptr;
  SCOTT_CPU_DISPATCH(dtype, "conv_relu_dgrad", {
    if (implicit)
      implicit_dgrad<T>(g, ic, static_cast<const T*>(grad), static_cast<const T*>(out),
                        static_cast<const T*>(weight_t), slot, tile_pos, static_cast<T*>(grad_src));
    else
      dgrad_typed<T>(g, grad, out, weight_t, slot, tile_pos, grad_src);
  });
}

bool& tiled_pool_enabled() {
  static bool enabled = true;
  return enabled;
}

const char* pool_refusal(const PoolGeometry& g) {
  if (!tiled_pool_enabled()) return "the tiled pool kernels are switched off";
  TiledPool tp;
  return tiled_pool_plan(g, tp);
}

namespace {

// The tiled pool kernels' tasks, one CUDA thread each: the same task decomposition, tile lookup and
// window offsets, 8 channels per vector, zeros where an offset is -1; then the same per-task
// functions read the loaded windows.
template <typename T, int R>
void load_pool_window(const T* base, const int32_t (&off)[R][R], T (&win)[R][R][8]) {
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j)
      for (int e = 0; e < 8; ++e) win[i][j][e] = off[i][j] < 0 ? T(0) : base[off[i][j] + e];
}

template <typename T>
void pool_window_maxima(const T (&win)[4][4][8], T (&wm)[3][3][8], bool relu = false) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int e = 0; e < 8; ++e) {
        wm[i][j][e] = pool_window_max(win[i][j][e], win[i][j + 1][e], win[i + 1][j][e], win[i + 1][j + 1][e]);
        if (relu) wm[i][j][e] = relu_of(wm[i][j][e]);
      }
}

template <typename T>
void tiled_pool_forward(const TiledPool& tp, const T* act, const int32_t* slot, const int64_t* tile_pos, T* out) {
#pragma omp parallel for schedule(static)
  for (int32_t task = 0; task < tp.tasks; ++task) {
    const PoolTask k = pool_task(tp, task);
    const PoolTile pt = pool_tile(tp, slot, tile_pos, k.t);
    int32_t off[4][4];
    pool_window_offsets<4>(tp, pt, tp.side, 2 * k.h - 1, 2 * k.w - 1, k.v, off);
    T win[4][4][8], wm[3][3][8], r[8];
    load_pool_window<T, 4>(act, off, win);
    pool_window_maxima(win, wm, tp.relu);
    tiled_pool_values<8, T>(tp, pt, k.h, k.w, [&](int i, int j, int e) { return wm[i][j][e]; }, r);
    std::copy(r, r + 8, out + static_cast<int64_t>(task) * 8);
  }
}

template <typename T>
void tiled_pool_backward(const TiledPool& tp, const T* grad, const T* act, const int32_t* slot,
                         const int64_t* tile_pos, T* grad_act, bool relu_mask) {
#pragma omp parallel for schedule(static)
  for (int32_t task = 0; task < tp.tasks; ++task) {
    const PoolTask k = pool_task(tp, task);
    const PoolTile pt = pool_tile(tp, slot, tile_pos, k.t);
    int32_t off[4][4], goff[3][3];
    pool_window_offsets<4>(tp, pt, tp.side, 2 * k.h - 1, 2 * k.w - 1, k.v, off);
    pool_window_offsets<3>(tp, pt, tp.pooled, k.h - 1, k.w - 1, k.v, goff);
    T win[4][4][8], wm[3][3][8], gq[3][3][8], r[2][2][8];
    load_pool_window<T, 4>(act, off, win);
    load_pool_window<T, 3>(grad, goff, gq);
    pool_window_maxima(win, wm);
    const auto routed = [&](int i, int j, int own, int e, T v) {
      return pool_window_argmax(win[i][j][e], win[i][j + 1][e], win[i + 1][j][e], win[i + 1][j + 1][e]) == own
                 ? v
                 : T(0);
    };
    tiled_pool_quad_grads<8, T>(tp, pt, k.h, k.w, routed, [&](int i, int j, int e) { return gq[i][j][e]; }, r);
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        if (relu_mask)
          for (int e = 0; e < 8; ++e) r[a][b][e] = relu_passes(win[a + 1][b + 1][e]) ? r[a][b][e] : T(0);
        const int32_t y = 2 * k.h + a, x = 2 * k.w + b;
        std::copy(r[a][b], r[a][b] + 8, grad_act + ((k.t * tp.side + y) * tp.side + x) * tp.channels + k.v * 8);
      }
  }
}

}  // namespace

void max_blur_pool_cpu(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                       const int64_t* tile_pos, void* out, bool relu) {
  const int64_t rows = g.num_tiles * (g.side / 2) * (g.side / 2);
  TiledPool tp;
  const bool tiled = tiled_pool_enabled() && tiled_pool_plan(g, tp) == nullptr;
  tp.relu = relu;
  SCOTT_CPU_DISPATCH(dtype, "max_blur_pool", {
    const T* a = static_cast<const T*>(act);
    T* o = static_cast<T*>(out);
    if (tiled) {
      tiled_pool_forward<T>(tp, a, slot, tile_pos, o);
      break;
    }
    for_each_element(rows, g.channels, [&](int64_t r, int64_t c) {
      o[r * g.channels + c] = max_blur_pool_at<T, T>(g, a, slot, tile_pos, r, c, relu);
    });
  });
}

void max_blur_pool_backward_cpu(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                const int32_t* slot, const int64_t* tile_pos, void* grad_act, bool relu_mask) {
  const int64_t rows = g.num_tiles * g.side * g.side;
  TiledPool tp;
  const bool tiled = tiled_pool_enabled() && tiled_pool_plan(g, tp) == nullptr;
  SCOTT_CPU_DISPATCH(dtype, "max_blur_pool_backward", {
    const T* gr = static_cast<const T*>(grad);
    const T* a = static_cast<const T*>(act);
    T* d = static_cast<T*>(grad_act);
    if (tiled) {
      tiled_pool_backward<T>(tp, gr, a, slot, tile_pos, d, relu_mask);
      break;
    }
    for_each_element(rows, g.channels, [&](int64_t r, int64_t c) {
      d[r * g.channels + c] = max_blur_pool_grad_at<T, T>(g, gr, a, slot, tile_pos, r, c, relu_mask);
    });
  });
}

}  // namespace scott
