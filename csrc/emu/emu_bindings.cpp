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
  m.def("emu_stats", []() {
    pybind11::dict d;
    d["launches"] = emu::launch_counts();
    d["checks"] = emu::check_counts();
    d["messages"] = emu::check_messages();
    return d;
  }, "launches per kernel, failed checks per kind and their first messages");
}
