// The emulated module's own functions: the device it emulates, the launches it ran and the
// checks that failed (scott_kernels._emu only).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <utility>
#include <string>
#include <vector>

namespace emu {
void configure(int arch, int sms);
void reset_stats();
void track(const std::vector<std::pair<uintptr_t, size_t>>& ranges);
int device_sms();
int device_arch();
const std::map<std::string, long>& launch_counts();
const std::map<std::string, long>& check_counts();
const std::vector<std::string>& check_messages();
}  // namespace emu
namespace scott {
namespace emu_probe {
void fragment_probe(const uint16_t* a, const uint16_t* b, uint32_t* regs, float* d, bool bf16);
void wmma_probe(const uint16_t* a, const uint16_t* b, float c0, float* d, int ld_d, bool d_col, bool bf16, bool a_col,
                bool b_col);
void cluster_probe(int mode, float* out);
}
}  // namespace scott

void scott_emu_bindings(pybind11::module_& m) {
  m.def("emu_configure", &emu::configure, pybind11::arg("arch") = 90, pybind11::arg("sms") = 4,
        "the emulated device: compute capability 80 or 90 and its multiprocessor count");
  m.def("emu_sms", &emu::device_sms, "the emulated device's multiprocessor count");
  m.def("emu_arch", &emu::device_arch, "the emulated device's compute capability (80 or 90)");
  m.def("emu_track", &emu::track, pybind11::arg("ranges"),
        "(address, bytes) of the tensors the next launches may access; global loads and stores "
        "elsewhere are reported (an empty list: global memory is not checked)");
  m.def("emu_reset", &emu::reset_stats, "clear the launch counts and failed checks");
  m.def(
      "emu_fragment_probe",
      [](uintptr_t a, uintptr_t b, uintptr_t regs, uintptr_t d, bool bf16) {
        scott::emu_probe::fragment_probe(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b),
                                         reinterpret_cast<uint32_t*>(regs), reinterpret_cast<float*>(d), bf16);
      },
      "one warp: ldmatrix.x4 of A (16x16 row-major 16-bit), ldmatrix.x4.trans of B (16x8), mma.sync m16n8k16; "
      "regs (32 lanes x 8: A's 4 then B's 4), d (32 lanes x 4)");
  m.def(
      "emu_wmma_probe",
      [](uintptr_t a, uintptr_t b, float c0, uintptr_t d, int ld_d, bool d_col, bool bf16, bool a_col, bool b_col) {
        scott::emu_probe::wmma_probe(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b), c0,
                                     reinterpret_cast<float*>(d), ld_d, d_col, bf16, a_col, b_col);
      },
      pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("c0"), pybind11::arg("d"), pybind11::arg("ld_d"),
      pybind11::arg("d_col"), pybind11::arg("bf16"), pybind11::arg("a_col"), pybind11::arg("b_col"),
      "one warp: nvcuda::wmma 16x16x16 from shared memory, D = A B + (A B + c0) through two mma_sync; a, b: 16x16 "
      "16-bit values in memory order of their layout (row- or column-major); d: 16 x ld_d floats, stored row- or "
      "column-major");
  m.def(
      "emu_cluster_probe",
      [](int mode, uintptr_t out) { scott::emu_probe::cluster_probe(mode, reinterpret_cast<float*>(out)); },
      pybind11::arg("mode"), pybind11::arg("out"),
      "a cluster of two blocks of 64 threads exchanging words through distributed shared memory (out: 2 x 64 "
      "floats, each thread's read of its peer's word); mode 0 correct, 1 no cluster barrier before the reads, 2 "
      "none after them, 3 __syncthreads instead of the first, 4 a read past the peer's window, 5 a read of a word "
      "the peer never wrote (sm_90 only)");
  m.def("emu_stats", []() {
    pybind11::dict d;
    d["launches"] = emu::launch_counts();
    d["checks"] = emu::check_counts();
    d["messages"] = emu::check_messages();
    return d;
  }, "launches per kernel, failed checks per kind and their first messages");
}
