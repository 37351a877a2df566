"""``SparseConvTokenizer``: the SCOTT tokenizer as a drop-in patch-embedding module."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (BACKENDS, check_inputs, num_stages_for, order_like_indices, resolve_keep, select_backend,
                         sparse_conv_tokenize)

__all__ = ["SparseConvTokenizer", "TokenizerConv", "masked"]

_log = logging.getLogger("scott_kernels")
_OFFICIAL_KEY = re.compile(r"^tokenizer\.(\d+)\.weight$")
_OUTPUT_FORMATS = ("NLC", "NHWC", "NCHW")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _per_stage(value, stages: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * stages
    values = [int(v) for v in value]
    if len(values) != stages:
        raise ValueError(f"{name}: expected an int or {stages} values, got {len(values)}")
    return values


class TokenizerConv(nn.Module):
    """One convolution of the SCOTT tokenizer: a (out, in, k, k) weight, stride 2, padding k // 2,
    no bias. It holds the weight the kernels read and has nn.Conv2d's attributes (``weight``,
    ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``bias=None``) and
    its dense ``forward``, but is deliberately not an ``nn.Conv2d``: ViT codebases initialise every
    ``nn.Conv2d`` they find (I-JEPA's ``_init_weights``: truncated normal, std 0.02; timm's "jax"
    init: LeCun normal) assuming it is a linear patch projection, which would silently replace
    SCOTT's initialisation. ``reset_parameters()`` applies SCOTT's (Kaiming normal, fan-in, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (2, 2)
        self.padding = (kernel_size // 2, kernel_size // 2)
        self.bias = None
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, device=device,
                                               dtype=dtype))
        # drawn as nn.Conv2d draws it, before the tokenizer's reset_parameters: seeded models keep
        # the random stream (and so the weights) they had when these were nn.Conv2d
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight)   # as the SCOTT reference code initialises its convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense convolution (no masking): what the tokenizer's first op computes at keep=None."""
        return F.conv2d(x, self.weight, None, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias=False")


class SparseConvTokenizer(nn.Module):
    """Shallow sparse CNN tokenizer (SCOTT): one token per patch, no masked patch leaks.

    Each stage is conv(k x k, stride 2, pad k//2, no bias) -> ReLU -> MaxBlurPool, masked to the
    visible patches after every conv and pool; ``patch_size = 4 ** num_stages`` (16 -> two stages:
    3 -> 64 -> embed_dim channels, the SCOTT default).

    The convolutions (``convs``) are ``TokenizerConv`` modules, not ``nn.Conv2d``, so ViT init
    loops that re-initialise every ``nn.Conv2d`` keep SCOTT's initialisation
    (``reset_parameters()`` applies it again).

    Drop-in for timm: ``VisionTransformer(embed_layer=SparseConvTokenizer, ...)`` works; timm
    calls it with images only, so hand it a mask with ``with tokenizer.masked(keep): vit(x)`` or
    ``with scott_kernels.masked(vit, keep): vit(x)``.

    Args:
        img_size: expected image size (int or (H, W)); any multiple of the patch size is accepted
            when ``strict_img_size=False``.
        patch_size: pixels per patch side, a power of 4 (default 16).
        in_chans: image channels.
        embed_dim: token width D (the last conv's output channels).
        hidden_channels: output channels of the stages before the last (int or one per stage).
        kernel_size: odd conv kernel size (int or one per stage).
        backend: "auto", "triton", "cuda", "torch", "reference" or "spconv" (see ``scott_kernels.available_backends``).
        norm_layer: optional norm over D applied to visible tokens (masked ones stay 0).
        flatten / output_fmt: "NLC" (B, N, D) by default; "NHWC" or "NCHW" keep the grid.
        pixel_mean, pixel_std: optional per-channel normalisation in the images' units, applied
            inside the first convolution (uint8 images then go in as they are; e.g.
            255 * ImageNet's mean/std for uint8 RGB).
        bias, dynamic_img_pad: accepted for timm's ``embed_layer`` call; SCOTT convs have no bias,
            and padding images to a patch multiple is not supported (it would change the mask grid).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 384,
                 hidden_channels: int | Sequence[int] = 64, kernel_size: int | Sequence[int] = 7,
                 backend: str = "auto", norm_layer=None, flatten: bool = True, output_fmt: str | None = None,
                 bias: bool = True, strict_img_size: bool = True, dynamic_img_pad: bool = False,
                 pixel_mean: Sequence[float] | None = None, pixel_std: Sequence[float] | None = None,
                 device=None, dtype=None):
        super().__init__()
        ph, pw = _pair(patch_size)
        if ph != pw:
            raise ValueError(f"patch_size must be square, got {(ph, pw)}")
        stages = num_stages_for(ph)
        self.patch_size = (ph, pw)
        self.img_size = _pair(img_size)
        if self.img_size[0] % ph or self.img_size[1] % ph:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {ph}")
        self.grid_size = (self.img_size[0] // ph, self.img_size[1] // ph)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        if dynamic_img_pad:
            raise ValueError("dynamic_img_pad=True is not supported: image sizes must be multiples of "
                             "the patch size so that the mask grid matches the token grid")
        self.dynamic_img_pad = False
        self.strict_img_size = strict_img_size
        if output_fmt is not None:
            if output_fmt not in _OUTPUT_FORMATS:
                raise ValueError(f"output_fmt must be one of {_OUTPUT_FORMATS}, got {output_fmt!r}")
            self.flatten, self.output_fmt = False, output_fmt
        else:
            self.flatten, self.output_fmt = flatten, ("NLC" if flatten else "NCHW")
        if backend != "auto" and backend not in BACKENDS:   # device support is checked per call
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        self.backend = backend

        widths = _per_stage(hidden_channels, stages - 1, "hidden_channels") + [embed_dim]
        kernels = _per_stage(kernel_size, stages, "kernel_size")
        for k in kernels:
            if k <= 0 or k % 2 == 0:
                raise ValueError(f"kernel_size must be odd and positive, got {k}")
        factory = {"device": device, "dtype": dtype}
        convs, c_in = [], in_chans
        for width, k in zip(widths, kernels):
            convs.append(TokenizerConv(c_in, width, k, **factory))
            c_in = width
        self.convs = nn.ModuleList(convs)
        self.norm = norm_layer(embed_dim, **factory) if norm_layer else nn.Identity()
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("pixel_mean and pixel_std go together: give both or neither")
        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            if value is not None:
                value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
                if value.numel() != in_chans:
                    raise ValueError(f"{name} must have in_chans={in_chans} values, got {value.numel()}")
            self.register_buffer(name, value, persistent=False)
        self._pending_keep: torch.Tensor | None = None
        self._announced: set[tuple[str, str]] = set()
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._accept_official_keys)

    def reset_parameters(self) -> None:
        """SCOTT's initialisation of the convolutions (Kaiming normal, as the SCOTT reference code).
        The convolutions are ``TokenizerConv``, not ``nn.Conv2d``, so init loops that re-initialise
        every ``nn.Conv2d`` (I-JEPA's ``_init_weights``, timm's "jax" init) leave them alone."""
        for conv in self.convs:
            conv.reset_parameters()

    # --- timm PatchEmbed interface -------------------------------------------------------------
    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size) -> tuple[int, int]:
        h, w = _pair(img_size)
        return h // self.patch_size[0], w // self.patch_size[1]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and _pair(patch_size) != self.patch_size:
            raise ValueError("patch_size of a SparseConvTokenizer is fixed by its number of stages")
        if img_size is not None:
            size = _pair(img_size)
            if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
                raise ValueError(f"img_size {size} must be a multiple of patch_size {self.patch_size[0]}")
            self.img_size = size
            self.grid_size = self.dynamic_feat_size(size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    # --- masks ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def masked(self, keep: torch.Tensor | None) -> Iterator["SparseConvTokenizer"]:
        """Within the block, calls that pass no ``keep`` use this one (for callers such as timm's
        VisionTransformer that call the embed layer with images only)."""
        previous, self._pending_keep = self._pending_keep, keep
        try:
            yield self
        finally:
            self._pending_keep = previous

    # --- compute -------------------------------------------------------------------------------
    @property
    def weights(self) -> list[torch.Tensor]:
        return [conv.weight for conv in self.convs]

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, *, num_visible: int | None = None,
                packed: bool = False) -> torch.Tensor:
        """(B, C, H, W) images -> tokens in ``output_fmt`` (masked tokens exactly 0).

        ``keep`` marks the visible patches (default: the one given to ``masked``, else all):
        (B, N) bool, or (B, K) int64 indices of the kept patches (MAE's ``ids_keep``, I-JEPA's
        context indices; K is then the visible count, no host synchronisation). ``num_visible``,
        the visible count of every row of a bool mask when known, spares the fast backends a host
        synchronisation. ``packed=True`` returns only the visible tokens, (B, K, D), for encoders
        that drop masked tokens: in row-major patch order for a bool mask, in the indices' order
        for indices.
        """
        if keep is None:
            keep = self._pending_keep
        if self.strict_img_size and isinstance(x, torch.Tensor) and x.dim() == 4 \
                and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"images must be {self.img_size[0]}x{self.img_size[1]} (img_size), got "
                             f"{x.shape[-2]}x{x.shape[-1]}; pass strict_img_size=False for other sizes")
        backend = select_backend(self.backend, x.device) if isinstance(x, torch.Tensor) else self.backend
        if not torch.compiler.is_compiling():
            self._announce(backend, getattr(x, "device", None))
        ids_keep = None
        if keep is not None:   # one conversion of index masks, shared by the kernels and the norm
            check_inputs(x, self.weights, keep, self.patch_size[0], num_visible)
            grid_h, grid_w = self.dynamic_feat_size(x.shape[-2:])
            keep, num_visible, ids_keep = resolve_keep(keep, grid_h * grid_w, num_visible)
        tokens = sparse_conv_tokenize(x, self.weights, keep, patch_size=self.patch_size[0], backend=backend,
                                      num_visible=num_visible, packed=packed, pixel_mean=self.pixel_mean,
                                      pixel_std=self.pixel_std)
        if not isinstance(self.norm, nn.Identity):
            tokens = self.norm(tokens)
            if keep is not None and not packed:
                tokens = torch.where(keep.unsqueeze(-1), tokens, tokens.new_zeros(()))
        if packed and ids_keep is not None:
            tokens = order_like_indices(tokens, keep, ids_keep)
        if self.output_fmt == "NLC" or packed:
            return tokens
        B = tokens.shape[0]
        grid = tokens.view(B, x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1], -1)
        return grid if self.output_fmt == "NHWC" else grid.permute(0, 3, 1, 2)

    def _announce(self, backend: str, device) -> None:
        """Logs, once per device, which backend "auto" (or the caller) chose."""
        if (backend, str(device)) not in self._announced:
            self._announced.add((backend, str(device)))
            _log.info("SparseConvTokenizer: backend %r on %s", backend, device)

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, patch_size={self.patch_size[0]}, stages={len(self.convs)}, "
                f"embed_dim={self.embed_dim}, backend={self.backend!r}")

    # --- weights -------------------------------------------------------------------------------
    def _accept_official_keys(self, state_dict, prefix, *args, **kwargs) -> None:
        """Maps the SCOTT reference code's keys (``tokenizer.{3*i}.weight``: an nn.Sequential of
        conv, ReLU, MaxBlurPool per stage) onto ``convs.{i}.weight``."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _OFFICIAL_KEY.match(key[len(prefix):])
            if not match:
                continue
            index = int(match.group(1))
            if index % 3:
                raise KeyError(f"{key}: the SCOTT layout keeps conv weights at tokenizer.0, .3, .6 ...")
            state_dict[f"{prefix}convs.{index // 3}.weight"] = state_dict.pop(key)


@contextlib.contextmanager
def masked(model: nn.Module, keep: torch.Tensor | None) -> Iterator[nn.Module]:
    """Hands ``keep`` to every SparseConvTokenizer inside ``model`` for the duration of the block."""
    tokenizers = [m for m in model.modules() if isinstance(m, SparseConvTokenizer)]
    if not tokenizers:
        raise ValueError("masked(): the model contains no SparseConvTokenizer")
    with contextlib.ExitStack() as stack:
        for tok in tokenizers:
            stack.enter_context(tok.masked(keep))
        yield model
