// The image stage's implicit GEMMs on tensor cores (float16 / bfloat16 images, or uint8 with the
// normalisation fused, sm_80+): forward and weight gradient.
#include <cooperative_groups.h>

#include "cuda_common.cuh"

namespace scott {
namespace ig {

// ---- the image stage (few input channels) -------------------------------------------------------
// Blocks are persistent over groups of 128 / (s*s) tiles (128 output pixels) and one 64-wide slice
// of output channels: the padded weight slice is loaded into shared memory once per block; per group
// the tiles' input windows are staged once (masking and uint8 normalisation fused, 4 channels per
// pixel), then A fragments come straight from the staged window by ldmatrix: each lane points at
// the 16-byte tap pair its output pixel reads, so no im2col copy is made.
template <typename T, typename S>
struct ImageArgs {
  ImageConv g;
  const S* img;
  const float* norm;     // (2, C_in) mean, 1/std, when g.normalize
  const T* weight;       // padded (k * KP * 8, C_out) (rows: image_k_to_weight_row)
  const int32_t* nbr;
  const int64_t* tile_pos;
  T* out;                // (M, s, s, C_out)
  int32_t groups;        // ceil(M / tiles per group)
  bool relu;             // out = relu(conv), else conv
};

constexpr int IM_BM = 128, IM_BN = 64;
using ImTile = Tile<IM_BM, IM_BN, false>;
// the epilogue's per-warp buffer: one 16-row slice of the warp's 64 x 32 tile, rows padded so that
// the accumulator pairs' 4-byte writes fall on distinct banks
constexpr int IM_OUT_LD = 32 + PAD;

inline int image_smem_bytes(const ImageConv& g) {
  const int tiles = g.group_tiles();
  return g.k_rows() * (IM_BN + PAD) * 2 + tiles * g.rows * g.width * kImageChannels * 2 +
         tiles * (kNeighbours + 1) * 4 + g.k * g.pairs * 4 + 16 + ImTile::kThreads / 32 * 16 * IM_OUT_LD * 2;
}

// A group's tiles' neighbour slots and window bases into shared memory (tiles = g.group_tiles()).
__device__ __forceinline__ void stage_group_tables(const ImageConv& g, const int32_t* nbr, const int64_t* tile_pos,
                                                   int32_t t_first, int32_t* s_base, int32_t* s_nb) {
  const int32_t tiles = g.group_tiles();
  for (int i = threadIdx.x; i < tiles * (kNeighbours + 1); i += blockDim.x) {
    const int32_t tl = i / (kNeighbours + 1), d = i - tl * (kNeighbours + 1), t = t_first + tl;
    if (d == kNeighbours)
      s_base[tl] = staged_tile_base(g, t < g.num_tiles ? tile_pos[t] : -1);
    else
      s_nb[tl * kNeighbours + d] = t < g.num_tiles ? nbr[t * kNeighbours + d] : -1;
  }
}

// A thread's place in the window staging: blockDim / SW window rows at a time (SW <= 128 <=
// blockDim, implicit_image_plan), one staged column per thread, fixed for the block (threads past
// the last full row idle).
struct StagingLane {
  StagedColumn col;
  int32_t row, step;  // first staged row (>= step: this thread stages nothing), rows per pass
};

__device__ __forceinline__ StagingLane staging_lane(const ImageConv& g) {
  StagingLane s;
  s.step = static_cast<int32_t>(blockDim.x) / g.width;
  s.row = static_cast<int32_t>(threadIdx.x) / g.width;
  s.col = staged_column(g, static_cast<int32_t>(threadIdx.x) - s.row * g.width);
  return s;
}

// A group's windows into shared memory ([tiles][R][SW][4]): a staged pixel costs its row's
// neighbour lookup, three loads and one 8-byte store.
template <typename T, typename S>
__device__ __forceinline__ void stage_group_windows(const ImageConv& g, const S* img, const PixelNorm<float>& pn,
                                                    const StagingLane& sl, const int32_t* s_base, const int32_t* s_nb,
                                                    T* sx) {
  if (sl.row >= sl.step) return;
  const int32_t rows = g.tiles * g.rows;
  T* dst = sx + threadIdx.x * kImageChannels;  // staged pixel (row, column) = thread (r * SW + cx)
  const int32_t dst_step = sl.step * g.width * kImageChannels;
  for (int32_t r = sl.row; r < rows; r += sl.step, dst += dst_step) {
    int32_t tl, cy;
    staged_row(g, r, tl, cy);
    const int32_t off = staged_pixel_offset(g, s_nb + tl * kNeighbours, s_base[tl], cy, sl.col);
    T v[kImageChannels];
#pragma unroll
    for (int c = 0; c < kImageChannels; ++c) v[c] = from_acc<T>(staged_value<S, float>(g, img, pn, off, c));
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(v);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(ImTile::kThreads, 4) scott_conv_image_igemm(ImageArgs<T, S> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BN = IM_BN, NT = ImTile::kThreads;
  // s_pair entries: the staged pixel of a tap pair, and whether the first and the second pair of
  // its K step have a padded tap
  constexpr int32_t kPadLo = 1 << 30, kPadHi = 1 << 29, kPairPixel = kPadHi - 1;
  SCOTT_DYNAMIC_SMEM(smem);
  const ImageConv& g = p.g;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / (BN / 32), wn = warp % (BN / 32);
  const int32_t area = g.s * g.s, tiles = g.group_tiles(), window = g.rows * g.width;
  const int32_t k_rows = g.k_rows();
  T* sb = reinterpret_cast<T*>(smem);                        // [k_rows][BN + PAD]
  T* sx = sb + k_rows * (BN + PAD);                          // [tiles][rows][width][4]
  int32_t* s_base = reinterpret_cast<int32_t*>(sx + tiles * window * kImageChannels);  // [tiles]
  int32_t* s_nb = s_base + tiles;                            // [tiles][9]
  int32_t* s_pair = s_nb + tiles * kNeighbours;              // [k * KP]: staged pixel of each tap pair
  // this warp's [16][IM_OUT_LD], 16-byte aligned; an offset from smem (not a rounded address) keeps
  // the accesses in the shared space (STS / LDS.128, not generic ST / LD)
  const int32_t pair_end = static_cast<int32_t>(reinterpret_cast<unsigned char*>(s_pair + g.k * g.pairs) - smem);
  const int32_t out_at = (pair_end + 15) & ~15;
  T* s_out = reinterpret_cast<T*>(smem + out_at) + warp * 16 * IM_OUT_LD;
  const int32_t n0 = blockIdx.y * BN;

  for (int v = tid; v < k_rows * (BN / 8); v += NT) {
    const int32_t row = v / (BN / 8), col = n0 + (v % (BN / 8)) * 8;
    cp_async16(smem_u32(sb + row * (BN + PAD) + (v % (BN / 8)) * 8), p.weight + (col < g.c_out ? row * g.c_out + col : 0),
               col < g.c_out);
  }
  cp_async_commit();
  // each entry also flags the padded taps (image_pair_padded) of both pairs of its K step
  for (int i = tid; i < g.k * g.pairs; i += NT)
    s_pair[i] = staged_pair_pixel(g, 0, 0, i) | (image_pair_padded(g, i & ~1) ? kPadLo : 0) |
                (image_pair_padded(g, i | 1) ? kPadHi : 0);
  const bool pad_lane = lane % 4 >= 2;  // holds K rows 4..7 of a pair: the second pixel's

  // per lane: the staged pixel its A rows start at (for tap pair 0), for its 4 row fragments
  int32_t a_pix[4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    const int32_t row = wm * 64 + mi * 16 + lane % 16;
    const int32_t tl = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(row)));
    const int32_t rem = row - tl * area;
    const int32_t oy = static_cast<int32_t>(g.side_out.div(static_cast<uint32_t>(rem)));
    a_pix[mi] = tl * window + staged_pair_pixel(g, oy, rem - oy * g.s, 0);
  }
  int b_off[2];
#pragma unroll
  for (int nj = 0; nj < 2; ++nj)
    b_off[nj] = (lane % 8 + ((lane / 8) % 2) * 8) * (BN + PAD) + wn * 32 + nj * 16 + (lane / 16) * 8;
  const uint32_t sx_u32 = smem_u32(sx), sb_u32 = smem_u32(sb);
  const PixelNorm<float> pn = pixel_norm(g, p.norm);  // in registers for the whole block
  const StagingLane sl = staging_lane(g);
  const int32_t rows_total = g.num_tiles * area;

  for (int32_t grp = blockIdx.x; grp < p.groups; grp += gridDim.x) {
    const int32_t t_first = grp * tiles;
    __syncthreads();  // the previous group's fragments are read
    stage_group_tables(g, p.nbr, p.tile_pos, t_first, s_base, s_nb);
    __syncthreads();
    stage_group_windows<T, S>(g, p.img, pn, sl, s_base, s_nb, sx);
    cp_async_wait<0>();
    __syncthreads();

    float acc[4][4][4] = {};
    for (int32_t ks = 0; ks < k_rows / 16; ++ks) {
      const int32_t entry = s_pair[2 * ks + lane / 16];
      const int32_t pair = entry & kPairPixel;  // = staged_pair_pixel(g, 0, 0, 2 ks + lane / 16)
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) ldmatrix_x4(af[mi], sx_u32 + (a_pix[mi] + pair) * kImageChannels * 2);
      // a padded tap (image_pair_padded): its pixel (K rows 4..7 of the pair, in the lanes with
      // lane % 4 >= 2: fragments 0, 1 for pair 2 ks, 2, 3 for pair 2 ks + 1) multiplies as 0
      if (pad_lane && (entry & kPadLo)) {
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) af[mi][0] = af[mi][1] = 0u;
      }
      if (pad_lane && (entry & kPadHi)) {
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) af[mi][2] = af[mi][3] = 0u;
      }
      ldmatrix_b<2>(bf, sb_u32, b_off, ks * 16 * (BN + PAD));
      mma_tiles<T>(acc, af, bf);
    }
    // epilogue: ReLU (with p.relu), then per 16-row slice through the warp's shared buffer so that each row's
    // 32 channels leave as four 16-byte stores (c_out % 8 == 0: a vector is all in or all out)
    const int32_t m0 = t_first * area + wm * 64, nw = n0 + wn * 32;
    using P2 = decltype(Pack2<T>::make(0.f, 0.f));
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          *reinterpret_cast<P2*>(s_out + (h * 8 + lane / 4) * IM_OUT_LD + ni * 8 + (lane % 4) * 2) =
              p.relu ? Pack2<T>::make(relu_of(acc[mi][ni][2 * h]), relu_of(acc[mi][ni][2 * h + 1]))
                     : Pack2<T>::make(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int v = lane + 32 * j, row = v / 4, c8 = (v % 4) * 8;
        const int32_t m = m0 + mi * 16 + row, n = nw + c8;
        const uint4 val = *reinterpret_cast<const uint4*>(s_out + row * IM_OUT_LD + c8);
        if (m < rows_total && n < g.c_out) *reinterpret_cast<uint4*>(p.out + m * g.c_out + n) = val;
      }
      __syncwarp();
    }
  }
