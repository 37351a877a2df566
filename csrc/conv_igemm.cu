// Implicit conv GEMMs of compact stages on tensor cores (float16 / bfloat16, sm_80+): forward,
// weight gradient and input gradient. Operands arrive as 16-byte vectors (cp.async) addressed
// through a per-tile 3x3 neighbour table with per-row set-up once per block; fragments by
// ldmatrix, math on mma.sync m16n8k16 with float32 accumulation; 32-bit offsets (the host checks
// that they fit).
// Also the layout kernels every compact stage starts from: the visible tables of the keep mask (one
// block per image row) and the per-tile neighbour table.
//
// Hand-written rather than built on CUTLASS/CuTe: the operand gather (neighbour table, parity-class
// taps) is the whole difficulty and CuTe would need it written as custom gather layouts anyway; the
// GEMM core below is one ~100-line mainloop (cp.async 16-byte loads into a 4-stage shared-memory
// ring, ldmatrix fragments, mma.sync m16n8k16 with float32 accumulation), it needs no new build
// dependency and compiles in seconds on small CI machines. The same kernels serve sm_80 and sm_90a
// (mma.sync runs on Hopper; wgmma would be the next step there).
#include "cuda_common.cuh"

namespace scott {
namespace ig {

// The pipelined K loop: `load(a_stage, b_stage)` issues the cp.async copies of the next K step
// (called in K order); acc[mi][ni] is the warp's (16 x 8) mma tile (mi, ni) of its 64 x 32 tile.
template <typename T, int BM, int BN, bool A_KMAJOR, class Load>
__device__ __forceinline__ void mainloop(float (&acc)[4][4][4], T* sa, T* sb, int kiters, Load&& load) {
  using TL = Tile<BM, BN, A_KMAJOR>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = warp / (BN / 32), wn = warp % (BN / 32);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < kiters) load(sa + s * TL::kAStage, sb + s * TL::kBStage);
    cp_async_commit();
  }
  // per-lane ldmatrix offsets (elements) within a stage, for k sub-step 0
  const int mat = lane / 8, mrow = lane % 8;
  int a_off[4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
    a_off[mi] = A_KMAJOR ? (mrow + (mat / 2) * 8) * (BM + PAD) + wm * 64 + mi * 16 + (mat % 2) * 8
                         : (wm * 64 + mi * 16 + lane % 16) * (BK + PAD) + (lane / 16) * 8;
  int b_off[2];
#pragma unroll
  for (int nj = 0; nj < 2; ++nj) b_off[nj] = (mrow + (mat % 2) * 8) * (BN + PAD) + wn * 32 + nj * 16 + (mat / 2) * 8;

  for (int kit = 0; kit < kiters; ++kit) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // step kit has landed; every warp is done with the stage refilled below
    const int next = kit + STAGES - 1;
    if (next < kiters) load(sa + (next % STAGES) * TL::kAStage, sb + (next % STAGES) * TL::kBStage);
    cp_async_commit();
    const uint32_t a_base = smem_u32(sa + (kit % STAGES) * TL::kAStage);
    const uint32_t b_base = smem_u32(sb + (kit % STAGES) * TL::kBStage);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        if constexpr (A_KMAJOR)
          ldmatrix_x4_trans(af[mi], a_base + 2 * (a_off[mi] + kk * (BM + PAD)));
        else
          ldmatrix_x4(af[mi], a_base + 2 * (a_off[mi] + kk));
      }
      ldmatrix_b<2>(bf, b_base, b_off, kk * (BN + PAD));
      mma_tiles<T>(acc, af, bf);
    }
  }
  cp_async_wait<0>();
}

// The accumulators as (row, column, value pair) of the block tile: f(m, n, v[n], v[n + 1]).
template <int BN, class F>
__device__ __forceinline__ void for_each_pair(const float (&acc)[4][4][4], F&& f) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = warp / (BN / 32), wn = warp % (BN / 32);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        f(wm * 64 + mi * 16 + h * 8 + lane / 4, wn * 32 + ni * 8 + (lane % 4) * 2, acc[mi][ni][2 * h],
          acc[mi][ni][2 * h + 1]);
}

