"""CUDA backend: the tokenizer's stage kernels from ``csrc/`` (scott_kernels._C), as torch ops.

The same compact visible-patch layout and tables as the triton backend (``compact.py``). Each
op runs the CUDA kernels on a GPU tensor and their C++ twin on a CPU tensor (float32/float64):
both call the same operand and pooling functions (``csrc/conv_operands.h``,
``csrc/pool_ops.h``), so the CPU tests against the dense reference check the index logic the GPU
runs. ``backend="cuda"`` itself is offered on CUDA devices only.

Kernels: the three convolution GEMMs (forward + ReLU, weight gradient split over output pixels
into accumulator-typed partials, input gradient per parity class of input pixel). In
float16/bfloat16 they run as implicit GEMMs on tensor cores (cp.async, ldmatrix, mma.sync;
operands addressed through a per-tile 3x3 neighbour table with 32-bit offsets): compact stages
with one neighbour lookup per row, tap and 16-byte channel vector; the image stage (forward and
weight gradient) from each patch's window staged once in shared memory. float32/float64, image
gradients and shapes those kernels refuse (``conv_gemm_path`` says why) run one tiled
shared-memory GEMM that gathers each operand element through the ``slot`` table (WMMA for
float16/bfloat16 on sm_80+, CUDA cores otherwise). The C++ twin follows the same path rule and
index functions, so CPU tests exercise both paths. MaxBlurPool (float16/bfloat16, channels a
multiple of 8): one thread per (visible tile, pooled pixel, 8-channel vector) reads its window as
16-byte vectors through the tile's neighbour slots (``pool_path`` says which kernels run and
why); everything else one thread per element; the twin runs the same task, lookup and window
functions. The tokenizer runs each stage as conv (``relu=False``) -> MaxBlurPool of its ReLU
(``relu=True``: applied to the window maxima), the same two ops and autograd wiring as the triton
backend (``compact.register_stage_autograd``): the pool's backward kernel writes the gradient
before the ReLU (``relu_mask``), which both conv gradient kernels read as it is (``out=None``), so
no separate relu' pass runs. float16/bfloat16/float32 accumulate in float32, float64 in float64.
With ``num_visible`` given, the tokenizer builds its tables (``slot``, ``tile_pos``) from the mask in
one launch (``visible_tables``: one block per image row, the row's count checked on the device);
without it, by the torch ops of ``compact.visible_tables``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._device import custom_op
from .compact import (_multiprocessors, accumulator_dtype, check_tables, gemm_weight, gemm_weight_transposed,
                      new_tables, reduction_splits, register_stage_autograd, tokenize_compact, weight_from_partials)
from .compact import visible_tables as compact_visible_tables
from .ops import _C

__all__ = ["cuda_tokenize", "cuda_supports", "cuda_refusal", "code_arch", "kernel_paths", "use_tensor_cores",
           "use_implicit_gemm", "conv_gemm_path"]

_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_UINT8 = 4


def _build_archs() -> str:
    """The CUDA architectures this build compiled ("" without CUDA)."""
    return _C.build_info()["cuda_archs"] or ""


def code_arch(capability: tuple[int, int], archs: str | None = None) -> int | None:
    """The architecture (major * 10 + minor) of the code the CUDA driver loads from a module built
    for ``archs`` (CMake CUDA_ARCHITECTURES entries, ``;`` or ``,`` separated; default: this
    build's) on a GPU of compute capability ``capability``, or None when it holds none the GPU
    runs. SASS runs on GPUs of its major version and an equal or higher minor one (an ``a``/``f``
    target on its own GPU only), and is preferred; else the newest PTX at or below the GPU's, which
    its driver compiles. The native module asks the driver itself (``_C.cuda_code_arch``); this
    is the same rule for a GPU that is not there."""
    if archs is None:
        archs = _build_archs()
    major, minor = capability
    sass, ptx = [], []
    for entry in archs.replace(",", ";").split(";"):
        entry = entry.strip()
        name, _, kind = entry.partition("-")
        digits = name.rstrip("af")
        if not digits.isdigit():
            continue
        number, exact = int(digits), digits != name
        if exact:  # arch-specific code runs on its own GPU only
            sass_runs = ptx_runs = number == 10 * major + minor
        else:
            sass_runs = number // 10 == major and number % 10 <= minor
            ptx_runs = number <= 10 * major + minor
        if sass_runs and kind in ("", "real"):
            sass.append(number)
        if ptx_runs and kind in ("", "virtual"):
            ptx.append(number)
    return max(sass) if sass else max(ptx) if ptx else None


# What the cuda backend needs of the module's code for a device: its gather GEMM and per-element
# pools compile for every target from sm_75 on; the sm_80 kernels (tensor-core GEMMs, tiled pools)
# and clusters (sm_90) are chosen only where the loaded code has them (_C.cuda_code_arch).
MIN_CODE_ARCH = 75
TENSOR_CORE_CODE_ARCH = 80
CLUSTER_CODE_ARCH = 90


def cuda_refusal(device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """Why the cuda backend cannot run on ``device`` (optionally as if it had compute capability
    ``capability``), or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices, not {device.type}"
    if not _C.build_info()["cuda"]:
        return "scott_kernels was built without CUDA (see scott_kernels.build_info())"
    if capability is None:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        arch = _C.cuda_code_arch(index)
    else:
        arch = code_arch(capability) or 0
    sm = f"sm_{capability[0]}{capability[1]}"
    if arch <= 0:
        return (f"this build of scott_kernels holds no CUDA code that a {sm} GPU runs (built for "
                f"{_C.build_info()['cuda_archs']}); rebuild with SCOTT_CUDA_ARCHS including {capability[0]}{capability[1]}")
    if arch < MIN_CODE_ARCH:
        return f"the cuda backend needs code for sm_{MIN_CODE_ARCH} or newer; a {sm} GPU runs sm_{arch} code of this build"
    return None


def cuda_supports(device: torch.device) -> bool:
    """The CUDA kernels run on a CUDA device when the native module was built with nvcc and holds
    code that device runs (``cuda_refusal`` says why not)."""
    device = torch.device(device)
    return device.type == "cuda" and bool(_C.build_info()["cuda"]) and torch.cuda.is_available() \
        and cuda_refusal(device) is None


def kernel_paths(capability: tuple[int, int], archs: str | None = None) -> dict[str, bool]:
    """Which kernel families the cuda backend may choose on a GPU of compute capability
    ``capability`` with a module built for ``archs`` (default: this build's): the rule the native
    module applies to the device it runs on."""
    arch = code_arch(capability, archs) or 0
    runs = arch >= MIN_CODE_ARCH
    return {
        "gather_gemm": runs,                                   # CUDA-core gather GEMM, per-element pools
        "tensor_cores": runs and arch >= TENSOR_CORE_CODE_ARCH,  # implicit + WMMA GEMMs, tiled pools
        "clusters": runs and arch >= CLUSTER_CODE_ARCH and capability[0] >= 9,
    }


def use_tensor_cores(enabled: bool = True) -> None:
    """float16/bfloat16 convolution GEMMs on tensor cores (default) or on the CUDA-core kernel."""
    _C.set_tensor_cores(bool(enabled))


def use_implicit_gemm(enabled: bool = True) -> None:
    """Convolution GEMMs on the implicit path where it applies (default), or always on the gather
    GEMM. Applies to the CUDA kernels and to their C++ twin."""
    _C.set_implicit_gemm(bool(enabled))


def use_tiled_pool(enabled: bool = True) -> None:
    """MaxBlurPool on the tiled kernels where they apply (default), or always on the per-element
    kernels. Applies to the CUDA kernels and to their C++ twin."""
    _C.set_tiled_pool(bool(enabled))


def _on_capability(path: str, fast: str, what: str, slow: str, dtype: torch.dtype,
                   capability: tuple[int, int]) -> str:
    """``path`` (the module's choice off the GPU) on a GPU of ``capability``: ``fast`` (the tiled /
    implicit kernels) needs float16/bfloat16 and sm_80 code of this build, else ``slow: why``."""
    if path != fast:
        return path
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{slow}: {what} float16/bfloat16 only, from sm_80 code"
    if not kernel_paths(capability)["tensor_cores"]:
        return f"{slow}: {what} from sm_80 code only; sm_{capability[0]}{capability[1]} runs {_code_name(capability)}"
    return fast


def pool_path(geometry: "_C.PoolGeometry", dtype: torch.dtype, on_cuda: bool,
              capability: tuple[int, int] | None = None) -> str:
    """``"tiled"`` or ``"elementwise: <why>"``: which kernels a MaxBlurPool runs on; with
    ``capability``, on a GPU of that compute capability running this build (``kernel_paths``)."""
    if capability is None:
        return _C.pool_path(geometry, _CODES[dtype], on_cuda)
    return _on_capability(_C.pool_path(geometry, _CODES[dtype], False), "tiled", "the tiled pool kernels run",
                          "elementwise", dtype, capability)


def _code_name(capability: tuple[int, int]) -> str:
    arch = code_arch(capability)
    return f"sm_{arch} code of this build" if arch else "no code of this build"


_OPS = {"forward": 0, "wgrad": 1, "dgrad": 2}


def conv_gemm_path(geometry: "_C.StageGeometry", dtype: torch.dtype, on_cuda: bool, splits: int = 1,
                   op: str = "forward", capability: tuple[int, int] | None = None) -> str:
    """``"implicit"`` or ``"gather: <why>"``: which GEMM a stage's convolution ``op`` (forward,
    wgrad, dgrad) runs on; with ``capability``, on a GPU of that compute capability running this
    build (``kernel_paths``: the implicit GEMMs need sm_80 code)."""
    if capability is None:
        return _C.conv_gemm_path(geometry, _CODES[dtype], splits, on_cuda, _OPS[op])
    return _on_capability(_C.conv_gemm_path(geometry, _CODES[dtype], splits, False, _OPS[op]), "implicit",
                          "the implicit GEMM runs", "gather", dtype, capability)


def _implicit(g: "_C.StageGeometry", t: torch.Tensor, splits: int = 1, op: str = "forward") -> bool:
    return conv_gemm_path(g, t.dtype, _dev(t), splits, op) == "implicit"


def _image_gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k, k) -> the image kernel's padded (k * 2 * ceil(k/2) * 4, C_out) operand, rows
    (ky, kx, channel) with kx padded to an even count and channels to 4 (zeros)."""
    c_out, c_in, k, _ = weight.shape
    kx_pad = 2 * ((k + 1) // 2)
    padded = torch.nn.functional.pad(weight, (0, kx_pad - k, 0, 0, 0, 4 - c_in))
    return padded.permute(2, 3, 1, 0).reshape(k * kx_pad * 4, c_out).contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it when its data does not start on a 16-byte boundary (the implicit kernels
    read 16-byte vectors)."""
    return t if not _dev(t) or t.data_ptr() % 16 == 0 else t.clone()