#else
  __trap();
#endif
}

// Weight gradient of the image stage: C[padded K row m, co] = sum over output pixels r of
// window(r, m) * g'(r, co). Blocks are persistent over tile groups (128 output pixels) like the
// forward and keep C (k_rows x 64 output channels) in registers across groups, one warp per 32
// K rows x 32 output channels; per group the windows are staged as in the forward and g' arrives
// by cp.async. A fragments are read transposed (ldmatrix.trans) from the staged windows: the rows
// it gathers are the 16-byte tap pairs of 8 output pixels. One block per SM (k_rows / 16 warps:
// 14 for k = 7), each writing one partial, or on sm_90 one per cluster of two blocks (see the
// end of the kernel): the partials are the only bytes this kernel adds to the image and g' it
// must read, so there are as few as fill the GPU.
template <typename T, typename S>
struct ImageWgradArgs {
  ImageConv g;
  const S* img;
  const float* norm;
  const T* gmask;        // g' (M, s, s, C_out)
  const int32_t* nbr;
  const int64_t* tile_pos;
  float* partial;        // (gridDim.x / cluster, k*k*C_in, C_out)
  int32_t groups;
  int32_t cluster;       // 1, or 2: the launch's cluster of two blocks writes one partial
};

constexpr int IW_BN = 64, IW_WN = 32, IW_MAX_WARPS = 16;