// A block's tiles' neighbour slots, copied once into shared memory; returns the first tile.
__device__ __forceinline__ int32_t stage_neighbours(const ImplicitConv& g, const int32_t* nbr, int32_t m0,
                                                    int32_t m_last, int32_t* snb) {
  const int32_t t0 = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(m0)));
  const int32_t t1 = static_cast<int32_t>(g.area_out.div(static_cast<uint32_t>(m_last)));
  for (int i = threadIdx.x; i < (t1 - t0 + 1) * kNeighbours; i += blockDim.x) snb[i] = nbr[t0 * kNeighbours + i];
  return t0;
}

// ---- the blocks' set-up, shared by the three kernels ----
// Shared memory: the STAGES-deep A and B rings, then (forward, input gradient) the block's tiles'
// neighbour slots.
template <typename T, class TL>
struct Rings {
  T* a;
  T* b;
  int32_t* nb;
};

template <typename T, class TL>
__device__ __forceinline__ Rings<T, TL> carve_rings() {
  SCOTT_DYNAMIC_SMEM(smem);
  T* a = reinterpret_cast<T*>(smem);
  T* b = a + STAGES * TL::kAStage;
  return {a, b, reinterpret_cast<int32_t*>(b + STAGES * TL::kBStage)};
}

// Two adjacent 16-byte vectors from element offset off of src (off -1: zeros), the second only
// where second_in.
template <typename T>
__device__ __forceinline__ void cp_async_pair(uint32_t dst, const T* src, int32_t off, bool second_in) {
  cp_async16(dst, src + (off < 0 ? 0 : off), off >= 0);
  cp_async16(dst + 16, src + (off < 0 ? 0 : off + 8), off >= 0 && second_in);
}

// B of a K step: thread -> K rows tid / (BN / 8) (+ NT / (BN / 8) per pass), the 16-byte vector of
// columns col .. col + 7 (all in or all out: the column count is a multiple of 8).
template <int NT, int BN>
struct BRows {
  static constexpr int kRows = NT / (BN / 8), kPasses = BK / kRows;
  int32_t col;
  bool in;
  __device__ __forceinline__ BRows(int32_t n0, int32_t columns) {
    col = n0 + static_cast<int32_t>(threadIdx.x % (BN / 8)) * 8;
    in = col < columns;
  }
  // has(kr): whether the step has K row kr; at(kr): that row's element offset in src (zeros elsewhere)
  template <typename T, class Has, class At>
  __device__ __forceinline__ void load(T* b, const T* src, Has&& has, At&& at) const {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int kr = threadIdx.x / (BN / 8) + i * kRows;
      const bool ok = in && has(kr);
      cp_async16(smem_u32(b + kr * (BN + PAD) + (threadIdx.x % (BN / 8)) * 8), src + (ok ? at(kr) + col : 0), ok);
    }
  }
};

// Gathered A of the forward and the input gradient: thread -> rows tid / A_TPR (+ NT / A_TPR per
// pass), two 16-byte channel vectors vec + {0, 8}, so that one neighbour lookup per row and K step
// serves both. The block's tiles' neighbour slots go to shared memory and each row's coordinates
// (row_of(r): ImplicitRow or DgradRow) are set up here, once per block.
template <int NT, int BM>
struct ARows {
  static constexpr int kRows = NT / A_TPR, kPasses = BM / kRows;
  int32_t nb[kPasses], y0[kPasses], x0[kPasses];  // nb: the row's slots in snb, -1 past the last row
  int vec;
  template <class RowOf>
  __device__ __forceinline__ ARows(const ImplicitConv& g, const int32_t* nbr, int32_t m0, int32_t rows, int32_t* snb,
                                   RowOf&& row_of) {
    const int32_t t0 = stage_neighbours(g, nbr, m0, min(m0 + BM, rows) - 1, snb);
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int32_t r = m0 + static_cast<int32_t>(threadIdx.x) / A_TPR + i * kRows;
      const auto row = row_of(r < rows ? r : 0);
      nb[i] = r < rows ? (row.tile - t0) * kNeighbours : -1;
      y0[i] = row.y0;
      x0[i] = row.x0;
    }
    vec = (threadIdx.x % A_TPR) * 8 * A_VPT;
    __syncthreads();  // the neighbour slots are staged
  }
  // offset(slots, y0, x0, c): element offset in src of channel c of what the row reads this step, or -1
  template <typename T, class Offset>
  __device__ __forceinline__ void load(T* a, const T* src, const int32_t* snb, int32_t c0, int32_t channels,
                                       Offset&& offset) const {
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int32_t c = c0 + vec;
      const int32_t off = (nb[i] >= 0 && c < channels) ? offset(snb + nb[i], y0[i], x0[i], c) : -1;
      cp_async_pair(smem_u32(a + (threadIdx.x / A_TPR + i * kRows) * (BK + PAD) + vec), src, off, c + 8 < channels);
    }
  }
};

