// Probes of the emulated device for its tests (tests/test_cuda_emulated.py):
//  - the tensor-core instructions through cuda_common.cuh's own wrappers: one warp loads A
//    (16 x 16, row-major) with ldmatrix.x4 and B (16 x 8, [k][n]) with ldmatrix.x4.trans from
//    shared memory, as the implicit GEMMs address them, and runs mma.sync m16n8k16. Returns every
//    lane's registers so that tests compare them with the PTX ISA's fragment layouts;
//  - nvcuda::wmma as the gather GEMM uses it (16 x 16 x 16, float16/bfloat16 operands from shared
//    memory, float accumulators), in each operand layout and both store layouts;
//  - distributed shared memory: a cluster of two blocks exchanging words through
//    map_shared_rank, correctly or with one of its cluster barriers missing.
#include <cooperative_groups.h>
#include <mma.h>

#include "cuda_common.cuh"

namespace scott {
namespace emu_probe {

template <typename T>
__global__ void fragment_probe_kernel(const uint16_t* a, const uint16_t* b, uint32_t* regs, float* d) {
  SCOTT_DYNAMIC_SMEM(smem);
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);   // [16][16]
  uint16_t* sb = sa + 256;                            // [16][16]: B's 8 columns, then 8 of zeros
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    sa[i] = a[i];
    sb[i] = (i % 16) < 8 ? b[(i / 16) * 8 + i % 16] : 0;
  }
  __syncthreads();
  uint32_t af[4], bq[4];
  ig::ldmatrix_x4(af, ig::smem_u32(sa + (lane % 16) * 16 + (lane / 16) * 8));
  ig::ldmatrix_x4_trans(bq, ig::smem_u32(sb + (lane % 8 + ((lane / 8) % 2) * 8) * 16 + (lane / 16) * 8));
  const uint32_t bf[2] = {bq[0], bq[1]};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  ig::mma16816<T>(acc, af, bf);
  for (int i = 0; i < 4; ++i) regs[lane * 8 + i] = af[i];
  for (int i = 0; i < 4; ++i) regs[lane * 8 + 4 + i] = bq[i];
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

void fragment_probe(const uint16_t* a, const uint16_t* b, uint32_t* regs, float* d, bool bf16) {
  if (bf16)
    SCOTT_LAUNCH(1, 32, 1024, nullptr, fragment_probe_kernel<__nv_bfloat16>)(a, b, regs, d);
  else
    SCOTT_LAUNCH(1, 32, 1024, nullptr, fragment_probe_kernel<__half>)(a, b, regs, d);
  check_launch("fragment_probe_kernel");
}

// ---- WMMA: D = A B + (A B + c0) through two mma_sync ----
// a, b: 16 x 16 16-bit values in memory order (row-major: [row][col], col-major: [col][row]),
// staged into shared memory with a leading dimension of 24; d: 16 x ld_d floats (row- or
// column-major), of which the kernel writes the 16 x 16 product.
constexpr int kWmmaLd = 24;

template <typename T, class LA, class LB>
__global__ void wmma_probe_kernel(const uint16_t* a, const uint16_t* b, float c0, float* d, int ld_d, bool d_col) {
  namespace wmma = nvcuda::wmma;
  SCOTT_DYNAMIC_SMEM(smem);
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);  // [16][kWmmaLd]
  uint16_t* sb = sa + 16 * kWmmaLd;
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    sa[(i / 16) * kWmmaLd + i % 16] = a[i];
    sb[(i / 16) * kWmmaLd + i % 16] = b[i];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(sa), kWmmaLd);
  wmma::load_matrix_sync(fb, reinterpret_cast<const T*>(sb), kWmmaLd);
  wmma::fill_fragment(acc, c0);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, static_cast<unsigned>(ld_d), d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

template <typename T>
void wmma_probe_typed(const uint16_t* a, const uint16_t* b, float c0, float* d, int ld_d, bool d_col, bool a_col,
                      bool b_col) {
  namespace wmma = nvcuda::wmma;
  const int smem = 2 * 16 * kWmmaLd * 2;
  if (!a_col && !b_col)
    SCOTT_LAUNCH(1, 32, smem, nullptr, wmma_probe_kernel<T, wmma::row_major, wmma::row_major>)(a, b, c0, d, ld_d, d_col);
  else if (!a_col)
    SCOTT_LAUNCH(1, 32, smem, nullptr, wmma_probe_kernel<T, wmma::row_major, wmma::col_major>)(a, b, c0, d, ld_d, d_col);
  else if (!b_col)
    SCOTT_LAUNCH(1, 32, smem, nullptr, wmma_probe_kernel<T, wmma::col_major, wmma::row_major>)(a, b, c0, d, ld_d, d_col);
  else
    SCOTT_LAUNCH(1, 32, smem, nullptr, wmma_probe_kernel<T, wmma::col_major, wmma::col_major>)(a, b, c0, d, ld_d, d_col);
  check_launch("wmma_probe_kernel");
}

void wmma_probe(const uint16_t* a, const uint16_t* b, float c0, float* d, int ld_d, bool d_col, bool bf16, bool a_col,
                bool b_col) {
  if (bf16)
    wmma_probe_typed<__nv_bfloat16>(a, b, c0, d, ld_d, d_col, a_col, b_col);
  else
    wmma_probe_typed<__half>(a, b, c0, d, ld_d, d_col, a_col, b_col);
}

// ---- distributed shared memory: a cluster of two blocks of 64 threads ----
// Each thread stores rank * 100 + tid into its block's word tid, and reads its peer block's word
// tid through map_shared_rank into out[blockIdx.x * 64 + tid]. `mode` (ClusterProbeMode) drops
// or replaces one of the two cluster barriers, or makes an access that the checks must report.
enum ClusterProbeMode {
  kClusterOrdered = 0,    // store, cluster.sync, read the peer's word, cluster.sync
  kNoSyncBefore = 1,      // no cluster barrier between the peer's stores and the reads
  kNoSyncAfter = 2,       // no cluster barrier between the reads and the peer's exit
  kBlockBarrierOnly = 3,  // __syncthreads (of each block) instead of the first cluster barrier
  kPastPeerWindow = 4,    // thread 0 reads the word after the peer's dynamic shared memory
  kUnwrittenPeer = 5,     // thread 0 leaves its word unwritten; the peer's thread 0 reads it
};

__global__ void cluster_probe_kernel(int mode, float* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  SCOTT_DYNAMIC_SMEM(smem);
  float* buf = reinterpret_cast<float*>(smem);  // [64]
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const int tid = threadIdx.x;
  if (mode != kUnwrittenPeer || tid != 0) buf[tid] = static_cast<float>(rank * 100 + tid);
  if (mode == kBlockBarrierOnly)
    __syncthreads();
  else if (mode != kNoSyncBefore)
    cluster.sync();
  const float* peer = cluster.map_shared_rank(buf, rank ^ 1);
  out[blockIdx.x * 64 + tid] = peer[mode == kPastPeerWindow && tid == 0 ? 64 : tid];
  if (mode != kNoSyncAfter) cluster.sync();
#else
  __trap();
#endif
}

void cluster_probe(int mode, float* out) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(2);
  cfg.blockDim = dim3(64);
  cfg.dynamicSmemBytes = 64 * sizeof(float);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, cluster_probe_kernel, mode, out);
  cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cluster_probe_kernel: CUDA launch failed: ") + cudaGetErrorString(err));
}

}  // namespace emu_probe
}  // namespace scott
