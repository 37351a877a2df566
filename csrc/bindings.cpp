// pybind11 module scott_kernels._C. Kernels take raw data pointers, sizes, strides and (for CUDA)
// the stream, so the module never links libtorch and one build serves every torch version.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "patch_tiles.h"
#include "tokenizer.h"

#ifdef SCOTT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef SCOTT_CUDA_ARCHS
#define SCOTT_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using scott::DType;
using scott::TileGeometry;

namespace {

void validate(const TileGeometry& g) {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(std::string("TileGeometry: ") + what);
  };
  require(g.batch >= 0 && g.grid_h > 0 && g.grid_w > 0, "batch >= 0 and grid_h, grid_w > 0 expected");
  require(g.channels > 0 && g.side > 0, "channels and side must be positive");
  require(g.halo_lo >= 0 && g.halo_hi >= 0, "halo_lo and halo_hi must be non-negative");
  require(g.num_tiles >= 0, "num_tiles must be non-negative");
  for (int d = 0; d < 3; ++d) require(g.slot_sizes[d] >= 0, "slot_sizes must be non-negative");
}

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void gather_tiles(const TileGeometry& g, int dtype, std::uintptr_t src, std::uintptr_t slot,
                  std::uintptr_t tile_pos, std::uintptr_t tiles, bool on_cuda, std::uintptr_t stream) {
  validate(g);
  const auto dt = static_cast<DType>(dtype);
  scott::element_size(dt);  // rejects unknown codes
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::gather_tiles_cuda(g, dt, ptr<const void>(src), ptr<const int64_t>(slot),
                             ptr<const int64_t>(tile_pos), ptr<void>(tiles), ptr<void>(stream));
    return;
#else
    throw std::runtime_error("gather_tiles: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::gather_tiles_cpu(g, dt, ptr<const void>(src), ptr<const int64_t>(slot),
                          ptr<const int64_t>(tile_pos), ptr<void>(tiles));
}

void scatter_tiles(const TileGeometry& g, int dtype, std::uintptr_t grad_tiles, std::uintptr_t slot,
                   std::uintptr_t slot_pos, std::uintptr_t tile_of, std::uintptr_t grad_src,
                   bool on_cuda, std::uintptr_t stream) {
  validate(g);
  const auto dt = static_cast<DType>(dtype);
  scott::element_size(dt);
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::scatter_tiles_cuda(g, dt, ptr<const void>(grad_tiles), ptr<const int64_t>(slot),
                              ptr<const int64_t>(slot_pos), ptr<const int64_t>(tile_of),
                              ptr<void>(grad_src), ptr<void>(stream));
    return;
#else
    throw std::runtime_error("scatter_tiles: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::scatter_tiles_cpu(g, dt, ptr<const void>(grad_tiles), ptr<const int64_t>(slot),
                           ptr<const int64_t>(slot_pos), ptr<const int64_t>(tile_of), ptr<void>(grad_src));
}

// ---- tokenizer stage kernels ----------------------------------------------------------------------
using scott::PoolGeometry;
using scott::StageGeometry;

void validate_stage(const StageGeometry& g, const char* name) {
  auto require = [name](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(std::string(name) + ": " + what);
  };
  require(g.num_tiles >= 0 && g.batch > 0 && g.grid_h > 0 && g.grid_w > 0, "positive batch and grid expected");
  require(g.in_side >= 2 && g.in_side % 2 == 0, "in_side must be even and at least 2");
  require(g.ksize > 0 && g.ksize % 2 == 1, "ksize must be odd and positive");
  require(g.c_in > 0 && g.c_out > 0, "channel counts must be positive");
  require(!g.normalize || g.src_image, "normalize applies to image sources only");
}

void validate_pool(const PoolGeometry& g, const char* name) {
  if (g.num_tiles < 0 || g.batch <= 0 || g.grid_h <= 0 || g.grid_w <= 0 || g.channels <= 0 || g.side < 2 ||
      g.side % 2)
    throw std::invalid_argument(std::string(name) + ": bad geometry (positive sizes and an even side expected)");
}

DType compute_dtype(int code, const char* name) {
  if (code < 0 || code > 3) throw std::invalid_argument(std::string(name) + ": unknown dtype code");
  return static_cast<DType>(code);
}