def _neighbour_scratch(g: "_C.StageGeometry", like: torch.Tensor) -> torch.Tensor | None:
    """(M, 9) int32 neighbour table the implicit CUDA kernels fill and read (the twin keeps its own)."""
    return torch.empty((g.num_tiles, 9), dtype=torch.int32, device=like.device) if _dev(like) else None


def _implicit_wgrad_splits(g: "_C.StageGeometry", rows: int, device: torch.device, dtype: torch.dtype,
                           src_dtype: int) -> int:
    """Parts of the implicit weight gradient's reduction over output pixels. Compact stages: about
    one wave of (tap, 64 input channels) x 128 output channel blocks at four per SM, at least 1024
    pixels each. The image stage: its persistent blocks (one per SM, at most one per 128 pixels)
    write one partial each, or one per cluster of two blocks where the kernel runs as clusters
    (sm_90 code on a GPU with clusters; it sums the pair through distributed shared memory), so
    there are half as many partials as SMs. The kernel's own test decides, not the GPU's compute
    capability: code from sm_80 (an sm_80-only build, or its PTX on a newer GPU) runs without
    clusters, and half as many partials would leave half the SMs idle."""
    if device.type != "cuda" and not _EMULATED:
        return 1
    sms = (_C.emu_sms() if _EMULATED else
           _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()))
    if g.src_image:
        pairs = 2 if _C.image_wgrad_clusters(_CODES[dtype], src_dtype) else 1
        return max(1, min(-(-rows // (128 * pairs)), sms // pairs, 65535))
    blocks = g.ksize * g.ksize * -(-g.c_in // 64) * -(-g.c_out // 128)
    return max(1, min(-(-rows // 1024), -(-4 * sms // blocks), 65535))


def _runs_on(name: str, t: torch.Tensor) -> None:
    if _dev(t):
        if not _C.build_info()["cuda"]:
            raise RuntimeError(f"{name}: scott_kernels was built without CUDA (see scott_kernels.build_info())")
    elif t.device.type != "cpu":
        raise RuntimeError(f"{name}: runs on CUDA tensors (or CPU tensors, through its C++ twin), got {t.device}")
    elif t.dtype not in (torch.float32, torch.float64, torch.uint8):
        raise TypeError(f"{name}: on the CPU the kernels compute in float32 or float64, got {t.dtype}")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


# The emulated device (tests): CPU tensors run the CUDA kernels themselves, compiled as C++ into
# scott_kernels._emu (tests/emu/build.py), instead of their C++ twin.
_EMULATED = False


def use_emulated_device(enabled: bool = True, module=None) -> None:
    """Route this backend's ops on CPU tensors through ``scott_kernels._emu``, the CUDA kernels
    built for the CPU's emulated device (tests only; ``tests/emu/build.py`` builds it), or through
    ``module``, another build of it (``--define`` values of its own), or back to ``_C`` and the
    C++ twin."""
    global _C, _EMULATED
    if enabled:
        if module is None:
            from . import _emu as module

        _C, _EMULATED = _TrackedModule(module), True
    else:
        from .ops import _C as native

        _C, _EMULATED = native, False


class _TrackedModule:
    """The emulated module, whose kernel entry points first tell it the memory of every tensor in
    the calling op's frame: its kernels' global loads and stores anywhere else are reported."""

    ENTRY_POINTS = {"conv_relu", "conv_relu_wgrad", "conv_relu_dgrad", "max_blur_pool", "max_blur_pool_backward",
                    "gather_tiles", "scatter_tiles", "visible_tables"}

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if name not in self.ENTRY_POINTS:
            return fn

        def tracked(*args):
            import inspect

            frame, ranges = inspect.currentframe().f_back, []
            for _ in range(2):  # the op, and whatever called it through a wrapper
                for value in list(frame.f_locals.values()):
                    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                        storage = value.untyped_storage()
                        ranges.append((storage.data_ptr(), storage.nbytes()))
                frame = frame.f_back
            del frame
            self._module.emu_track(ranges)
            try:
                return fn(*args)
            finally:
                self._module.emu_track([])

        return tracked


def _dev(t: torch.Tensor) -> bool:
    """Whether t's op runs the CUDA kernels: a CUDA tensor, or any tensor on the emulated device."""
    return t.is_cuda or _EMULATED


def _stage(name: str, src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
           in_side: int, src_is_image: bool, pixel_norm: torch.Tensor | None) -> "_C.StageGeometry":
    """Validated geometry of a conv stage."""
    check_tables(name, weight, slot, tile_pos)
    _runs_on(name, weight)
    if weight.dtype not in _CODES or weight.dim() != 4 or weight.shape[2] != weight.shape[3] \
            or weight.shape[2] % 2 == 0:
        raise ValueError(f"{name}: weight must be a floating (C_out, C_in, k, k) tensor with k odd, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    if src.device != weight.device:
        raise ValueError(f"{name}: src is on {src.device} but weight is on {weight.device}")
    B, GH, GW = slot.shape
    c_out, c_in, k, _ = weight.shape
    g = _C.StageGeometry()
    g.num_tiles, g.batch, g.grid_h, g.grid_w = tile_pos.shape[0], B, GH, GW
    g.in_side, g.ksize, g.c_in, g.c_out = in_side, k, c_in, c_out
    if in_side < 2 or in_side % 2:
        raise ValueError(f"{name}: in_side must be even and at least 2, got {in_side}")
    if src_is_image:
        if tuple(src.shape) != (B, c_in, GH * in_side, GW * in_side):
            raise ValueError(f"{name}: expected images ({B}, {c_in}, {GH * in_side}, {GW * in_side}), "
                             f"got {tuple(src.shape)}")
        if src.dtype != weight.dtype and src.dtype != torch.uint8:
            raise TypeError(f"{name}: images are {src.dtype} but weight is {weight.dtype}")
        g.s_b, g.s_c, g.s_h, g.s_w = src.stride()
        g.src_image = True
    else:
        if src.dim() != 4 or tuple(src.shape) != (tile_pos.shape[0], in_side, in_side, c_in) \
                or src.dtype != weight.dtype:
            raise ValueError(f"{name}: expected a compact ({tile_pos.shape[0]}, {in_side}, {in_side}, {c_in}) "
                             f"{weight.dtype} source, got {tuple(src.shape)} {src.dtype}")
    if pixel_norm is not None:
        if not src_is_image or tuple(pixel_norm.shape) != (2, c_in) or pixel_norm.device != weight.device:
            raise ValueError(f"{name}: pixel_norm must be a (2, {c_in}) (mean, 1/std) table for image sources")
        g.normalize = True
    elif src.dtype == torch.uint8:
        raise TypeError(f"{name}: uint8 images need pixel_norm (mean, 1/std)")
    return g


def _norm_table(pixel_norm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if pixel_norm is None:
        return None
    return pixel_norm.to(accumulator_dtype(dtype)).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# --------------------------------------------------------------------------------------------
# conv + ReLU
# --------------------------------------------------------------------------------------------
@custom_op("scott_kernels::cuda_conv_relu", mutates_args=())
def conv_relu(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
              in_side: int, src_is_image: bool, pixel_norm: torch.Tensor | None = None,
              relu: bool = True) -> torch.Tensor:
    """relu(conv(src, weight, stride 2, pad k//2)) at the visible patches -> (M, q/2, q/2, C_out);
    with ``relu=False`` the convolution alone (the ReLU then left to the pool after it)."""
    if not src_is_image:
        src = src.contiguous()
    g = _stage("cuda_conv_relu", src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm)
    implicit = _implicit(g, weight)
    weight_t = _image_gemm_weight(weight) if implicit and src_is_image else gemm_weight(weight)
    norm = _norm_table(pixel_norm, weight.dtype)
    out = torch.empty((g.num_tiles, in_side // 2, in_side // 2, g.c_out), dtype=weight.dtype, device=weight.device)
    if out.numel():
        nbr = _neighbour_scratch(g, out) if implicit else None
        if implicit and not src_is_image:
            src = _aligned(src)
        slot, tile_pos = slot.contiguous(), tile_pos.contiguous()  # (kept alive: the kernels read them)
        _C.conv_relu(g, _CODES[weight.dtype], _UINT8 if src.dtype == torch.uint8 else _CODES[weight.dtype],
                     src.data_ptr(), weight_t.data_ptr(), _ptr(norm), slot.contiguous().data_ptr(),
                     tile_pos.contiguous().data_ptr(), out.data_ptr(), bool(relu), _dev(out), _stream(out),
                     _ptr(nbr))
    return out


@conv_relu.register_fake
def _(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None, relu=True):
    return weight.new_empty((tile_pos.shape[0], in_side // 2, in_side // 2, weight.shape[0]))


@custom_op("scott_kernels::cuda_conv_relu_wgrad", mutates_args=())
def conv_relu_wgrad(grad: torch.Tensor, out: torch.Tensor | None, src: torch.Tensor, weight: torch.Tensor,
                    slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int, src_is_image: bool,
                    pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu with respect to its (C_out, C_in, k, k) weight. ``out`` is the
    forward's output, for the ReLU mask; ``None`` when ``grad`` is already multiplied by relu'."""
    if not src_is_image:
        src = src.contiguous()
    g = _stage("cuda_conv_relu_wgrad", src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm)
    k = g.ksize
    k_total = k * k * g.c_in
    shape = (g.num_tiles, in_side // 2, in_side // 2, g.c_out)
    if tuple(grad.shape) != shape or (out is not None and tuple(out.shape) != shape):
        raise ValueError(f"cuda_conv_relu_wgrad: grad and out must be {shape}, got {tuple(grad.shape)}, "
                         f"{None if out is None else tuple(out.shape)}")
    grad = grad.to(weight.dtype).contiguous()
    out = None if out is None else out.to(weight.dtype).contiguous()
    norm = _norm_table(pixel_norm, weight.dtype)
    rows = g.num_tiles * (in_side // 2) ** 2
    if rows == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    # (the CPU twin computes in float32/float64 only, where the accumulator is the compute dtype)
    nbr = gmask = None
    if _implicit(g, weight, op="wgrad"):
        splits = _implicit_wgrad_splits(g, rows, weight.device, weight.dtype,
                                        _UINT8 if src.dtype == torch.uint8 else _CODES[weight.dtype])
        nbr = _neighbour_scratch(g, weight)
        gmask = torch.empty_like(grad) if _dev(weight) and out is not None else None
        grad, out = _aligned(grad), None if out is None else _aligned(out)
        if not src_is_image:
            src = _aligned(src)
    else:
        splits = reduction_splits(rows, k_total, g.c_out, weight.device, min_rows=1024)
    result = torch.empty((splits, k_total, g.c_out), dtype=accumulator_dtype(weight.dtype), device=weight.device)
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()  # (kept alive: the kernels read them)
    _C.conv_relu_wgrad(g, _CODES[weight.dtype], _UINT8 if src.dtype == torch.uint8 else _CODES[weight.dtype],
                       src.data_ptr(), grad.data_ptr(), _ptr(out), _ptr(norm), slot.contiguous().data_ptr(),
                       tile_pos.contiguous().data_ptr(), result.data_ptr(), splits, _dev(weight), _stream(weight),
                       _ptr(nbr), _ptr(gmask))
    return weight_from_partials(result, weight)


@conv_relu_wgrad.register_fake
def _(grad, out, src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@custom_op("scott_kernels::cuda_conv_relu_dgrad", mutates_args=())
def conv_relu_dgrad(grad: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, slot: torch.Tensor,
                    tile_pos: torch.Tensor, in_side: int) -> torch.Tensor:
    """Gradient of conv_relu with respect to a compact source -> (M, q, q, C_in). ``out`` is the
    forward's output, for the ReLU mask; ``None`` when ``grad`` is already multiplied by relu'."""
    c_out, c_in, k, _ = weight.shape
    fake_src = weight.new_empty((tile_pos.shape[0], in_side, in_side, c_in))
    g = _stage("cuda_conv_relu_dgrad", fake_src, weight, slot, tile_pos, in_side, False, None)
    shape = (g.num_tiles, in_side // 2, in_side // 2, c_out)
    if tuple(grad.shape) != shape or (out is not None and tuple(out.shape) != shape):
        raise ValueError(f"cuda_conv_relu_dgrad: grad and out must be {shape}, got {tuple(grad.shape)}, "
                         f"{None if out is None else tuple(out.shape)}")
    weight_t = gemm_weight_transposed(weight)
    grad = grad.to(weight.dtype).contiguous()
    out = None if out is None else out.to(weight.dtype).contiguous()
    dsrc = torch.empty_like(fake_src)
    if dsrc.numel():
        nbr = gmask = None
        if _implicit(g, dsrc, op="dgrad") and _dev(dsrc):
            nbr, gmask = _neighbour_scratch(g, dsrc), (None if out is None else torch.empty_like(grad))
            grad, out = _aligned(grad), None if out is None else _aligned(out)
        slot, tile_pos = slot.contiguous(), tile_pos.contiguous()  # (kept alive: the kernels read them)
        _C.conv_relu_dgrad(g, _CODES[weight.dtype], grad.data_ptr(), _ptr(out), weight_t.data_ptr(),
                           slot.contiguous().data_ptr(), tile_pos.contiguous().data_ptr(), dsrc.data_ptr(),
                           _dev(dsrc), _stream(dsrc), _ptr(nbr), _ptr(gmask))
    return dsrc


@conv_relu_dgrad.register_fake
def _(grad, out, weight, slot, tile_pos, in_side):
    return weight.new_empty((tile_pos.shape[0], in_side, in_side, weight.shape[1]))




# --------------------------------------------------------------------------------------------
# MaxBlurPool
# --------------------------------------------------------------------------------------------
def _pool(name: str, act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor) -> "_C.PoolGeometry":
    check_tables(name, act, slot, tile_pos)
    _runs_on(name, act)
    if act.dtype not in _CODES or act.dim() != 4 or act.shape[1] != act.shape[2] or act.shape[1] % 2 \
            or act.shape[0] != tile_pos.shape[0]:
        raise ValueError(f"{name}: expected a floating compact ({tile_pos.shape[0]}, s, s, C) tensor with s even, "
                         f"got {tuple(act.shape)} {act.dtype}")
    g = _C.PoolGeometry()
    g.num_tiles, g.batch, g.grid_h, g.grid_w = tile_pos.shape[0], *slot.shape
    g.side, g.channels = act.shape[1], act.shape[3]
    return g


@custom_op("scott_kernels::cuda_max_blur_pool", mutates_args=())
def max_blur_pool(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """MaxBlurPool of compact (M, s, s, C) activations -> (M, s/2, s/2, C); with ``relu`` of
    relu(act) (relu commutes with max, so it is applied to the window maxima), whose gradient
    (max_blur_pool_backward with ``relu_mask``) then carries relu'."""
    act = act.contiguous()
    g = _pool("cuda_max_blur_pool", act, slot, tile_pos)
    out = act.new_empty((g.num_tiles, g.side // 2, g.side // 2, g.channels))
    if out.numel():
        slot, tile_pos = slot.contiguous(), tile_pos.contiguous()  # (kept alive: the kernels read them)
        _C.max_blur_pool(g, _CODES[act.dtype], act.data_ptr(), slot.contiguous().data_ptr(),
                         tile_pos.contiguous().data_ptr(), out.data_ptr(), bool(relu), _dev(out), _stream(out))
    return out


@max_blur_pool.register_fake
def _(act, slot, tile_pos, relu=False):
    return act.new_empty((act.shape[0], act.shape[1] // 2, act.shape[2] // 2, act.shape[3]))


@custom_op("scott_kernels::cuda_max_blur_pool_backward", mutates_args=())
def max_blur_pool_backward(grad: torch.Tensor, act: torch.Tensor, slot: torch.Tensor,
                           tile_pos: torch.Tensor, relu_mask: bool = False) -> torch.Tensor:
    """Gradient of max_blur_pool with respect to its (M, s, s, C) input. With ``relu_mask`` the
    gradient comes multiplied by (act > 0): the gradient of max_blur_pool(act, relu=True) with
    respect to act (equally, for act = relu(y), the gradient with respect to y)."""
    act = act.contiguous()
    g = _pool("cuda_max_blur_pool_backward", act, slot, tile_pos)
    expected = (g.num_tiles, g.side // 2, g.side // 2, g.channels)
    if tuple(grad.shape) != expected:
        raise ValueError(f"cuda_max_blur_pool_backward: grad must be {expected}, got {tuple(grad.shape)}")
    grad = grad.to(act.dtype).contiguous()
    dact = torch.empty_like(act)
    if dact.numel():
        slot, tile_pos = slot.contiguous(), tile_pos.contiguous()  # (kept alive: the kernels read them)
        _C.max_blur_pool_backward(g, _CODES[act.dtype], grad.data_ptr(), act.data_ptr(), slot.contiguous().data_ptr(),
                                  tile_pos.contiguous().data_ptr(), dact.data_ptr(), bool(relu_mask), _dev(dact),
                                  _stream(dact))
    return dact


@max_blur_pool_backward.register_fake
def _(grad, act, slot, tile_pos, relu_mask=False):
    return torch.empty_like(act, memory_format=torch.contiguous_format)


register_stage_autograd(conv_relu, conv_relu_wgrad, conv_relu_dgrad, max_blur_pool, max_blur_pool_backward)


# --------------------------------------------------------------------------------------------
# The visible tables
# --------------------------------------------------------------------------------------------
_COUNT_ERROR = "keep: every row must hold exactly num_visible visible patches"


@custom_op("scott_kernels::cuda_visible_tables", mutates_args=())
def visible_tables(keep: torch.Tensor, num_visible: int, grid_h: int, grid_w: int, radius: int = -1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot (B, GH, GW) int32, tile_pos (B * num_visible,) int64, nbr) of a (B, GH * GW) bool mask
    whose rows each hold ``num_visible`` visible patches, in one launch (``scott_visible_tables``,
    one block per row) and with no host synchronisation: the tables of ``compact.visible_tables``,
    and with ``radius`` >= 0 the tiles' (B * num_visible, 2r+1, 2r+1) neighbour table (else nbr is
    empty). A row with another count gets in-range tables (its first ``num_visible`` patches, or
    missing tiles at the row's first position) and fails the launch on the device; on a CPU tensor
    (the C++ twin) it raises RuntimeError."""
    slot, tile_pos, nbr = new_tables("cuda_visible_tables", keep, num_visible, grid_h, grid_w, radius)
    if _dev(keep) and not _C.build_info()["cuda"]:
        raise RuntimeError("cuda_visible_tables: scott_kernels was built without CUDA (see scott_kernels.build_info())")
    if not _dev(keep) and keep.device.type != "cpu":
        raise RuntimeError(f"cuda_visible_tables: runs on CUDA tensors (or CPU tensors, through its C++ twin), "
                           f"got {keep.device}")
    batch, positions = keep.shape
    if batch and positions:
        keep = keep.contiguous()
        wrong = _C.visible_tables(keep.data_ptr(), batch, positions, num_visible, grid_w, radius, slot.data_ptr(),
                                  tile_pos.data_ptr(), nbr.data_ptr(), _dev(keep), _stream(keep))
        if wrong:
            raise RuntimeError(f"{_COUNT_ERROR} ({wrong} of {batch} rows do not hold {num_visible})")
    return slot, tile_pos, nbr


@visible_tables.register_fake
def _(keep, num_visible, grid_h, grid_w, radius=-1):
    return new_tables("cuda_visible_tables", keep, num_visible, grid_h, grid_w, radius)


def tables_for(keep: torch.Tensor | None, batch: int, grid_h: int, grid_w: int, device: torch.device,
               num_visible: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, tile_pos) with ``compact.visible_tables``'s signature: one ``scott_visible_tables``
    launch where the visible count is given, else the torch ops of ``compact.visible_tables``."""
    if keep is None or num_visible is None:
        return compact_visible_tables(keep, batch, grid_h, grid_w, device, num_visible)
    slot, tile_pos, _ = visible_tables(keep.reshape(batch, grid_h * grid_w), num_visible, grid_h, grid_w)
    return slot, tile_pos


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
def _stage_conv(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm):
    return conv_relu(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm, False)


def _stage_pool(act, slot, tile_pos):
    return max_blur_pool(act, slot, tile_pos, True)


def cuda_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None, patch_size: int,
                  num_visible: int | None = None, packed: bool = False,
                  pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The tokenizer through the native kernels (see ``compact.tokenize_compact``); on a CPU
    tensor it runs their C++ twin (float32/float64)."""
    return tokenize_compact(_stage_conv, _stage_pool, x, weights, keep, patch_size, num_visible, packed, pixel_norm,
                            tables=tables_for)