// The set-up of a forward or input-gradient block (BM gathered rows x BN columns): its rings, rows
// m0 .., columns n0 .., the gathered A rows (row_of: ImplicitRow or DgradRow of a GEMM row) and
// the dense B rows. With the tile shapes, its shared memory size (the rings and the neighbour
// slots of up to BM + 1 tiles).
template <typename T, int BM, int BN>
struct GatherBlock {
  using TL = Tile<BM, BN, false>;
  static constexpr int kBM = BM, kBN = BN;
  static constexpr int kSmem = TL::kABytes + (BM + 1) * kNeighbours * 4;
  Rings<T, TL> sm;
  int32_t m0, n0;
  ARows<TL::kThreads, BM> a_rows;
  BRows<TL::kThreads, BN> b_rows;
  template <class RowOf>
  __device__ __forceinline__ GatherBlock(const ImplicitConv& g, const int32_t* nbr, int32_t rows, int32_t columns,
                                         RowOf&& row_of)
      : sm(carve_rings<T, TL>()),
        m0(static_cast<int32_t>(blockIdx.x) * BM),
        n0(static_cast<int32_t>(blockIdx.y) * BN),
        a_rows(g, nbr, m0, rows, sm.nb, row_of),
        b_rows(n0, columns) {}
  // the K loop over the block's rings
  template <class Load>
  __device__ __forceinline__ void run(float (&acc)[4][4][4], int kiters, Load&& load) const {
    mainloop<T, BM, BN, false>(acc, sm.a, sm.b, kiters, load);
  }
  // f(m, n, v0, v1) for the accumulator pairs, at GEMM row m and columns n, n + 1
  template <class F>
  __device__ __forceinline__ void for_each(const float (&acc)[4][4][4], F&& f) const {
    for_each_pair<BN>(acc, [&](int mm, int nn, float v0, float v1) { f(m0 + mm, n0 + nn, v0, v1); });
  }
};

// the forward's blocks: 128 output pixels x 128 output channels; the input gradient's: 128 input
// pixels x 64 input channels
template <typename T>
using FwdBlock = GatherBlock<T, 128, 128>;
template <typename T>
using DgradBlock = GatherBlock<T, 128, 64>;

template <typename T>
struct FwdArgs {
  ImplicitConv g;
  const T* src;      // (M, q, q, C_in)
  const T* weight;   // (k*k*C_in, C_out)
  const int32_t* nbr;
  T* out;            // (M, s, s, C_out)
  int32_t rows;      // M * s * s
  bool relu;         // out = relu(conv), else conv
};