void conv_relu(const StageGeometry& g, int dtype, int src_dtype, std::uintptr_t src, std::uintptr_t weight_t,
               std::uintptr_t norm, std::uintptr_t slot, std::uintptr_t tile_pos, std::uintptr_t out, bool relu,
               bool on_cuda, std::uintptr_t stream, std::uintptr_t nbr) {
  validate_stage(g, "conv_relu");
  const DType dt = compute_dtype(dtype, "conv_relu");
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::conv_relu_cuda(g, dt, src_dtype, ptr<const void>(src), ptr<const void>(weight_t), ptr<const void>(norm),
                          ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos), ptr<void>(out), relu,
                          ptr<int32_t>(nbr), ptr<void>(stream));
    return;
#else
    throw std::runtime_error("conv_relu: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::conv_relu_cpu(g, dt, src_dtype, ptr<const void>(src), ptr<const void>(weight_t), ptr<const void>(norm),
                       ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos), ptr<void>(out), relu);
}

void conv_relu_wgrad(const StageGeometry& g, int dtype, int src_dtype, std::uintptr_t src, std::uintptr_t grad,
                     std::uintptr_t out, std::uintptr_t norm, std::uintptr_t slot, std::uintptr_t tile_pos,
                     std::uintptr_t result, int64_t splits, bool on_cuda, std::uintptr_t stream, std::uintptr_t nbr,
                     std::uintptr_t gmask) {
  validate_stage(g, "conv_relu_wgrad");
  const DType dt = compute_dtype(dtype, "conv_relu_wgrad");
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::conv_relu_wgrad_cuda(g, dt, src_dtype, ptr<const void>(src), ptr<const void>(grad), ptr<const void>(out),
                                ptr<const void>(norm), ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos),
                                ptr<void>(result), splits, ptr<int32_t>(nbr), ptr<void>(gmask), ptr<void>(stream));
    return;
#else
    throw std::runtime_error("conv_relu_wgrad: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::conv_relu_wgrad_cpu(g, dt, src_dtype, ptr<const void>(src), ptr<const void>(grad), ptr<const void>(out),
                             ptr<const void>(norm), ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos),
                             ptr<void>(result));
}

void conv_relu_dgrad(const StageGeometry& g, int dtype, std::uintptr_t grad, std::uintptr_t out,
                     std::uintptr_t weight_t, std::uintptr_t slot, std::uintptr_t tile_pos, std::uintptr_t grad_src,
                     bool on_cuda, std::uintptr_t stream, std::uintptr_t nbr, std::uintptr_t gmask) {
  validate_stage(g, "conv_relu_dgrad");
  const DType dt = compute_dtype(dtype, "conv_relu_dgrad");
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::conv_relu_dgrad_cuda(g, dt, ptr<const void>(grad), ptr<const void>(out), ptr<const void>(weight_t),
                                ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos), ptr<void>(grad_src),
                                ptr<int32_t>(nbr), ptr<void>(gmask), ptr<void>(stream));
    return;
#else
    throw std::runtime_error("conv_relu_dgrad: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::conv_relu_dgrad_cpu(g, dt, ptr<const void>(grad), ptr<const void>(out), ptr<const void>(weight_t),
                             ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos), ptr<void>(grad_src));
}

void max_blur_pool(const PoolGeometry& g, int dtype, std::uintptr_t act, std::uintptr_t slot, std::uintptr_t tile_pos,
                   std::uintptr_t out, bool relu, bool on_cuda, std::uintptr_t stream) {
  validate_pool(g, "max_blur_pool");
  const DType dt = compute_dtype(dtype, "max_blur_pool");
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::max_blur_pool_cuda(g, dt, ptr<const void>(act), ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos),
                              ptr<void>(out), relu, ptr<void>(stream));
    return;
#else
    throw std::runtime_error("max_blur_pool: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::max_blur_pool_cpu(g, dt, ptr<const void>(act), ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos),
                           ptr<void>(out), relu);
}

void max_blur_pool_backward(const PoolGeometry& g, int dtype, std::uintptr_t grad, std::uintptr_t act,
                            std::uintptr_t slot, std::uintptr_t tile_pos, std::uintptr_t grad_act, bool relu_mask,
                            bool on_cuda, std::uintptr_t stream) {
  validate_pool(g, "max_blur_pool_backward");
  const DType dt = compute_dtype(dtype, "max_blur_pool_backward");
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::max_blur_pool_backward_cuda(g, dt, ptr<const void>(grad), ptr<const void>(act), ptr<const int32_t>(slot),
                                       ptr<const int64_t>(tile_pos), ptr<void>(grad_act), relu_mask, ptr<void>(stream));
    return;
#else
    throw std::runtime_error("max_blur_pool_backward: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  scott::max_blur_pool_backward_cpu(g, dt, ptr<const void>(grad), ptr<const void>(act), ptr<const int32_t>(slot),
                                    ptr<const int64_t>(tile_pos), ptr<void>(grad_act), relu_mask);
}