inline int image_wgrad_threads(const ImageConv& g) { return g.k_rows() / 32 * (IW_BN / IW_WN) * 32; }

// (the staging buffers; a clustered launch reuses them for its accumulators, 2 * WN / 8 float4s a thread)
inline int image_wgrad_smem_bytes(const ImageConv& g, bool cluster) {
  const int tiles = g.group_tiles();
  const int staging = IM_BM * (IW_BN + PAD) * 2 + tiles * g.rows * g.width * kImageChannels * 2 +
                      tiles * (kNeighbours + 1) * 4 + IM_BM * 4;
  const int exchange = cluster ? 2 * IW_WN / 8 * 16 * image_wgrad_threads(g) : 0;
  return staging > exchange ? staging : exchange;
}

// Whether the image weight gradient runs as clusters of two blocks (one partial per cluster): a
// device that launches clusters, running code compiled for sm_90 or later (code from sm_80,
// native or JIT-compiled from its PTX on a newer GPU, has no cluster path and traps).
template <class Kernel>
bool image_wgrad_cluster(Kernel kernel) {
  int device = 0, major = 0, clusters = 0;
  cudaFuncAttributes attr;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9 ||
      cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device) != cudaSuccess || !clusters ||
      cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.ptxVersion < 90 || attr.binaryVersion < 90) {
    cudaGetLastError();  // a failed query is an answer (no clusters), not a pending error
    return false;
  }
  return true;
}

