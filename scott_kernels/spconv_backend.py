"""The SCOTT tokenizer computed with spconv, the general sparse-convolution library.

A peer for comparison (``backend="spconv"``, never chosen by ``"auto"``): the same function as
every backend (design: mask after each convolution and after each whole MaxBlurPool), computed
on spconv's sparse tensors — a list of active pixel coordinates (batch, y, x) and one feature row
per active pixel — where the active pixels at each resolution are the pixels of the visible
patches. Install with ``pip install "scott-kernels[spconv]"``.

spconv computes a sparse convolution from a *rulebook*: for every kernel tap, the (input row,
output row) pairs it connects, built with hash tables from the coordinates (index generation).
The rulebooks here depend only on the mask and the shapes, so ``spconv_plan`` builds every one
of them up front and ``spconv_apply`` runs the features through them; ``spconv_tokenize`` does
both. Index generation is paid once per new mask, i.e. on every training step.

Per stage, input resolution r (active: the visible pixels at r):

conv   spconv's strided sparse convolution (stride 2, padding k//2). spconv's own output set for
       a strided convolution is every pixel that any active input reaches: a 1-2 pixel ring into
       masked neighbours (for the second stage of the 16-pixel stack, whole masked patches next
       to a visible one). The contract masks those outputs, so the output set is narrowed to the
       visible pixels at r/2 (where it is larger: with keep=None it is the same set, and spconv's
       own rulebook is used as it is):
       - native algorithm (CPU): its rulebook is plain pair lists, so the pairs that land on a
         masked output are dropped before the convolution and only visible outputs are computed;
       - implicit GEMM (CUDA): its pair tables also carry per-output tap bitmasks and sort orders
         that spconv builds internally, with no public way to build them for a chosen output set,
         so the convolution runs over spconv's own output set and the visible rows are kept (the
         others get zero gradient).
ReLU   on the feature rows.
max    spconv's sparse max-pool, 2x2, stride 1, no padding, over spconv's natural output set. It
       takes the maximum over the *active* pixels of each window. After the ReLU every value is
       >= 0 and the dense emulation holds 0 at masked pixels, so that is exactly the dense
       max-pool of the masked map; a window with no visible pixel is absent (0 in the dense map
       too). This reproduces detail (a) of the design: the position just before a visible patch
       holds max(neighbour pixel, own pixel) when the neighbour is visible and the patch's own
       pixel when it is masked. The pooled map's spatial shape is r/2 - 1 like the dense one, so
       the blur's zero padding applies at the image border only. Its output set is the visible
       pixels plus the 1-pixel ring before them that the blur reads, so nothing is narrowed.
blur   the depthwise 3x3 binomial blur, stride 2, padding 1. spconv has no depthwise convolution
       (a SparseConv2d with a diagonal C x C weight would cost C times the multiply-adds), so
       spconv builds the window's rulebook (narrowed to the visible pixels at r/4 like the conv's)
       and the fixed taps are applied with one gather and one ``index_add``: 9 multiply-adds per
       output value, as many as a dense depthwise blur over the same pixels.

The max-pool and the blur use the native rulebook on every device: the blur's gather needs
plain (input, output) pairs, and a 4-tap max gains nothing from implicit-GEMM tables; the
implicit GEMM is used where the arithmetic is, in the convolutions.

Data types: spconv has float16, float32 and float64 kernels (float64 on the CPU, which is what
the tests use) but no bfloat16. Under autocast the tokenizer computes in float16, as spconv's
own autocast rule does, and returns the autocast dtype; bfloat16 tensors outside autocast are
refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch

__all__ = ["spconv_tokenize", "spconv_plan", "spconv_apply", "spconv_supports", "require_spconv", "SpconvPlan",
           "INSTALL_HINT"]

INSTALL_HINT = 'pip install "scott-kernels[spconv]"'

_SPCONV: SimpleNamespace | BaseException | None = None
_BLUR_TAPS = (1.0, 2.0, 1.0)


def _load() -> SimpleNamespace | BaseException:
    """Imports spconv once (loading its compiled library takes seconds); the error if it fails."""
    global _SPCONV
    if _SPCONV is None:
        try:
            with warnings.catch_warnings():
                # spconv 2.3 decorates its autograd functions with torch.cuda.amp.custom_fwd, which
                # recent torch deprecates: a warning about spconv, not about this package
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)   # its build tools, at import
                import spconv.pytorch.functional as spconv_functional
                from spconv.pytorch import ConvAlgo, ops
                from spconv.tools import CUDAKernelTimer
            _SPCONV = SimpleNamespace(ops=ops, F=spconv_functional, ConvAlgo=ConvAlgo, timer=CUDAKernelTimer(False))
        except Exception as error:   # not installed, or its compiled library does not load here
            _SPCONV = error
    return _SPCONV


def require_spconv() -> SimpleNamespace:
    """spconv's modules; raises ImportError naming the extra to install when it does not import."""
    loaded = _load()
    if isinstance(loaded, BaseException):
        raise ImportError(f"backend 'spconv' needs the spconv package, which did not import ({loaded!r}); "
                          f"install the extra: {INSTALL_HINT}") from loaded
    return loaded