// The compact layout's tables (tokenizer.h): on the CPU the number of rows whose visible count is not
// num_visible (their tables still in range), on CUDA 0 (the kernel checks the rows on the device).
int64_t visible_tables(std::uintptr_t keep, int64_t batch, int64_t positions, int64_t num_visible, int64_t grid_w,
                       int radius, std::uintptr_t slot, std::uintptr_t tile_pos, std::uintptr_t nbr, bool on_cuda,
                       std::uintptr_t stream) {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(std::string("visible_tables: ") + what);
  };
  require(batch >= 0 && positions >= 0 && grid_w > 0 && positions % grid_w == 0,
          "batch >= 0 and a (grid_h, grid_w) grid of positions expected");
  require(num_visible >= 0 && num_visible <= positions, "num_visible must be in [0, positions]");
  require(radius >= -1 && radius < 1024, "radius must be -1 (no neighbour table) or in [0, 1024)");
  require(batch < (int64_t(1) << 31) && batch * positions < (int64_t(1) << 31), "int32 slots: under 2^31 positions");
  require(radius < 0 || num_visible == 0 || nbr != 0, "a neighbour table needs its buffer");
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    scott::visible_tables_cuda(ptr<const uint8_t>(keep), batch, positions, num_visible, grid_w, radius,
                               ptr<int32_t>(slot), ptr<int64_t>(tile_pos), ptr<int32_t>(nbr), ptr<void>(stream));
    return 0;
#else
    throw std::runtime_error("visible_tables: scott_kernels was built without CUDA");
#endif
  }
  py::gil_scoped_release nogil;
  return scott::visible_tables_cpu(ptr<const uint8_t>(keep), batch, positions, num_visible, grid_w, radius,
                                   ptr<int32_t>(slot), ptr<int64_t>(tile_pos), ptr<int32_t>(nbr));
}

// Which MaxBlurPool kernels a pool runs on: "tiled" or "elementwise: <why>" (on_cuda adds the
// GPU's dtype rule: the tiled kernels move float16/bfloat16 vectors; the twin runs them in any dtype).
std::string pool_path(const PoolGeometry& g, int dtype, bool on_cuda) {
  validate_pool(g, "pool_path");
  const DType dt = compute_dtype(dtype, "pool_path");
  if (const char* why = scott::pool_refusal(g)) return std::string("elementwise: ") + why;
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    if (!scott::cuda_tiled_pool(g, dt)) return "elementwise: the tiled pool kernels run float16/bfloat16, from sm_80 code";
#else
    return "elementwise: built without CUDA";
#endif
  }
  (void)dt;
  return "tiled";
}

// Which GEMM a stage's convolutions run on: "implicit" or "gather: <why>". on_cuda adds the GPU's
// rules (float16/bfloat16 on tensor cores); the C++ twin (float32/float64) follows the shape rules.
std::string conv_gemm_path(const StageGeometry& g, int dtype, int64_t splits, bool on_cuda, int op) {
  validate_stage(g, "conv_gemm_path");
  const DType dt = compute_dtype(dtype, "conv_gemm_path");
  if (op < 0 || op > 2) throw std::invalid_argument("conv_gemm_path: op must be 0 (forward), 1 (wgrad), 2 (dgrad)");
  const auto cop = static_cast<scott::ConvOp>(op);
  const char* why = scott::conv_gemm_refusal(g, splits, cop);
  if (why != nullptr) return std::string("gather: ") + why;
  if (on_cuda) {
#ifdef SCOTT_WITH_CUDA
    if (!scott::cuda_implicit_conv(g, dt, splits, cop))
      return "gather: the implicit GEMM runs float16/bfloat16 on tensor cores, from sm_80 code";
#else
    return "gather: built without CUDA";
#endif
  }
  (void)dt;
  return "implicit";
}

py::dict build_info() {
  py::dict info;
#ifdef SCOTT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = std::string(SCOTT_CUDA_ARCHS);
  info["cuda_runtime_version"] = scott::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
#endif
  info["offset_limit"] = scott::kOffsetLimit;  // the 32-bit kernels' tensor size limit (stage_common.h)
  info["compiler"] =
#if defined(__clang__)
      std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
      std::string("gcc ") + __VERSION__;
#else
      std::string("unknown");
#endif
  return info;
}

}  // namespace