template <typename T, typename S>
__global__ void __launch_bounds__(IW_MAX_WARPS * 32) scott_conv_image_wgrad_igemm(ImageWgradArgs<T, S> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BN = IW_BN, WN = IW_WN;
  SCOTT_DYNAMIC_SMEM(smem);
  const ImageConv& g = p.g;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nt = blockDim.x;
  const int wk = warp / (BN / WN), wn = warp % (BN / WN);  // 32 K rows x 32 channels per warp
  const int32_t area = g.s * g.s, tiles = g.group_tiles(), window = g.rows * g.width;
  T* sg = reinterpret_cast<T*>(smem);                           // g' [128 pixels][BN + PAD]
  T* sx = sg + IM_BM * (BN + PAD);                              // staged windows
  int32_t* s_base = reinterpret_cast<int32_t*>(sx + tiles * window * kImageChannels);
  int32_t* s_nb = s_base + tiles;
  int32_t* s_pix = s_nb + tiles * kNeighbours;                  // [128]: staged pixel of output pixel r
  const int32_t n0 = blockIdx.y * BN;
  for (int r = tid; r < IM_BM; r += nt) {
    const int32_t tl = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(r))), rem = r - tl * area;
    const int32_t oy = static_cast<int32_t>(g.side_out.div(static_cast<uint32_t>(rem)));
    s_pix[r] = tl * window + staged_pair_pixel(g, oy, rem - oy * g.s, 0);
  }
  // per lane: the staged offset (pixels) of the tap pair its A rows read, per 16-row fragment
  const int mat = lane / 8;
  int32_t a_pair[2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) a_pair[mi] = staged_pair_pixel(g, 0, 0, (wk * 32 + mi * 16) / 8 + mat % 2);
  const int a_pix_row = lane % 8 + (mat / 2) * 8;  // pixel within a 16-pixel K step
  int b_off[WN / 16];