// Forward: out[r, co] = relu(sum over (tap, ci) window(r, tap, ci) * w[tap, ci, co]), the ReLU when
// p.relu. Block: 128 output pixels x 128 output channels; K steps (ky, kx, 32 input channels).
template <typename T>
__global__ void __launch_bounds__(FwdBlock<T>::TL::kThreads, 2) scott_conv_fwd_igemm(FwdArgs<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const ImplicitConv& g = p.g;
  const FwdBlock<T> blk(g, p.nbr, p.rows, g.c_out, [&](int32_t r) { return conv_row(g, r); });

  int32_t ky = 0, kx = 0, c0 = 0;  // the next K step to load: tap (ky, kx), input channels c0 ..
  const int kiters = g.k * g.k * ((g.c_in + BK - 1) / BK);
  auto load = [&](T* a, T* b) {
    blk.a_rows.load(a, p.src, blk.sm.nb, c0, g.c_in, [&](const int32_t* nb, int32_t y0, int32_t x0, int32_t c) {
      return conv_src_offset(g, nb, y0, x0, ky, kx, c);
    });
    blk.b_rows.load(b, p.weight, [&](int kr) { return c0 + kr < g.c_in; },
                    [&](int kr) { return conv_weight_row(g, ky, kx, c0 + kr) * g.c_out; });
    c0 += BK;
    if (c0 >= g.c_in) {
      c0 = 0;
      if (++kx == g.k) { kx = 0; ++ky; }
    }
  };
  float acc[4][4][4] = {};
  blk.run(acc, kiters, load);
  blk.for_each(acc, [&](int32_t m, int32_t n, float v0, float v1) {
    if (m < p.rows && n < g.c_out)
      *reinterpret_cast<decltype(Pack2<T>::make(0.f, 0.f))*>(p.out + m * g.c_out + n) =
          p.relu ? Pack2<T>::make(relu_of(v0), relu_of(v1)) : Pack2<T>::make(v0, v1);
  });
#else
  __trap();
#endif
}

template <typename T>
struct DgradArgs {
  ImplicitConv g;
  const T* gmask;    // g' (M, s, s, C_out)
  const T* weight;   // (k*k*C_out, C_in)
  const int32_t* nbr;
  T* dsrc;           // (M, q, q, C_in)
  int32_t rows;      // rows per parity class: M * s * s
};

// Input gradient, one parity class of input pixels per blockIdx.z (the class with most taps first):
// dsrc[p, ci] = sum over (class tap, co) g'(output pixel reading p, co) * w[tap, co, ci]. Block: 128
// input pixels x 64 input channels; K steps (j, i, 32 output channels).
template <typename T>
__global__ void __launch_bounds__(DgradBlock<T>::TL::kThreads, 4) scott_conv_dgrad_igemm(DgradArgs<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const ImplicitConv& g = p.g;
  // (1,1) first: most taps at odd pad
  const ParityClass pc = parity_class_k(g.k, g.pad, 3 - static_cast<int>(blockIdx.z));
  const DgradBlock<T> blk(g, p.nbr, p.rows, g.c_in, [&](int32_t r) { return dgrad_row(g, pc, r); });

  const int32_t n_kx = static_cast<int32_t>(pc.n_kx);
  int32_t j = 0, i_tap = 0, c0 = 0;  // the next K step to load: class tap (j, i_tap), output channels c0 ..
  const int kiters = static_cast<int>(pc.n_ky * pc.n_kx) * ((g.c_out + BK - 1) / BK);
  auto load = [&](T* a, T* b) {
    blk.a_rows.load(a, p.gmask, blk.sm.nb, c0, g.c_out, [&](const int32_t* nb, int32_t y0, int32_t x0, int32_t c) {
      return dgrad_grad_offset(g, nb, y0, x0, j, i_tap, c);
    });
    blk.b_rows.load(b, p.weight, [&](int kr) { return c0 + kr < g.c_out; },
                    [&](int kr) { return dgrad_weight_row(g, pc, j, i_tap, c0 + kr) * g.c_in; });
    c0 += BK;
    if (c0 >= g.c_out) {
      c0 = 0;
      if (++i_tap == n_kx) { i_tap = 0; ++j; }
    }
  };
  float acc[4][4][4] = {};
  blk.run(acc, kiters, load);
  blk.for_each(acc, [&](int32_t m, int32_t n, float v0, float v1) {
    if (m < p.rows && n < g.c_in)
      *reinterpret_cast<decltype(Pack2<T>::make(0.f, 0.f))*>(p.dsrc + dgrad_row(g, pc, m).dst * g.c_in + n) =
          Pack2<T>::make(v0, v1);
  });
#else
  __trap();
#endif
}

template <typename T>
struct WgradArgs {
  ImplicitConv g;
  const T* src;      // (M, q, q, C_in)
  const T* gmask;    // g' (M, s, s, C_out)
  const int32_t* nbr;
  float* partial;    // (splits, k*k*C_in, C_out)
  int32_t rows;      // M * s * s
  int32_t chunk;     // output pixels per split, a multiple of BK
};