def spconv_supports(device: torch.device) -> bool:
    """spconv imports and runs on ``device`` (CPU: native algorithm; CUDA: implicit GEMM)."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        return False
    return not isinstance(_load(), BaseException)


@dataclass
class SpconvPlan:
    """Every rulebook of one mask and shape: ``spconv_plan``'s output, ``spconv_apply``'s input."""

    batch: int
    height: int
    width: int
    patch_size: int
    kernel_sizes: tuple[int, ...]
    device: torch.device
    algo: str                       # "native" or "implicit_gemm" (the convolutions)
    train: bool                     # implicit GEMM: tables for the backward pass were built
    pixels: torch.Tensor | None     # (B, H, W) bool visible pixels of the image; None: all
    stages: list[dict]
    token_rows: torch.Tensor | None  # (K,) flat b * N + n of each visible token's row
    empty: bool                     # no visible patch at all


def _visible_pixels(keep: torch.Tensor, side: int) -> torch.Tensor:
    """(B, GH, GW) patch mask -> (B, GH*side, GW*side) pixel mask (nearest upsampling)."""
    B, GH, GW = keep.shape
    return keep[:, :, None, :, None].expand(B, GH, side, GW, side).reshape(B, GH * side, GW * side)


def _coords(pixels: torch.Tensor) -> torch.Tensor:
    """Row-major (n, 3) int32 (batch, y, x) of the True pixels: spconv's index layout.

    ``nonzero`` returns a column-major tensor; spconv reads the raw buffer as row-major, so the
    copy to a contiguous one is required, not cosmetic."""
    return pixels.nonzero().to(torch.int32).contiguous()


def _row_table(pixels: torch.Tensor) -> torch.Tensor:
    """(B, h, w) int64: the row of each True pixel in row-major order, -1 elsewhere."""
    flat = pixels.reshape(-1)
    rows = torch.cumsum(flat, 0) - 1
    return torch.where(flat, rows, -1).view(pixels.shape)


def _lookup(table: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    c = coords.long()
    return table[c[:, 0], c[:, 1], c[:, 2]]


def _rulebook_pairs(pairs: torch.Tensor, counts: torch.Tensor, new_of_old: torch.Tensor | None):
    """The native rulebook as flat (tap, input row, output row) vectors.

    ``pairs`` is (2, taps, n): tap t's pairs are its first ``counts[t]`` entries; only those
    prefixes are read. With ``new_of_old`` (spconv output row -> kept row, or -1) the pairs whose
    output is not kept are dropped and the outputs renumbered. A few whole-tensor operations
    rather than a loop over taps: on the CPU per-operation overhead dominates such small work.
    """
    taps, n = pairs.shape[1], pairs.shape[2]
    counts = counts.to(device=pairs.device, dtype=torch.int64)
    tap = torch.repeat_interleave(torch.arange(taps, device=pairs.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    where = torch.arange(tap.shape[0], device=pairs.device) - starts[tap] + tap * n   # into (taps * n)
    flat = pairs.reshape(2, taps * n)[:, where].long()
    src, dst = flat[0], flat[1]
    if new_of_old is not None:
        dst = new_of_old[dst]
        kept = (dst >= 0).nonzero().squeeze(1)
        tap, src, dst = tap[kept], src[kept], dst[kept]
    return tap, src, dst


def _packed_rulebook(tap: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, taps: int, like: torch.Tensor):
    """Flat pairs (grouped by tap, in order) -> spconv's native layout: (2, taps, n) with each
    tap's pairs first and -1 after, and the per-tap counts."""
    counts = torch.bincount(tap, minlength=taps)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(tap.shape[0], device=tap.device) - starts[tap]
    packed = torch.full((2, taps, max(int(counts.max()), 1)), -1, dtype=like.dtype, device=like.device)
    packed[0, tap, slot] = src.to(like.dtype)
    packed[1, tap, slot] = dst.to(like.dtype)
    return packed, counts


