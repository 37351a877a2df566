"""Functional entry point: validation, backend choice, dispatch."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .compact import accumulator_dtype, visible_positions
from .ops import native_supports
from .reference import reference_tokenize
from .torch_backend import torch_tokenize
from .cuda_backend import cuda_refusal, cuda_supports, cuda_tokenize
from .triton_backend import triton_supports, triton_tokenize
from .spconv_backend import require_spconv, spconv_supports, spconv_tokenize

__all__ = ["sparse_conv_tokenize", "token_epilogue", "available_backends", "select_backend", "BACKENDS", "check_inputs",
           "keep_from_indices", "resolve_keep", "order_like_indices"]


# name -> (implementation, which devices it runs on)
BACKENDS: dict[str, tuple[Callable, Callable[[torch.device], bool]]] = {
    "reference": (reference_tokenize, lambda device: True),
    "torch": (torch_tokenize, native_supports),
    "triton": (triton_tokenize, triton_supports),
    "cuda": (cuda_tokenize, cuda_supports),
    "spconv": (spconv_tokenize, spconv_supports),   # optional extra [spconv]
}
# "auto" tries these in order: fastest first. The cuda backend has not been timed against triton
# on a GPU yet, so triton comes first.
_AUTO_ORDER = ("triton", "cuda", "torch", "reference")
# peers for comparison: listed where they run, never chosen by "auto"
_PEERS = ("spconv",)
# backends built on the compact visible-patch kernels: they take num_visible/packed/pixel_norm
_COMPACT = {"triton": triton_tokenize, "cuda": cuda_tokenize}
# backends whose last kernel applies the token epilogue itself (the others get token_epilogue after)
_FUSED_EPILOGUE = {"triton": triton_tokenize}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that run on ``device``: those "auto" picks from, fastest first, then the peers
    (spconv, when it imports)."""
    return _auto_candidates(torch.device(device)) + [name for name in _PEERS if BACKENDS[name][1](device)]


def _auto_candidates(device: torch.device) -> list[str]:
    # Triton on the CPU is its interpreter: correct but far too slow to choose automatically
    return [name for name in _AUTO_ORDER if BACKENDS[name][1](device)
            and not (name == "triton" and device.type == "cpu")]