#ifdef SCOTT_EMU
void scott_emu_bindings(py::module_& m);  // csrc/emu/emu_bindings.cpp
#define SCOTT_MODULE_NAME _emu
#else
#define SCOTT_MODULE_NAME _C
#endif

PYBIND11_MODULE(SCOTT_MODULE_NAME, m) {
  m.doc() = "scott_kernels native kernels (C++ CPU and, when built with nvcc, CUDA)";

  py::class_<TileGeometry>(m, "TileGeometry")
      .def(py::init<>())
      .def_readwrite("batch", &TileGeometry::batch)
      .def_readwrite("grid_h", &TileGeometry::grid_h)
      .def_readwrite("grid_w", &TileGeometry::grid_w)
      .def_readwrite("channels", &TileGeometry::channels)
      .def_readwrite("side", &TileGeometry::side)
      .def_readwrite("halo_lo", &TileGeometry::halo_lo)
      .def_readwrite("halo_hi", &TileGeometry::halo_hi)
      .def_readwrite("num_tiles", &TileGeometry::num_tiles)
      .def_readwrite("c_stride", &TileGeometry::c_stride)
      .def_readwrite("y_stride", &TileGeometry::y_stride)
      .def_readwrite("x_stride", &TileGeometry::x_stride)
      .def("set_slots",
           [](TileGeometry& g, py::tuple sizes, py::tuple strides) {
             if (sizes.size() != 3 || strides.size() != 3)
               throw std::invalid_argument("set_slots: expected three sizes and three strides");
             for (int d = 0; d < 3; ++d) {
               g.slot_sizes[d] = sizes[d].cast<int64_t>();
               g.slot_strides[d] = strides[d].cast<int64_t>();
             }
           })
      .def_property_readonly("tile_side", &TileGeometry::tile_side)
      .def_property_readonly("num_slots", &TileGeometry::num_slots);

  m.def("gather_tiles", &gather_tiles, py::arg("geometry"), py::arg("dtype"), py::arg("src"),
        py::arg("slot"), py::arg("tile_pos"), py::arg("tiles"), py::arg("on_cuda"), py::arg("stream"),
        "tiles (M, C, T, T) <- visible patches of src with their halo, zero elsewhere");
  m.def("scatter_tiles", &scatter_tiles, py::arg("geometry"), py::arg("dtype"), py::arg("grad_tiles"),
        py::arg("slot"), py::arg("slot_pos"), py::arg("tile_of"), py::arg("grad_src"), py::arg("on_cuda"),
        py::arg("stream"), "grad_src (S, C, side, side) <- adjoint of gather_tiles");
  py::class_<StageGeometry>(m, "StageGeometry")
      .def(py::init<>())
      .def_readwrite("num_tiles", &StageGeometry::num_tiles)
      .def_readwrite("batch", &StageGeometry::batch)
      .def_readwrite("grid_h", &StageGeometry::grid_h)
      .def_readwrite("grid_w", &StageGeometry::grid_w)
      .def_readwrite("in_side", &StageGeometry::in_side)
      .def_readwrite("ksize", &StageGeometry::ksize)
      .def_readwrite("c_in", &StageGeometry::c_in)
      .def_readwrite("c_out", &StageGeometry::c_out)
      .def_readwrite("s_b", &StageGeometry::s_b)
      .def_readwrite("s_c", &StageGeometry::s_c)
      .def_readwrite("s_h", &StageGeometry::s_h)
      .def_readwrite("s_w", &StageGeometry::s_w)
      .def_readwrite("src_image", &StageGeometry::src_image)
      .def_readwrite("normalize", &StageGeometry::normalize);
  py::class_<PoolGeometry>(m, "PoolGeometry")
      .def(py::init<>())
      .def_readwrite("num_tiles", &PoolGeometry::num_tiles)
      .def_readwrite("batch", &PoolGeometry::batch)
      .def_readwrite("grid_h", &PoolGeometry::grid_h)
      .def_readwrite("grid_w", &PoolGeometry::grid_w)
      .def_readwrite("side", &PoolGeometry::side)
      .def_readwrite("channels", &PoolGeometry::channels);
  m.def("conv_relu", &conv_relu, "conv over visible patches, relu(conv) with relu: out (M, s, s, C_out)");
  m.def("conv_relu_wgrad", &conv_relu_wgrad,
        "weight gradient (k*k*C_in, C_out); on CUDA into a (splits, k*k*C_in, C_out) accumulator");
  m.def("conv_relu_dgrad", &conv_relu_dgrad, "input gradient of a compact source (M, q, q, C_in)");
  m.def("max_blur_pool", &max_blur_pool,
        "MaxBlurPool of compact activations (M, s/2, s/2, C); relu: of relu(act), applied to the window maxima");
  m.def("max_blur_pool_backward", &max_blur_pool_backward,
        "gradient of max_blur_pool (M, s, s, C); relu_mask: times relu'(act) (0 where act <= 0), the gradient before the ReLU");
  m.def("visible_tables", &visible_tables, py::arg("keep"), py::arg("batch"), py::arg("positions"),
        py::arg("num_visible"), py::arg("grid_w"), py::arg("radius"), py::arg("slot"), py::arg("tile_pos"),
        py::arg("nbr"), py::arg("on_cuda"), py::arg("stream"),
        "slot (B, N) int32, tile_pos (B*K,) int64 and, radius >= 0, the (B*K, 2r+1, 2r+1) neighbour table of a "
        "(B, N) keep mask with K visible patches per row; on the CPU returns the rows with another count");
  m.def(
      "set_tensor_cores",
      [](bool enabled) {
#ifdef SCOTT_WITH_CUDA
        scott::set_tensor_cores(enabled);
#else
        (void)enabled;
#endif
      },
      "float16/bfloat16 conv GEMMs on tensor cores (True, default) or CUDA cores (False)");
  m.def("conv_gemm_path", &conv_gemm_path, py::arg("geometry"), py::arg("dtype"), py::arg("splits"),
        py::arg("on_cuda"), py::arg("op"),
        "\"implicit\" or \"gather: <why>\" for a conv stage's GEMM op (0 forward, 1 wgrad, 2 dgrad)");
  m.def(
      "set_implicit_gemm", [](bool enabled) { scott::implicit_gemm_enabled() = enabled; },
      "conv GEMMs on the implicit path where it applies (True, default) or always on the gather GEMM");
  m.def("pool_path", &pool_path, py::arg("geometry"), py::arg("dtype"), py::arg("on_cuda"),
        "\"tiled\" or \"elementwise: <why>\" for a MaxBlurPool's kernels");
  m.def(
      "set_tiled_pool", [](bool enabled) { scott::tiled_pool_enabled() = enabled; },
      "MaxBlurPool on the tiled kernels where they apply (True, default) or always per element");
  m.def(
      "fast_div",
      [](uint32_t divisor, uint32_t n) {
        if (divisor == 0 || n >= (1u << 31)) throw std::invalid_argument("fast_div: divisor >= 1, n < 2^31");
        return scott::FastDiv(divisor).div(n);
      },
      "n // divisor through the kernels' multiply-shift division (for tests)");
  m.def(
      "tile_neighbours",
      [](std::uintptr_t slot, std::uintptr_t tile_pos, int64_t t, int64_t batch, int64_t grid_h, int64_t grid_w,
         int64_t num_tiles) {
        int32_t out[scott::kNeighbours];
        scott::tile_neighbours(ptr<const int32_t>(slot), ptr<const int64_t>(tile_pos), t, batch, grid_h, grid_w,
                               num_tiles, out);
        py::list l;
        for (int32_t v : out) l.append(v);
        return l;
      },
      "the 3x3 neighbour slots of tile t from CPU tables (for tests)");
  m.def(
      "image_wgrad_clusters",
      [](int dtype, int src_dtype) {
#ifdef SCOTT_WITH_CUDA
        return scott::cuda_image_wgrad_clusters(compute_dtype(dtype, "image_wgrad_clusters"), src_dtype);
#else
        (void)dtype;
        (void)src_dtype;
        return false;
#endif
      },
      py::arg("dtype"), py::arg("src_dtype"),
      "whether the image weight gradient runs as clusters of two blocks (one partial per cluster) on the "
      "current CUDA device: sm_90 code on a GPU that launches clusters");
  m.def(
      "cuda_code_arch",
      [](int device) {
#ifdef SCOTT_WITH_CUDA
        return scott::module_code_arch(device);
#else
        (void)device;
        return -1;
#endif
      },
      py::arg("device"),
      "the architecture (major * 10 + minor) of the code this module runs on CUDA device `device`: 0 when "
      "it holds none the device can run, -1 when built without CUDA");
  m.def("build_info", &build_info, "what this build compiled");
#ifdef SCOTT_EMU
  scott_emu_bindings(m);
#endif
}