def _narrowed(ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """spconv's output set ``ids`` against the visible ``pixels`` at that resolution.

    Returns (spconv row -> visible row or -1, the visible coordinates) when spconv's set is
    larger, or (None, ``ids``) when it is the visible set already (nothing masked within reach,
    e.g. keep=None): then spconv's own rows and order are kept and nothing is narrowed. A visible
    output always reads a visible input (its own patch), so spconv's set contains the visible one.
    """
    n_visible = int(pixels.sum())
    if ids.shape[0] == n_visible:
        return None, ids
    return _lookup(_row_table(pixels), ids), _coords(pixels)


def spconv_plan(keep: torch.Tensor | None, batch: int, height: int, width: int, patch_size: int,
                kernel_sizes: Sequence[int], device: torch.device | str, *, algo: str | None = None,
                train: bool = True) -> SpconvPlan:
    """spconv's index generation for one mask: every rulebook of every stage (host-synchronising).

    ``algo``: "native" or "implicit_gemm" for the convolutions; default native on the CPU and
    implicit GEMM on CUDA (spconv's native CUDA path is its slow fallback). ``train=False``
    skips the implicit-GEMM tables of the backward pass (inference only).
    """
    sp = require_spconv()
    device = torch.device(device)
    algo = algo or ("implicit_gemm" if device.type == "cuda" else "native")
    if algo not in ("native", "implicit_gemm"):
        raise ValueError(f"algo must be 'native' or 'implicit_gemm', got {algo!r}")
    if algo == "implicit_gemm" and device.type != "cuda":
        raise ValueError("algo='implicit_gemm' needs a CUDA device: spconv's implicit GEMM has no CPU kernels")
    GH, GW = height // patch_size, width // patch_size
    grid = (torch.ones(batch, GH, GW, dtype=torch.bool, device=device) if keep is None
            else keep.view(batch, GH, GW).to(device))
    empty = keep is not None and not bool(grid.any())
    plan = SpconvPlan(batch, height, width, patch_size, tuple(kernel_sizes), device, algo, train,
                      None if keep is None else _visible_pixels(grid, patch_size), [], None, empty)
    if empty:   # spconv refuses empty index sets; apply() returns zeros
        return plan
    native = sp.ConvAlgo.Native
    binomial = torch.tensor(_BLUR_TAPS, dtype=torch.float64)
    blur_taps = (binomial[:, None] * binomial[None, :] / 16.0).reshape(-1)     # tap = ky * 3 + kx
    side, h, w = patch_size, height, width
    coords = _coords(_visible_pixels(grid, side))      # the image's feature rows: row-major
    for k in kernel_sizes:
        stage = {}
        conv_pixels = _visible_pixels(grid, side // 2)
        conv_args = ([k, k], [2, 2], [k // 2, k // 2], [1, 1], [0, 0])
        if algo == "native":
            ids, pairs, counts = sp.ops.get_indice_pairs(coords, batch, [h, w], native, *conv_args, False, False)
            new_of_old, coords = _narrowed(ids, conv_pixels)
            if new_of_old is not None:
                kept_pairs = _rulebook_pairs(pairs, counts, new_of_old)
                pairs, new_counts = _packed_rulebook(*kept_pairs, pairs.shape[1], pairs)
                counts = new_counts.to(counts.dtype).to(counts.device)
            stage["conv"] = (pairs, counts, coords.shape[0])
        else:
            res = sp.ops.get_indice_pairs_implicit_gemm(
                coords, batch, [h, w], sp.ConvAlgo.MaskImplicitGemm, ksize=[k, k], stride=[2, 2],
                padding=[k // 2, k // 2], dilation=[1, 1], out_padding=[0, 0], subm=False, transpose=False,
                is_train=train)
            new_of_old, coords = _narrowed(res[0], conv_pixels)
            rows = None
            if new_of_old is not None:   # which spconv rows are the visible pixels, in their order
                rows = torch.empty(coords.shape[0], dtype=torch.int64, device=device)
                kept = new_of_old >= 0
                rows[new_of_old[kept]] = kept.nonzero().squeeze(1)
            stage["conv"] = (res, res[0].shape[0], rows)
        h, w = h // 2, w // 2
        pool_ids, pool_pairs, pool_counts = sp.ops.get_indice_pairs(
            coords, batch, [h, w], native, [2, 2], [1, 1], [0, 0], [1, 1], [0, 0], False, False)
        stage["pool"] = (pool_pairs, pool_counts, pool_ids.shape[0])
        blur_ids, blur_pairs, blur_counts = sp.ops.get_indice_pairs(
            pool_ids.contiguous(), batch, [h - 1, w - 1], native, [3, 3], [2, 2], [1, 1], [1, 1], [0, 0], False, False)
        new_of_old, coords = _narrowed(blur_ids, _visible_pixels(grid, side // 4))
        tap, src, dst = _rulebook_pairs(blur_pairs, blur_counts, new_of_old)
        stage["blur"] = (src, dst, blur_taps.to(device)[tap], coords.shape[0])
        plan.stages.append(stage)
        side, h, w = side // 4, h // 2, w // 2
    c = coords.long()     # the tokens' rows: (batch, gy, gx) -> b * N + gy * GW + gx
    plan.token_rows = (c[:, 0] * GH + c[:, 1]) * GW + c[:, 2]
    return plan


def _compute_dtype(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple[torch.dtype, torch.dtype]:
    """(dtype spconv computes in, dtype of the returned tokens)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        out = torch.get_autocast_dtype(kind)
        # spconv's own rule under autocast: float16 (it has no bfloat16 kernels)
        return (torch.float16 if out in (torch.float16, torch.bfloat16) else out), out
    dtype = x.dtype if x.is_floating_point() else weights[0].dtype
    if dtype == torch.bfloat16:
        raise TypeError("backend 'spconv': spconv has no bfloat16 kernels; give float16, float32 or float64 "
                        "tensors, or run under torch.autocast (it then computes in float16)")
    return dtype, dtype


def _connected_zeros(shape, weights: Sequence[torch.Tensor], dtype, device) -> torch.Tensor:
    """Zeros that keep the autograd graph to the weights (gradient exactly 0), like the dense path.

    An empty slice's sum is exactly 0 whatever the weights hold (no 0 * inf)."""
    anchor = sum(w.reshape(-1)[:0].sum() for w in weights)
    return torch.zeros(shape, dtype=dtype, device=device) + anchor.to(dtype)


def spconv_apply(x: torch.Tensor, weights: Sequence[torch.Tensor], plan: SpconvPlan) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, D) tokens through the rulebooks of ``plan``."""
    sp = require_spconv()
    B, C, H, W = x.shape
    kernels = tuple(w.shape[-1] for w in weights)
    if (B, H, W) != (plan.batch, plan.height, plan.width) or kernels != plan.kernel_sizes or x.device != plan.device:
        raise ValueError(f"plan was built for {plan.batch}x{plan.height}x{plan.width} images on {plan.device} and "
                         f"kernel sizes {plan.kernel_sizes}, got images {tuple(x.shape)} on {x.device} and "
                         f"kernel sizes {kernels}")
    dtype, out_dtype = _compute_dtype(x, weights)
    N, D = (H // plan.patch_size) * (W // plan.patch_size), weights[-1].shape[0]
    if plan.empty:
        return _connected_zeros((B, N, D), weights, out_dtype, x.device)
    # spconv's autograd functions cast to float16 under CUDA autocast: the dtype is chosen above,
    # so autocast is off inside
    with torch.autocast(x.device.type, enabled=False):
        image = x.to(dtype).permute(0, 2, 3, 1)
        feats = image.reshape(-1, C) if plan.pixels is None else image[plan.pixels]   # row-major pixels
        for weight, stage in zip(weights, plan.stages):
            krsc = weight.to(dtype).permute(0, 2, 3, 1).contiguous()   # spconv's (C_out, ky, kx, C_in)
            if plan.algo == "native":
                pairs, counts, n_out = stage["conv"]
                y = sp.F.indice_conv(feats.contiguous(), krsc, pairs, counts, n_out, sp.ConvAlgo.Native, sp.timer)
            else:
                res, n_spconv, rows = stage["conv"]
                y = sp.F.implicit_gemm(feats.contiguous(), krsc, res[2], res[3], res[4], res[5], res[6], res[7],
                                       n_spconv, res[8], plan.train, False, sp.timer)
                y = y if rows is None else y[rows]
            y = torch.relu(y)
            pool_pairs, pool_counts, n_pool = stage["pool"]
            y = sp.F.indice_maxpool(y.contiguous(), pool_pairs, pool_counts, n_pool)
            src, dst, tap, n_blur = stage["blur"]
            feats = y.new_zeros(n_blur, y.shape[1]).index_add(0, dst, y[src] * tap.to(dtype)[:, None])
        tokens = feats.new_zeros(B * N, D).index_copy(0, plan.token_rows, feats).view(B, N, D)
    return tokens.to(out_dtype)


def spconv_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None,
                    patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, D) tokens with spconv: index generation for ``keep``, then the
    convolutions. Inputs are assumed validated (see ``scott_kernels.functional``)."""
    B, _, H, W = x.shape
    plan = spconv_plan(keep, B, H, W, patch_size, [w.shape[-1] for w in weights], x.device,
                       train=torch.is_grad_enabled())
    return spconv_apply(x, weights, plan)