#pragma unroll
  for (int nj = 0; nj < WN / 16; ++nj)
    b_off[nj] = (lane % 8 + (mat % 2) * 8) * (BN + PAD) + wn * WN + nj * 16 + (mat / 2) * 8;
  const uint32_t sx_u32 = smem_u32(sx), sg_u32 = smem_u32(sg);
  const PixelNorm<float> pn = pixel_norm(g, p.norm);
  const StagingLane sl = staging_lane(g);
  const int32_t rows_total = g.num_tiles * area;

  float acc[2][WN / 8][4] = {};
  for (int32_t grp = blockIdx.x; grp < p.groups; grp += gridDim.x) {
    const int32_t t_first = grp * tiles, m0 = t_first * area;
    __syncthreads();  // the previous group's fragments are read
    for (int v = tid; v < IM_BM * (BN / 8); v += nt) {
      const int32_t r = v / (BN / 8), col8 = n0 + (v % (BN / 8)) * 8;
      const bool ok = m0 + r < rows_total && col8 < g.c_out;
      cp_async16(sg_u32 + 2 * (r * (BN + PAD) + (v % (BN / 8)) * 8), p.gmask + (ok ? (m0 + r) * g.c_out + col8 : 0), ok);
    }
    cp_async_commit();
    stage_group_tables(g, p.nbr, p.tile_pos, t_first, s_base, s_nb);
    __syncthreads();
    stage_group_windows<T, S>(g, p.img, pn, sl, s_base, s_nb, sx);
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll 2
    for (int ks = 0; ks < IM_BM / 16; ++ks) {
      const int32_t pix = s_pix[ks * 16 + a_pix_row];
      uint32_t af[2][4], bf[WN / 8][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) ldmatrix_x4_trans(af[mi], sx_u32 + (pix + a_pair[mi]) * kImageChannels * 2);
      ldmatrix_b<WN / 16>(bf, sg_u32, b_off, ks * 16 * (BN + PAD));
      mma_tiles<T>(acc, af, bf);
    }
  }
  // A cluster of two blocks (sm_90, image_wgrad_cluster) sums its two accumulators through
  // distributed shared memory and writes one partial: rank r adds its peer's half mi = r to its
  // own and stores that half. The same thread of both blocks holds the same (row, column) entries.
  const int32_t ranks = p.cluster;
  int32_t rank = 0;
  if (ranks == 2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    rank = static_cast<int32_t>(cluster.block_rank());
    float4* buf = reinterpret_cast<float4*>(smem);  // [2 * WN / 8][threads]; the staging buffers are done
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < WN / 8; ++ni)
        buf[(mi * (WN / 8) + ni) * nt + tid] = make_float4(acc[mi][ni][0], acc[mi][ni][1], acc[mi][ni][2], acc[mi][ni][3]);
    cluster.sync();  // both blocks' accumulators are in shared memory
    const float4* peer = cluster.map_shared_rank(buf, rank ^ 1);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
      if (mi == rank) {
#pragma unroll
        for (int ni = 0; ni < WN / 8; ++ni) {
          const float4 v = peer[(mi * (WN / 8) + ni) * nt + tid];
          acc[mi][ni][0] += v.x;
          acc[mi][ni][1] += v.y;
          acc[mi][ni][2] += v.z;
          acc[mi][ni][3] += v.w;
        }
      }
    cluster.sync();  // the peer has read this block's shared memory before either exits
#else
    __trap();  // launched as clusters only where this code is sm_90's (image_wgrad_cluster)
#endif
  }
  const int32_t k_total = g.k * g.k * g.c_in;
  float* part = p.partial + static_cast<int32_t>(blockIdx.x) / ranks * k_total * g.c_out;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
    if (ranks == 2 && mi != rank) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int32_t row = image_k_to_weight_row(g, wk * 32 + mi * 16 + h * 8 + lane / 4);
#pragma unroll
      for (int ni = 0; ni < WN / 8; ++ni) {
        const int32_t n = n0 + wn * WN + ni * 8 + (lane % 4) * 2;
        if (row >= 0 && n < g.c_out)
          *reinterpret_cast<float2*>(part + row * g.c_out + n) = make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
    }
  }
#else
  __trap();
#endif
}

