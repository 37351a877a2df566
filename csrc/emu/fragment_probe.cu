// A probe of the emulated tensor-core instructions through cuda_common.cuh's own wrappers: one warp
// loads A (16 x 16, row-major) with ldmatrix.x4 and B (16 x 8, [k][n]) with ldmatrix.x4.trans from
// shared memory, as the implicit GEMMs address them, and runs mma.sync m16n8k16. Returns every
// lane's registers so that tests compare them with the PTX ISA's fragment layouts.
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

}  // namespace emu_probe
}  // namespace scott