def select_backend(backend: str, device: torch.device | str) -> str:
    """Resolves ``backend`` ("auto" or a name) for ``device``; raises if it cannot run there."""
    device = torch.device(device)
    if backend == "auto":
        return _auto_candidates(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if backend == "spconv":
        require_spconv()   # an optional extra: the error names it
    if not BACKENDS[backend][1](device):
        why = cuda_refusal(device) if backend == "cuda" and device.type == "cuda" else None
        raise RuntimeError(f"backend {backend!r} does not run on {device} in this build"
                           + (f" ({why})" if why else "") + "; "
                           f"available there: {available_backends(device)} (see scott_kernels.build_info())")
    return backend


def num_stages_for(patch_size: int) -> int:
    """Stages that map a patch to one token: each stage divides the side by 4 (conv + pool)."""
    stages, side = 0, patch_size
    while side > 1 and side % 4 == 0:
        side //= 4
        stages += 1
    if side != 1:
        raise ValueError(f"patch_size must be a power of 4 (4, 16, 64, ...): each stage halves twice "
                         f"(stride-2 conv, stride-2 pool) and a patch must end as one token; got {patch_size}")
    return stages


def check_inputs(x, weights: Sequence[torch.Tensor], keep, patch_size: int, num_visible=None) -> None:
    """Raises TypeError/ValueError naming the argument and what was expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES + (torch.uint8,):
        raise TypeError(f"images must be uint8, float16, bfloat16, float32 or float64, got {x.dtype}")
    B, C, H, W = x.shape
    if B == 0:
        raise ValueError("images: empty batch (B = 0)")
    if H == 0 or W == 0 or H % patch_size or W % patch_size:
        raise ValueError(f"images: height and width must be positive multiples of patch_size={patch_size}, "
                         f"got {H}x{W}")
    stages = num_stages_for(patch_size)
    if len(weights) != stages:
        raise ValueError(f"weights: patch_size={patch_size} needs {stages} conv stages, got {len(weights)}")
    autocast = torch.is_autocast_enabled(x.device.type) if hasattr(torch, "is_autocast_enabled") else False
    in_channels = C
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (C_out, C_in, k, k) tensor")
        k = w.shape[-1]
        if w.shape[-2] != k or k % 2 == 0:
            raise ValueError(f"{name}: kernel must be square with an odd size, got {tuple(w.shape[-2:])}")
        if w.shape[1] != in_channels:
            what = "images have" if i == 0 else f"weights[{i - 1}] produces"
            raise ValueError(f"{name} expects {w.shape[1]} input channels but {what} {in_channels}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but images are on {x.device}")
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {w.dtype}")
        if w.dtype != x.dtype and not autocast and x.dtype != torch.uint8:
            raise TypeError(f"{name} has dtype {w.dtype} but images have {x.dtype} "
                            "(cast the module, or run under torch.autocast)")
        in_channels = w.shape[0]
    if keep is not None:
        n = (H // patch_size) * (W // patch_size)
        check_keep(keep, B, n, x.device, num_visible, f"{H}x{W} images and patch_size={patch_size}")
    if num_visible is not None:
        n = (H // patch_size) * (W // patch_size)
        if isinstance(num_visible, bool) or not isinstance(num_visible, int):
            raise TypeError(f"num_visible must be an int (visible patches per row) or None, "
                            f"got {type(num_visible).__name__}")
        if not 0 <= num_visible <= n:
            raise ValueError(f"num_visible must be in [0, N={n}], got {num_visible}")
        if keep is None and num_visible != n:
            raise ValueError(f"num_visible={num_visible} but keep is None (every one of the {n} patches visible)")
        if keep is not None and not is_index_keep(keep):
            _check_row_counts(keep, num_visible)


def _check_row_counts(keep: torch.Tensor, num_visible: int) -> None:
    """On the CPU (where reading the counts costs nothing) a bool ``keep`` whose rows do not each hold
    ``num_visible`` patches raises ValueError naming the first such row. On a GPU the check stays
    an asynchronous device assertion (see ``compact.visible_tables``): no host synchronisation."""
    if keep.device.type != "cpu" or torch.compiler.is_compiling():
        return
    counts = keep.sum(1)
    bad = (counts != num_visible).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"keep: row {row} holds {int(counts[row])} visible patches but num_visible={num_visible} "
                         "(every row must hold exactly num_visible)")


_INDEX_DTYPES = (torch.int64, torch.int32)


def is_index_keep(keep) -> bool:
    """True for the index form of a mask: (B, K) integer indices of the kept patches."""
    return isinstance(keep, torch.Tensor) and keep.dtype in _INDEX_DTYPES


def check_keep(keep, batch: int, num_patches: int, device: torch.device, num_visible=None, grid: str = "") -> None:
    """Shape, dtype and device of a mask in either form (the index values are checked by
    ``keep_from_indices``)."""
    where = f" for {grid}" if grid else ""
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be a torch.Tensor or None, got {type(keep).__name__}")
    if is_index_keep(keep):
        if keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] > num_patches:
            raise ValueError(f"keep as indices must have shape (B, K) = ({batch}, K <= {num_patches}){where}, "
                             f"got {tuple(keep.shape)}")
        if num_visible is not None and num_visible != keep.shape[1]:
            raise ValueError(f"num_visible={num_visible} but keep holds K={keep.shape[1]} indices per row "
                             "(with indices, num_visible is implied by K and may be left out)")
    elif keep.dtype != torch.bool:
        raise TypeError("keep must be a (B, N) bool mask (True = visible) or (B, K) int64 indices of the kept "
                        f"patches, got {keep.dtype}" + (" (for a 0/1 mask pass keep.bool())"
                                                         if not keep.is_floating_point() else ""))
    elif tuple(keep.shape) != (batch, num_patches):
        raise ValueError(f"keep must have shape (B, N) = ({batch}, {num_patches}){where}, got {tuple(keep.shape)}")
    if keep.device != device:
        raise ValueError(f"keep is on {keep.device} but images are on {device}")


def keep_from_indices(ids_keep: torch.Tensor, num_patches: int, *, sync_check: bool = False) -> torch.Tensor:
    """(B, K) indices of the kept patches (MAE's ``ids_keep``, I-JEPA's mask indices) -> the
    (B, N) bool mask, built on the indices' device by a scatter.

    Out-of-range and repeated indices are errors. On CPU tensors they raise ValueError at once.
    On a GPU the check is a device-side assertion (``torch._assert_async``), so the conversion
    never waits for the GPU: a bad index fails the next synchronising call with a CUDA
    "device-side assert" error, which leaves the CUDA context unusable, as any out-of-bounds
    index in torch does. ``sync_check=True`` checks on the host on every device instead (reads
    the verdict back, i.e. synchronises) and raises ValueError naming the row and index.
    """
    B, K = ids_keep.shape
    ids = ids_keep.long()
    in_range = (ids >= 0) & (ids < num_patches)
    # clamped so that a bad index cannot write outside the mask before the check fires
    keep = torch.zeros(B, num_patches, dtype=torch.bool, device=ids.device)
    keep.scatter_(1, ids.clamp(0, max(num_patches - 1, 0)), True)
    unique = keep.sum(1) == K   # in range and K distinct indices <=> K patches set
    if sync_check or (ids.device.type == "cpu" and not torch.compiler.is_compiling()):
        if not bool(in_range.all()):
            row, col = (~in_range).nonzero()[0].tolist()
            raise ValueError(f"keep: index {int(ids[row, col])} at row {row} is out of range for "
                             f"N={num_patches} patches")
        if not bool(unique.all()):
            row = int((~unique).nonzero()[0])
            values, counts = ids[row].unique(return_counts=True)
            raise ValueError(f"keep: row {row} repeats patch indices {values[counts > 1].tolist()}; "
                             "kept indices must be distinct")
    else:
        torch._assert_async(in_range.all(), f"scott_kernels: keep holds a patch index outside [0, {num_patches})")
        torch._assert_async(unique.all(), "scott_kernels: keep repeats a patch index within a row")
    return keep


def resolve_keep(keep: torch.Tensor | None, num_patches: int, num_visible: int | None = None):
    """Either form of a mask -> (bool mask or None, num_visible, indices or None); the indices
    come back only for the index form, to order packed tokens like them."""
    if keep is None or not is_index_keep(keep):
        return keep, num_visible, None
    return keep_from_indices(keep, num_patches), keep.shape[1], keep


def order_like_indices(packed: torch.Tensor, keep: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """(B, K, D) tokens in row-major patch order -> the order of ``ids_keep``: out[:, j] is the
    token of patch ids_keep[:, j], as ``tokens.gather(1, ids_keep)`` would give."""
    rank = keep.long().cumsum(1) - 1           # position of each kept patch in row-major order
    slot = rank.gather(1, ids_keep.long())
    return packed.gather(1, slot.unsqueeze(-1).expand(-1, -1, packed.shape[-1]))


def pixel_norm_table(pixel_mean, pixel_std, channels: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor | None:
    """(2, C) table (mean, 1/std) from per-channel sequences or tensors; None when both are None."""
    if pixel_mean is None and pixel_std is None:
        return None
    if pixel_mean is None or pixel_std is None:
        raise ValueError("pixel_mean and pixel_std go together: give both or neither")
    table_dtype = accumulator_dtype(dtype)
    rows = []
    for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
        t = torch.as_tensor(value, dtype=table_dtype, device=device).reshape(-1)
        if t.numel() != channels:
            raise ValueError(f"{name} must have one value per image channel ({channels}), got {t.numel()}")
        rows.append(t)
    if not torch.compiler.is_compiling() and rows[1].device.type == "cpu" and bool((rows[1] <= 0).any()):
        raise ValueError(f"pixel_std must be positive, got {rows[1].tolist()}")
    return torch.stack([rows[0], 1.0 / rows[1]])


def _normalised(x: torch.Tensor, weights, table: torch.Tensor | None) -> torch.Tensor:
    """The images the plain-torch backends see: cast to the compute dtype and normalised."""
    dtype = x.dtype if x.is_floating_point() else weights[0].dtype
    if table is None:
        return x.to(dtype)
    mean, inv_std = (t.view(1, -1, 1, 1) for t in table)
    return ((x.to(table.dtype) - mean) * inv_std).to(dtype)


def _common_row_count(keep: torch.Tensor) -> int:
    """The number of visible patches every row of ``keep`` holds (reads it back from the device)."""
    counts = keep.sum(1)
    count = int(counts[0])
    if bool((counts != count).any()):
        raise ValueError("packed=True needs the same number of visible patches in every row of keep, "
                         f"got counts {counts.tolist()}")
    return count


def _pack_visible(tokens: torch.Tensor, keep: torch.Tensor | None, num_visible: int | None) -> torch.Tensor:
    """(B, N, D) -> (B, K, D): each row's visible tokens in row-major order."""
    if keep is None:
        return tokens
    if num_visible is None:
        num_visible = _common_row_count(keep)
    positions = visible_positions(keep, num_visible)
    return tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def sparse_conv_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None = None,
                         *, patch_size: int = 16, backend: str = "auto", num_visible: int | None = None,
                         packed: bool = False, pixel_mean=None, pixel_std=None, norm=None,
                         pos_embed: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """SCOTT tokenizer: (B, C, H, W) images -> (B, N, D) tokens, computed over visible patches.

    Args:
        x: images, H and W multiples of ``patch_size``.
        weights: one (C_out, C_in, k, k) conv weight per stage (k odd, no bias); a stage is
            conv(stride 2, pad k//2) -> ReLU -> MaxBlurPool, and ``patch_size == 4 ** stages``.
        keep: (B, N) bool, True = visible patch, row-major over the patch grid; or (B, K) int64
            indices of the kept patches (MAE's ``ids_keep``, I-JEPA's context-mask indices),
            distinct within a row, turned into the bool mask on the device (K is the visible
            count: no host synchronisation; see ``keep_from_indices`` for how bad indices are
            caught); None = all visible (the plain dense stack, no masking).
        backend: "auto" (fastest available), "triton", "cuda", "torch" or "reference"; or
            "spconv" (the general sparse-convolution library, for comparison; extra [spconv]).
        num_visible: visible patches in every row of ``keep``, when the caller knows it (the usual
            fixed-ratio masks): the triton and cuda backends then run with no host
            synchronisation, so under CUDA graphs and ``torch.compile(fullgraph=True)``.
        packed: return (B, K, D) tokens of the visible patches only, for encoders that drop
            masked tokens, instead of (B, N, D): in row-major patch order for a bool ``keep``, in
            the order of the indices for index ``keep`` (``out[:, j]`` is patch ``keep[:, j]``,
            as MAE's ``gather(x, 1, ids_keep)`` orders them).
        pixel_mean, pixel_std: per-channel normalisation of the images, in their own units (for
            uint8 images e.g. 255 * ImageNet's mean and std): the convolution sees
            (x - mean) / std; the triton and cuda backends do it while loading, so uint8 images
            go in as they are. uint8 images compute in the weights' dtype (or the autocast dtype).
        norm, pos_embed, mask_token: the token epilogue of a ViT's embedding, applied to the
            tokenizer's output: ``norm = (weight, bias, eps)`` a LayerNorm over D of the visible
            tokens (weight/bias may be None), then ``pos_embed`` (N, D) added at each token's
            position; masked positions hold ``mask_token`` (D,) + its position embedding, or 0
            when no mask token is given. The triton backend computes it in its last pool
            kernel as it stores the tokens (forward and backward); the other backends apply
            torch ops after their kernels (Inductor fuses them under torch.compile).
    Without a mask token, masked tokens are exactly 0; no value from a masked patch reaches a
    visible token.
    """
    check_inputs(x, weights, keep, patch_size, num_visible)
    keep, num_visible, ids_keep = resolve_keep(keep, (x.shape[2] // patch_size) * (x.shape[3] // patch_size),
                                               num_visible)
    name = select_backend(backend, x.device)
    table = pixel_norm_table(pixel_mean, pixel_std, x.shape[1], weights[0].dtype, x.device)
    if packed and keep is not None and num_visible is None:
        num_visible = _common_row_count(keep)
    epilogue = norm is not None or pos_embed is not None or mask_token is not None
    if epilogue:
        norm, pos_embed, mask_token = _epilogue_args(x, weights, keep, patch_size, norm, pos_embed, mask_token)
    if name in _FUSED_EPILOGUE and epilogue:
        # the last pool kernel applies the epilogue as it stores the tokens
        tokens = _FUSED_EPILOGUE[name](x, list(weights), keep, patch_size, num_visible, packed, table,
                                       norm, pos_embed, mask_token)
        epilogue = False
    elif name in _COMPACT:
        tokens = _COMPACT[name](x, list(weights), keep, patch_size, num_visible, packed, table)
    else:
        if table is not None or not x.is_floating_point():
            x = _normalised(x, weights, table)
        tokens = BACKENDS[name][0](x, list(weights), keep, patch_size)
        if packed:
            tokens = _pack_visible(tokens, keep, num_visible)
    if epilogue:
        tokens = token_epilogue(tokens, keep, packed, norm, pos_embed, mask_token)
    if packed and ids_keep is not None:
        tokens = order_like_indices(tokens, keep, ids_keep)
    return tokens


def _check_epilogue(N: int, D: int, device: torch.device, norm, pos_embed, mask_token):
    """Validated (norm, pos_embed as (N, D), mask_token as (D,))."""
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(-1, pos_embed.shape[-1])
        if tuple(pos_embed.shape) != (N, D) or pos_embed.device != device:
            raise ValueError(f"pos_embed must be (N, D) = ({N}, {D}) on {device}, got "
                             f"{tuple(pos_embed.shape)} on {pos_embed.device}")
    if mask_token is not None:
        mask_token = mask_token.reshape(-1)
        if mask_token.numel() != D or mask_token.device != device:
            raise ValueError(f"mask_token must hold D={D} values on {device}, got {mask_token.numel()} "
                             f"on {mask_token.device}")
    if norm is not None:
        if len(norm) != 3:
            raise ValueError("norm must be (weight, bias, eps) of a LayerNorm over D")
        for name, t in zip(("weight", "bias"), norm[:2]):
            if t is not None and (tuple(t.shape) != (D,) or t.device != device):
                raise ValueError(f"norm {name} must be a ({D},) tensor on {device}, got {tuple(t.shape)} on {t.device}")
    return norm, pos_embed, mask_token


def _epilogue_args(x, weights, keep, patch_size: int, norm, pos_embed, mask_token):
    N = (x.shape[2] // patch_size) * (x.shape[3] // patch_size)
    return _check_epilogue(N, weights[-1].shape[0], x.device, norm, pos_embed, mask_token)


def token_epilogue(tokens: torch.Tensor, keep: torch.Tensor | None, packed: bool, norm=None,
                   pos_embed: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm of the visible tokens, position embedding, mask-token fill (see sparse_conv_tokenize)."""
    B, L, D = tokens.shape
    N = keep.shape[1] if keep is not None else L
    norm, pos_embed, mask_token = _check_epilogue(N, D, tokens.device, norm, pos_embed, mask_token)
    t = tokens
    if norm is not None:
        weight, bias, eps = norm
        t = F.layer_norm(t, (D,), weight, bias, float(eps))
    if pos_embed is not None:
        if packed and keep is not None:
            t = t + pos_embed.to(t.dtype)[visible_positions(keep, L)]
        else:
            t = t + pos_embed.to(t.dtype)
    if keep is not None and not packed:
        fill = t.new_zeros(()) if mask_token is None else mask_token.to(t.dtype) + (
            0 if pos_embed is None else pos_embed.to(t.dtype))
        t = torch.where(keep.unsqueeze(-1), t, fill)
    return t