constexpr int WG_BM = 64, WG_BN = 128;
using WgTile = Tile<WG_BM, WG_BN, true>;
constexpr int WG_SMEM = WgTile::kABytes;

// Weight gradient: dw[(tap, ci), co] = sum over output pixels r of window(r, tap, ci) * g'(r, co).
// Block: one tap x 64 input channels (blockIdx.x) x 128 output channels (blockIdx.y), reducing over
// its split's output pixels (blockIdx.z) in K steps of 32 pixels; A lands [pixel][channel].
template <typename T>
__global__ void __launch_bounds__(WgTile::kThreads, 4) scott_conv_wgrad_igemm(WgradArgs<T> p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = WG_BM, BN = WG_BN, NT = WgTile::kThreads;
  const Rings<T, WgTile> sm = carve_rings<T, WgTile>();
  const ImplicitConv& g = p.g;
  const int tid = threadIdx.x;
  const int32_t ci_blocks = (g.c_in + BM - 1) / BM;
  const int32_t tap = blockIdx.x / ci_blocks, ci0 = (blockIdx.x - tap * ci_blocks) * BM;
  const int32_t ky = tap / g.k, kx = tap - ky * g.k;
  const int32_t n0 = blockIdx.y * BN;
  const int32_t r_begin = blockIdx.z * p.chunk;
  const int32_t r_end = min(r_begin + p.chunk, p.rows);
  // (an empty split runs no K step and stores zeros: every partial is written)

  // A: thread -> pixel row tid / 4 of the K step, two 16-byte channel vectors (tid % 4) * 16 + {0, 8}.
  // The pixel's neighbour slot is fetched one K step ahead (a global load whose latency the
  // pipeline hides); the (ky, kx) tap is fixed for the block.
  constexpr int A_TPR_W = BM / 8 / A_VPT;
  static_assert(NT / A_TPR_W == BK, "one A row per thread group and K step");
  const int a_row = tid / A_TPR_W;
  const int32_t a_ci = ci0 + (tid % A_TPR_W) * 8 * A_VPT;
  const bool a_ok = a_ci < g.c_in;
  const BRows<NT, BN> b_rows(n0, g.c_out);

  int32_t r0 = r_begin;
  int32_t a_t = -1, a_y = 0, a_x = 0;  // the next step's neighbour slot and local pixel
  auto prepare = [&](int32_t r) {
    a_t = -1;
    if (a_ok && r < r_end) {
      const ImplicitRow row = conv_row(g, r);
      const int32_t d = conv_tap_neighbour(g, row.y0, row.x0, ky, kx, a_y, a_x);
      a_t = __ldg(p.nbr + row.tile * kNeighbours + d);
    }
  };
  prepare(r0 + a_row);
  const int kiters = (r_end - r_begin + BK - 1) / BK;
  auto load = [&](T* a, T* b) {
    cp_async_pair(smem_u32(a + a_row * (BM + PAD) + (tid % A_TPR_W) * 8 * A_VPT), p.src,
                  compact_src_offset(g, a_t, a_y, a_x, a_ci), a_ci + 8 < g.c_in);
    b_rows.load(b, p.gmask, [&](int lr) { return r0 + lr < r_end; }, [&](int lr) { return (r0 + lr) * g.c_out; });
    r0 += BK;
    prepare(r0 + a_row);
  };
  float acc[4][4][4] = {};
  mainloop<T, BM, BN, true>(acc, sm.a, sm.b, kiters, load);
  const int32_t k_total = g.k * g.k * g.c_in;
  float* part = p.partial + static_cast<int32_t>(blockIdx.z) * k_total * g.c_out;
  for_each_pair<BN>(acc, [&](int mm, int nn, float v0, float v1) {
    const int32_t ci = ci0 + mm, n = n0 + nn;
    if (ci < g.c_in && n < g.c_out)
      *reinterpret_cast<float2*>(part + conv_weight_row(g, ky, kx, ci) * g.c_out + n) = make_float2(v0, v1);
  });
#else
  __trap();
#endif
}