// ---- launches ----
namespace {

template <typename T, typename S>
void image_on(const ImageConv& ic, const void* src, const void* weight_pad, const void* norm, const int64_t* tile_pos,
              void* out, bool relu, int32_t* nbr, cudaStream_t stream) {
  const int tiles = ic.group_tiles();
  const int32_t groups = (ic.num_tiles + tiles - 1) / tiles;
  ImageArgs<T, S> args{ic, static_cast<const S*>(src), static_cast<const float*>(norm),
                       static_cast<const T*>(weight_pad), nbr, tile_pos, static_cast<T*>(out), groups, relu};
  // about the blocks that fit at once: the weight slice loads once per block
  const int persistent = 4 * multiprocessors();
  const dim3 grid(static_cast<unsigned>(groups < persistent ? groups : persistent),
                  static_cast<unsigned>((ic.c_out + IM_BN - 1) / IM_BN));
  const int bytes = image_smem_bytes(ic);
  allow_smem(scott_conv_image_igemm<T, S>, bytes);
  SCOTT_LAUNCH(grid, ImTile::kThreads, bytes, stream, scott_conv_image_igemm<T, S>)(args);
  check_launch("scott_conv_image_igemm");
}

template <typename T, typename S>
void image_wgrad_on(const ImageConv& ic, const void* src, const void* gm, const void* norm, const int64_t* tile_pos,
                    void* partial, int64_t splits, int32_t* nbr, cudaStream_t stream) {
  const int tiles = ic.group_tiles();
  const int32_t groups = (ic.num_tiles + tiles - 1) / tiles;
  ImageWgradArgs<T, S> args{ic, static_cast<const S*>(src), static_cast<const float*>(norm), static_cast<const T*>(gm),
                            nbr, tile_pos, static_cast<float*>(partial), groups, 1};
  // one partial per block, or per cluster of two blocks (sm_90): `splits` partials either way
  auto kernel = scott_conv_image_wgrad_igemm<T, S>;
  const bool cluster = splits <= 32767 && image_wgrad_cluster(kernel);
  args.cluster = cluster ? 2 : 1;
  const int bytes = image_wgrad_smem_bytes(ic, cluster);
  allow_smem(kernel, bytes);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(splits * (cluster ? 2 : 1)),
                     static_cast<unsigned>((ic.c_out + IW_BN - 1) / IW_BN));
  cfg.blockDim = dim3(static_cast<unsigned>(image_wgrad_threads(ic)));
  cfg.dynamicSmemBytes = static_cast<size_t>(bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster ? 2 : 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args);
  cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("scott_conv_image_wgrad_igemm: CUDA launch failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace

bool launch_image(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_pad,
                  const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu, int32_t* nbr,
                  cudaStream_t stream) {
  ImageConv ic;
  if (!g.src_image || !cuda_implicit_conv(g, dtype, 1, ConvOp::kForward)) return false;
  // the caller passes the padded weight exactly when this path applies (conv_gemm_path), so there
  // is no falling back from here
  if (nbr == nullptr || !aligned16(weight_pad) || !aligned16(out) || (g.normalize && norm == nullptr))
    throw std::invalid_argument("conv_relu: the image stage's implicit GEMM needs a neighbour scratch table and "
                                "16-byte aligned padded weight and output");
  implicit_image_plan(g, ic);
  launch_neighbours(g, slot, tile_pos, nbr, stream);
  const bool u8 = src_dtype == kUInt8;
  if (dtype == DType::kFloat16)
    (u8 ? image_on<__half, uint8_t> : image_on<__half, __half>)(ic, src, weight_pad, norm, tile_pos, out, relu, nbr,
                                                               stream);
  else
    (u8 ? image_on<__nv_bfloat16, uint8_t> : image_on<__nv_bfloat16, __nv_bfloat16>)(
        ic, src, weight_pad, norm, tile_pos, out, relu, nbr, stream);
  return true;
}

bool launch_image_wgrad(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                        const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                        void* partial, int64_t splits, int32_t* nbr, void* gmask, cudaStream_t stream) {
  ImageConv ic;
  if (!g.src_image || !cuda_implicit_conv(g, dtype, splits, ConvOp::kWeightGrad)) return false;
  implicit_image_wgrad_plan(g, splits, ic);
  // `splits` partials: the caller sizes them (conv_gemm_path says this path applies)
  if (nbr == nullptr || (out != nullptr && gmask == nullptr) || splits < 1 || splits > 65535 ||
      (g.normalize && norm == nullptr) || !aligned16(grad) || !aligned16(out) || !aligned16(gmask) ||
      !aligned16(partial))
    throw std::invalid_argument("conv_relu_wgrad: the image stage's implicit GEMM needs scratch tables, at least "
                                "one split and 16-byte aligned buffers");
  launch_neighbours(g, slot, tile_pos, nbr, stream);
  const void* gm = masked_grad(g, dtype, grad, out, gmask, stream);
  const bool u8 = src_dtype == kUInt8;
  if (dtype == DType::kFloat16)
    (u8 ? image_wgrad_on<__half, uint8_t> : image_wgrad_on<__half, __half>)(ic, src, gm, norm, tile_pos, partial,
                                                                           splits, nbr, stream);
  else
    (u8 ? image_wgrad_on<__nv_bfloat16, uint8_t> : image_wgrad_on<__nv_bfloat16, __nv_bfloat16>)(
        ic, src, gm, norm, tile_pos, partial, splits, nbr, stream);
  return true;
}
}  // namespace ig

bool cuda_image_wgrad_clusters(DType dtype, int src_dtype) {
  // the launch's own test (ig::launch_image_wgrad) on the kernel it would launch
  const bool u8 = src_dtype == kUInt8;
  if (dtype == DType::kFloat16)
    return u8 ? ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__half, uint8_t>)
              : ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__half, __half>);
  if (dtype == DType::kBFloat16)
    return u8 ? ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__nv_bfloat16, uint8_t>)
              : ig::image_wgrad_cluster(ig::scott_conv_image_wgrad_igemm<__nv_bfloat16, __nv_bfloat16>);
  return false;
}

}  // namespace scott
