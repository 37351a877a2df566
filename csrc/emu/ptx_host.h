// Host versions of cuda_common.cuh's PTX wrappers (included there, inside namespace scott::ig, in
// the emulated build), with the PTX ISA's semantics:
//  - cp.async.cg 16 bytes: the copy lands at the cp.async.wait_group that covers its commit group
//    (until then the destination is marked in flight and reading it is reported); src-size 0
//    fills zeros;
//  - ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
//    matrix i; a lane receives (row lane/4, columns 2(lane%4), +1) of each matrix, or with .trans
//    (rows 2(lane%4), +1 of column lane/4);
//  - mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: with g = lane/4, t = lane%4, A regs
//    (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B regs (k 2t.., n g), (k 2t+8.., n g);
//    C/D (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1); products exact, float32 sums in K order.
// All three are warp collectives: every lane of the warp must reach them.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(::emu::smem_offset(p, 0, "cvta.to.shared"));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  ::emu::cp_async(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ::emu::cp_async_wait(N); }

namespace emu_ptx {
inline uint16_t lds16(uint32_t addr) {
  ::emu::smem_check_read(addr, 2, "ldmatrix");
  uint16_t v;
  std::memcpy(&v, ::emu::g_dyn_smem + addr, 2);
  return v;
}
template <bool TRANS>
inline void ldmatrix(uint32_t (&r)[4], uint32_t addr) {
  if (addr % 16 != 0) ::emu::report("misaligned", ::emu::g_dyn_smem + addr, "ldmatrix row address not 16-byte aligned");
  ::emu::smem_offset(::emu::g_dyn_smem + addr, 16, "ldmatrix");
  uintptr_t mine = addr;
  void* const* rows = ::emu::warp_exchange(reinterpret_cast<void*>(mine));
  const int lane = ::emu::g_thread->lane;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!TRANS) {
      const uint32_t row = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(rows[8 * i + lane / 4]));
      lo = lds16(row + 2 * (2 * (lane % 4)));
      hi = lds16(row + 2 * (2 * (lane % 4) + 1));
    } else {
      const uint32_t r0 = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(rows[8 * i + 2 * (lane % 4)]));
      const uint32_t r1 = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(rows[8 * i + 2 * (lane % 4) + 1]));
      lo = lds16(r0 + 2 * (lane / 4));
      hi = lds16(r1 + 2 * (lane / 4));
    }
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  ::emu::sync_warp();  // every lane has read the addresses before the exchange slots are reused
}
struct MmaIn {
  uint32_t a[4], b[2];
};
template <typename T>
inline float elem(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  if (std::is_same<T, __nv_bfloat16>::value) return ::emu::bf16_bits_to_float(bits);
  return ::emu::half_bits_to_float(bits);
}
// A[row][k] of the warp's fragments
template <typename T>
inline float a_at(void* const* in, int row, int k) {
  const int g = row % 8, t = (k % 8) / 2;
  const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
  return elem<T>(static_cast<const MmaIn*>(in[g * 4 + t])->a[reg], k % 2);
}
template <typename T>
inline float b_at(void* const* in, int k, int n) {
  const int t = (k % 8) / 2;
  return elem<T>(static_cast<const MmaIn*>(in[n * 4 + t])->b[k >= 8 ? 1 : 0], k % 2);
}
}  // namespace emu_ptx

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_ptx::ldmatrix<false>(r, addr); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_ptx::ldmatrix<true>(r, addr); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_ptx::MmaIn mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  void* const* in = ::emu::warp_exchange(&mine);
  const int lane = ::emu::g_thread->lane, g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += emu_ptx::a_at<T>(in, row, k) * emu_ptx::b_at<T>(in, k, col);
    out[i] = acc;
  }
  ::emu::sync_warp();  // the inputs stay in place until every lane has read them
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