__global__ void scott_neighbour_table(const int32_t* slot, const int64_t* tile_pos, int64_t batch, int64_t grid_h,
                                      int64_t grid_w, int32_t num_tiles, int32_t* nbr) {
  const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tiles) tile_neighbours(slot, tile_pos, t, batch, grid_h, grid_w, num_tiles, nbr + t * kNeighbours);
}

// The compact layout's visible tables (row_neighbour in stage_common.h describes them), one block
// per image row: the row's keep mask in chunks of one patch per thread, numbered by a block-wide
// inclusive scan in shared memory (double-buffered, one barrier per step); then the missing tiles of
// a row with too few visible patches, and with radius >= 0 the neighbour table of the row's tiles,
// read back from the slot/tile_pos entries the block has just written. A row whose count is not
// num_visible fails a device-side assertion at the end (SCOTT_DEVICE_ASSERT), once every table has
// been written in range.
constexpr int kTableThreads = 256;

__global__ void __launch_bounds__(kTableThreads) scott_visible_tables(const uint8_t* keep, int64_t positions,
                                                                      int64_t num_visible, int64_t grid_w,
                                                                      int32_t radius, int32_t* slot,
                                                                      int64_t* tile_pos, int32_t* nbr) {
  __shared__ int32_t scan[2][kTableThreads];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t row = b * positions, first_tile = b * num_visible;
  int64_t seen = 0;  // visible patches of the row before the current chunk (the same in every thread)
#pragma unroll 1
  for (int64_t start = 0; start < positions; start += kTableThreads) {
    const int64_t n = start + tid;
    const bool ok = n < positions;
    const int32_t kept = ok && keep[row + n] != 0;
    scan[0][tid] = kept;
    __syncthreads();
    int src = 0;
#pragma unroll
    for (int off = 1; off < kTableThreads; off *= 2) {
      int32_t v = scan[src][tid];
      if (tid >= off) v += scan[src][tid - off];
      scan[src ^ 1][tid] = v;
      src ^= 1;
      __syncthreads();
    }
    const int64_t index = seen + scan[src][tid] - 1;
    const bool visible = kept && index < num_visible;
    if (ok) slot[row + n] = visible ? static_cast<int32_t>(first_tile + index) : -1;
    if (visible) tile_pos[first_tile + index] = row + n;
    seen += scan[src][kTableThreads - 1];
    __syncthreads();  // every thread has read the scan before the next chunk overwrites it
  }
  // (loops kept rolled: neither runs at all in the usual call, a full row and no neighbour table)
#pragma unroll 1
  for (int64_t j = seen + tid; j < num_visible; j += kTableThreads) tile_pos[first_tile + j] = row;
  if (radius >= 0) {
    __syncthreads();  // the row's slot and tile_pos entries, written by other threads, are read below
    const int64_t nb2 = (2 * radius + 1) * (2 * radius + 1);
#pragma unroll 1
    for (int64_t e = tid; e < num_visible * nb2; e += kTableThreads)
      nbr[first_tile * nb2 + e] = row_neighbour(slot, tile_pos, b, positions, num_visible, grid_w, radius, e);
  }
  if (tid == 0)
    SCOTT_DEVICE_ASSERT(seen == num_visible, "keep: every row must hold exactly num_visible visible patches");
}

// g' = grad * relu'(out) (relu_passes), 8 elements (16 bytes) per thread.
template <typename T>
__global__ void scott_relu_grad_mask(const T* grad, const T* out, T* gmask, int32_t vectors) {
  const int32_t v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= vectors) return;
  uint4 gv = reinterpret_cast<const uint4*>(grad)[v];
  const uint4 ov = reinterpret_cast<const uint4*>(out)[v];
  T* ge = reinterpret_cast<T*>(&gv);
  const T* oe = reinterpret_cast<const T*>(&ov);
#pragma unroll
  for (int e = 0; e < 8; ++e) ge[e] = relu_grad_value<T, float>(ge, oe, e);
  reinterpret_cast<uint4*>(gmask)[v] = gv;
}

