// nvcuda::wmma on the emulated device: m16n8k16-free whole-tile fragments (every lane holds the
// 16 x 16 tile; the layout of a fragment is opaque in the WMMA API), each call a warp collective.
#pragma once
#include "../cuda_host.h"
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, typename T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  using element_type = typename std::conditional<std::is_same<Use, accumulator>::value, float, T>::type;
  element_type x[256];
};
template <class Use, int M, int N, int K, typename T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, typename fragment<Use, M, N, K, T, L>::element_type v) {
  for (auto& e : f.x) e = v;
}
template <class Use, int M, int N, int K, typename T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ld) {
  ::emu::sync_warp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = std::is_same<L, col_major>::value ? p[c * ld + r] : p[r * ld + c];
  ::emu::sync_warp();
}
template <typename T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float, void>& c) {
  ::emu::sync_warp();
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) acc += static_cast<float>(a.x[r * 16 + k]) * static_cast<float>(b.x[k * 16 + n]);
      out[r * 16 + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}
// each lane stores its 8 of the 256 elements (as the hardware's lanes store theirs)
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, void>& f, unsigned ld,
                              layout_t layout) {
  ::emu::sync_warp();
  const int lane = ::emu::g_thread->lane;
  for (int i = lane; i < 256; i += 32) {
    const int r = i / 16, c = i % 16;
    p[layout == mem_row_major ? r * ld + c : c * ld + r] = f.x[i];
  }
  ::emu::sync_warp();
}
}  // namespace wmma
}  // namespace nvcuda