void launch_neighbours(const StageGeometry& g, const int32_t* slot, const int64_t* tile_pos, int32_t* nbr,
                       cudaStream_t stream) {
  const int threads = 256;
  SCOTT_LAUNCH(static_cast<unsigned>((g.num_tiles + threads - 1) / threads), threads, 0, stream, scott_neighbour_table)(
      slot, tile_pos, g.batch, g.grid_h, g.grid_w, static_cast<int32_t>(g.num_tiles), nbr);
  check_launch("scott_neighbour_table");
}

template <typename T>
void launch_relu_grad_mask(const StageGeometry& g, const T* grad, const T* out, T* gmask, cudaStream_t stream) {
  const int32_t vectors = static_cast<int32_t>(g.out_rows() * g.c_out / 8);
  const int threads = 256;
  SCOTT_LAUNCH(static_cast<unsigned>((vectors + threads - 1) / threads), threads, 0, stream, scott_relu_grad_mask<T>)(
      grad, out, gmask, vectors);
  check_launch("scott_relu_grad_mask");
}

const void* masked_grad(const StageGeometry& g, DType dtype, const void* grad, const void* out, void* gmask,
                        cudaStream_t stream) {
  if (out == nullptr) return grad;
  if (dtype == DType::kFloat16)
    launch_relu_grad_mask<__half>(g, static_cast<const __half*>(grad), static_cast<const __half*>(out),
                                  static_cast<__half*>(gmask), stream);
  else
    launch_relu_grad_mask<__nv_bfloat16>(g, static_cast<const __nv_bfloat16*>(grad),
                                         static_cast<const __nv_bfloat16*>(out), static_cast<__nv_bfloat16*>(gmask),
                                         stream);
  return gmask;
}

// ---- launches: each on the implicit path when it applies (and every pointer is 16-byte aligned) ----
namespace {

template <typename T>
void forward_on(const StageGeometry& g, const ImplicitConv& ic, const void* src, const void* weight_t, void* out,
                bool relu, int32_t* nbr, cudaStream_t stream) {
  FwdArgs<T> args{ic, static_cast<const T*>(src), static_cast<const T*>(weight_t), nbr, static_cast<T*>(out),
                  static_cast<int32_t>(g.out_rows()), relu};
  using B = FwdBlock<T>;
  const dim3 grid((args.rows + B::kBM - 1) / B::kBM, (ic.c_out + B::kBN - 1) / B::kBN);
  allow_smem(scott_conv_fwd_igemm<T>, B::kSmem);
  SCOTT_LAUNCH(grid, B::TL::kThreads, B::kSmem, stream, scott_conv_fwd_igemm<T>)(args);
  check_launch("scott_conv_fwd_igemm");
}

template <typename T>
void wgrad_on(const StageGeometry& g, const ImplicitConv& ic, const void* src, const void* gm, void* partial,
              int64_t splits, int32_t* nbr, cudaStream_t stream) {
  const int32_t rows = static_cast<int32_t>(g.out_rows());
  const int32_t chunk = static_cast<int32_t>(((rows + splits - 1) / splits + BK - 1) / BK * BK);
  WgradArgs<T> args{ic, static_cast<const T*>(src), static_cast<const T*>(gm), nbr, static_cast<float*>(partial),
                    rows, chunk};
  const dim3 grid(ic.k * ic.k * ((ic.c_in + WG_BM - 1) / WG_BM), (ic.c_out + WG_BN - 1) / WG_BN,
                  static_cast<unsigned>(splits));
  allow_smem(scott_conv_wgrad_igemm<T>, WG_SMEM);
  SCOTT_LAUNCH(grid, WgTile::kThreads, WG_SMEM, stream, scott_conv_wgrad_igemm<T>)(args);
  check_launch("scott_conv_wgrad_igemm");
}

template <typename T>
void dgrad_on(const StageGeometry& g, const ImplicitConv& ic, const void* gm, const void* weight_t, void* grad_src,
              int32_t* nbr, cudaStream_t stream) {
  DgradArgs<T> args{ic, static_cast<const T*>(gm), static_cast<const T*>(weight_t), nbr, static_cast<T*>(grad_src),
                    static_cast<int32_t>(g.out_rows())};
  using B = DgradBlock<T>;
  const dim3 grid((args.rows + B::kBM - 1) / B::kBM, (ic.c_in + B::kBN - 1) / B::kBN, 4);
  allow_smem(scott_conv_dgrad_igemm<T>, B::kSmem);
  SCOTT_LAUNCH(grid, B::TL::kThreads, B::kSmem, stream, scott_conv_dgrad_igemm<T>)(args);
  check_launch("scott_conv_dgrad_igemm");
}

}  // namespace

bool launch_forward(const StageGeometry& g, DType dtype, const void* src, const void* weight_t, const int32_t* slot,
                    const int64_t* tile_pos, void* out, bool relu, int32_t* nbr, cudaStream_t stream) {
  ImplicitConv ic;
  if (g.src_image || !cuda_implicit_conv(g, dtype, 1, ConvOp::kForward) || nbr == nullptr || !aligned16(src) ||
      !aligned16(weight_t) || !aligned16(out) || !aligned16(nbr))
    return false;
  implicit_conv_plan(g, 1, ic);
  launch_neighbours(g, slot, tile_pos, nbr, stream);
  if (dtype == DType::kFloat16)
    forward_on<__half>(g, ic, src, weight_t, out, relu, nbr, stream);
  else
    forward_on<__nv_bfloat16>(g, ic, src, weight_t, out, relu, nbr, stream);
  return true;
}

bool launch_wgrad(const StageGeometry& g, DType dtype, const void* src, const void* grad, const void* out,
                  const int32_t* slot, const int64_t* tile_pos, void* partial, int64_t splits, int32_t* nbr,
                  void* gmask, cudaStream_t stream) {
  ImplicitConv ic;
  if (splits < 1) splits = 1;
  if (g.src_image || !cuda_implicit_conv(g, dtype, splits, ConvOp::kWeightGrad) || splits > 65535 ||
      nbr == nullptr || (out != nullptr && gmask == nullptr) || !aligned16(src) || !aligned16(grad) ||
      !aligned16(out) || !aligned16(gmask) || !aligned16(partial) || !aligned16(nbr))
    return false;
  implicit_conv_plan(g, splits, ic);
  launch_neighbours(g, slot, tile_pos, nbr, stream);
  const void* gm = masked_grad(g, dtype, grad, out, gmask, stream);
  if (dtype == DType::kFloat16)
    wgrad_on<__half>(g, ic, src, gm, partial, splits, nbr, stream);
  else
    wgrad_on<__nv_bfloat16>(g, ic, src, gm, partial, splits, nbr, stream);
  return true;
}

bool launch_dgrad(const StageGeometry& g, DType dtype, const void* grad, const void* out, const void* weight_t,
                  const int32_t* slot, const int64_t* tile_pos, void* grad_src, int32_t* nbr, void* gmask,
                  cudaStream_t stream) {
  ImplicitConv ic;
  if (g.src_image || !cuda_implicit_conv(g, dtype, 1, ConvOp::kInputGrad) || nbr == nullptr ||
      (out != nullptr && gmask == nullptr) || !aligned16(grad) || !aligned16(out) || !aligned16(weight_t) ||
      !aligned16(grad_src) || !aligned16(gmask) || !aligned16(nbr))
    return false;
  implicit_conv_plan(g, 1, ic);
  launch_neighbours(g, slot, tile_pos, nbr, stream);
  const void* gm = masked_grad(g, dtype, grad, out, gmask, stream);
  if (dtype == DType::kFloat16)
    dgrad_on<__half>(g, ic, gm, weight_t, grad_src, nbr, stream);
  else
    dgrad_on<__nv_bfloat16>(g, ic, gm, weight_t, grad_src, nbr, stream);
  return true;
}

}  // namespace ig

void visible_tables_cuda(const uint8_t* keep, int64_t batch, int64_t positions, int64_t num_visible, int64_t grid_w,
                         int32_t radius, int32_t* slot, int64_t* tile_pos, int32_t* nbr, void* stream) {
  if (batch <= 0 || positions <= 0) return;
  SCOTT_LAUNCH(static_cast<unsigned>(batch), ig::kTableThreads, 0, static_cast<cudaStream_t>(stream),
               ig::scott_visible_tables)(keep, positions, num_visible, grid_w, radius, slot, tile_pos, nbr);
  check_launch("scott_visible_tables");
}

}  // namespace scott
