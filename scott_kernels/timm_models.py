"""SCOTT ViTs registered with timm: ``timm.create_model("scott_vit_small_patch16_224")``.

The three models join timm's registry whenever both ``scott_kernels`` and ``timm`` are imported, in
either order (``import scott_kernels`` does not import timm: it registers them when timm gets
imported, or at once when timm already is):

| name | embed_dim | depth | num_heads |
|---|---|---|---|
| ``scott_vit_tiny_patch16_224`` | 192 | 12 | 3 |
| ``scott_vit_small_patch16_224`` | 384 | 12 | 4 (the SCOTT ViT-S/16 that ``mimjepa`` trains) |
| ``scott_vit_base_patch16_224`` | 768 | 12 | 12 |

Each is timm's ``VisionTransformer`` with ``SparseConvTokenizer`` as its patch embedding and the
SCOTT encoder's transformer (the one ``mimjepa`` trains): no class token, fixed 2-D sin-cos
positions, blocks ``x = x + attn(LN(x)); x = LN(x); x = x + SwiGLU(x)`` with LayerNorms without
affine parameters and no biases, then average pooling, a LayerNorm and the classifier head. Any
``VisionTransformer`` keyword (``img_size``, ``num_classes``, ``depth``, ``drop_path_rate`` ...)
and ``ffn_layer="mlp"`` / ``tokenizer_hidden`` go through ``create_model``; those the SCOTT ViT
fixes (``class_token=True``, ``embed_layer``, a ``patch_size`` other than 16, ...) are refused with
the reason (``refuse_fixed_arguments``).

They are built by timm's ``build_model_with_cfg``, as timm's own ViTs: pretrained cfgs
(``timm.models.get_pretrained_cfg(name)``: ImageNet mean/std, 3x224x224, 1000 classes) with
``pretrained_cfg_overlay``, ``features_only`` / ``out_indices`` and ``forward_intermediates``. No
weights are hosted: ``pretrained=True`` raises, unless ``pretrained_cfg_overlay`` names a file.

``checkpoint_path=`` loads, besides timm's own state dicts of these models:
- a ``mimjepa`` checkpoint (``checkpoint.safetensors``): its context encoder, or its target
  (EMA) encoder with ``checkpoint_encoder="target"``;
- a SCOTT reference-code encoder state dict (e.g. ``context-encoder_checkpoint.pth``).
Both are checked strictly (``scott_kernels.vit.check_state_dict``, the check mimjepa's loader
makes): any missing or unexpected key, or a shape that differs from the model built, is an error
listing them. The pretraining mask token is not part of this model and is dropped; the pooling norm and head keep their fresh initialisation. The number of
attention heads is not visible in the weights: build the model with the checkpoint's
``num_heads`` (and ``img_size``, ``depth``, ...) when they differ from the name's.
Masks reach the tokenizer through ``scott_kernels.masked(model, keep)``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GluMlp, Mlp
from timm.models import (VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)
from timm.models.vision_transformer import Block

from .module import SparseConvTokenizer
from .vit import (ScottViTConfig, check_state_dict, encoder_to_timm, rename_reference_tokenizer, scott_block,
                  sincos_pos_embed_2d, swiglu_hidden, timm_to_encoder)

__all__ = ["ScottBlock", "ScottVisionTransformer", "scott_vit", "SCOTT_VIT_SIZES", "refuse_fixed_arguments"]

SCOTT_VIT_SIZES = {
    "scott_vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "scott_vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=4),
    "scott_vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
}


def _swiglu(in_features, hidden_features=None, act_layer=None, norm_layer=None, bias=True, drop=0.0, **dd):
    """The SCOTT SwiGLU: silu(first half) * second half of one packed projection, width 8/3·D
    rounded to 128, no dropout (timm's GluMlp with the gate first)."""
    return GluMlp(in_features, 2 * swiglu_hidden(in_features), act_layer=nn.SiLU, gate_last=False, bias=bias,
                  drop=0.0, **dd)


def _mlp(in_features, hidden_features=None, act_layer=None, norm_layer=None, bias=True, drop=0.0, **dd):
    return Mlp(in_features, hidden_features, act_layer=nn.GELU, bias=bias, drop=drop, **dd)


class ScottBlock(Block):
    """timm's Block with the SCOTT encoder's order: x = x + attn(LN(x)); x = LN(x); x = x + ffn(x)
    (the second norm rewrites the residual stream); norms without affine parameters."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        kwargs.update(qkv_bias=False, proj_bias=False, norm_layer=partial(nn.LayerNorm, elementwise_affine=False))
        kwargs.setdefault("mlp_layer", _swiglu)
        super().__init__(dim, num_heads, **kwargs)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return scott_block(x, lambda h: self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask, **kwargs))),
                           lambda h: self.drop_path2(self.ls2(self.mlp(h))), self.norm1, self.norm2)


# VisionTransformer arguments whose value the SCOTT ViT fixes: the value, and why.
FIXED_VALUES = dict(class_token=False, no_embed_class=True, qkv_bias=False, proj_bias=False, pos_embed="learn")
_WHY_FIXED = {
    "class_token": "the SCOTT encoder has no class token: its patch tokens are average-pooled into the head",
    "no_embed_class": "the position embedding covers the patches only (register tokens carry no position)",
    "qkv_bias": "the SCOTT encoder's attention has no biases",
    "proj_bias": "the SCOTT encoder's attention and feed-forward projections have no biases",
    "pos_embed": "positions are the fixed 2-D sin-cos embedding, held in pos_embed without gradient",
}
# VisionTransformer arguments the SCOTT ViT sets itself: why they cannot be given.
_WHY_OWN = {
    "embed_layer": "the patch embedding is the SCOTT tokenizer, SparseConvTokenizer (its hidden width is "
                   "tokenizer_hidden=)",
    "block_fn": "the blocks are ScottBlock, in the SCOTT encoder's order",
    "mlp_layer": "the feed-forward is chosen with ffn_layer='swiglu' (SCOTT's) or 'mlp'",
    "act_layer": "the activations are fixed: SiLU in the SwiGLU, GELU in the MLP",
}


def refuse_fixed_arguments(kwargs: dict, patch_size: int | None = None) -> None:
    """Raises TypeError / ValueError, saying why, for VisionTransformer arguments that the SCOTT
    ViT fixes (given with another value) or sets itself."""
    for name, why in _WHY_OWN.items():
        if name in kwargs:
            raise TypeError(f"SCOTT ViT: {name}= cannot be given: {why}")
    for name, value in FIXED_VALUES.items():
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"SCOTT ViT: {name}={kwargs[name]!r} is not possible ({name}={value!r} is fixed): "
                             f"{_WHY_FIXED[name]}")
    if kwargs.get("global_pool") == "token":
        raise ValueError("SCOTT ViT: global_pool='token' needs a class token, and the SCOTT encoder has none; "
                         "use 'avg' (the default), 'max', 'avgmax', 'map' or ''")
    if patch_size is not None and "patch_size" in kwargs:
        given = kwargs["patch_size"]
        given = tuple(given) if isinstance(given, (tuple, list)) else (given, given)
        if given != (patch_size, patch_size):
            raise ValueError(f"SCOTT ViT: patch_size={kwargs['patch_size']!r} does not match the model's "
                             f"{patch_size} (its name; the tokenizer's patch size is 4 ** stages). Build "
                             f"ScottVisionTransformer(patch_size=...) directly for another power of 4")


class ScottVisionTransformer(VisionTransformer):
    """VisionTransformer that also accepts mimjepa and SCOTT reference-code encoder state dicts."""

    def __init__(self, *, ffn_layer: str = "swiglu", tokenizer_hidden: int = 64, checkpoint_encoder: str = "context",
                 **kwargs):
        if ffn_layer not in ("swiglu", "mlp"):
            raise ValueError(f"ffn_layer must be 'swiglu' or 'mlp', got {ffn_layer!r}")
        if checkpoint_encoder not in ("context", "target"):
            raise ValueError(f"checkpoint_encoder must be 'context' or 'target', got {checkpoint_encoder!r}")
        refuse_fixed_arguments(kwargs)
        for name, value in FIXED_VALUES.items():
            kwargs.pop(name, None)
        super().__init__(embed_layer=partial(SparseConvTokenizer, hidden_channels=tokenizer_hidden),
                         block_fn=ScottBlock, mlp_layer=_swiglu if ffn_layer == "swiglu" else _mlp,
                         global_pool=kwargs.pop("global_pool", "avg"), **FIXED_VALUES, **kwargs)
        self.ffn_layer, self.checkpoint_encoder = ffn_layer, checkpoint_encoder
        # fixed positions, as in the SCOTT encoder (a parameter without gradient, as there)
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, grid).unsqueeze(0))
        self.pos_embed.requires_grad_(False)
        self._register_load_state_dict_pre_hook(self._accept_scott_checkpoints)

    def model_config(self) -> ScottViTConfig:
        """The architecture of this encoder (``mimjepa``'s Encoder builds the same one from it)."""
        img_h, img_w = self.patch_embed.img_size
        if img_h != img_w:
            raise ValueError(f"SCOTT checkpoints describe square images; this model has img_size {(img_h, img_w)}")
        return ScottViTConfig(img_size=img_h, patch_size=self.patch_embed.patch_size[0], in_chans=self.patch_embed.in_chans,
                           embed_dim=self.embed_dim, depth=len(self.blocks), num_heads=self.blocks[0].attn.num_heads,
                           ffn_layer=self.ffn_layer, num_register_tokens=self.num_reg_tokens,
                           tokenizer_hidden=self.patch_embed.convs[0].out_channels,
                           mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim)

    def _accept_scott_checkpoints(self, state_dict, prefix, *args, **kwargs) -> None:
        keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
        if any(k.startswith("context_encoder.") for k in keys):
            source, strip = f"mimjepa checkpoint [{self.checkpoint_encoder} encoder]", f"{self.checkpoint_encoder}_encoder."
        elif any(k.startswith(("transformer.blocks.", "tokenizer.")) for k in keys):
            source, strip = "SCOTT encoder state dict", ""
        else:
            return  # this model's own state dict
        encoder_state = rename_reference_tokenizer(
            {k[len(strip):]: state_dict[prefix + k] for k in keys if k.startswith(strip)}, source)
        own = self.state_dict()
        expected = timm_to_encoder(own, self.ffn_layer, self.num_reg_tokens)
        check_state_dict({k: v.shape for k, v in expected.items()}, encoder_state, source)
        converted = encoder_to_timm(encoder_state, self.num_reg_tokens)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        for key, value in own.items():   # the parts no encoder checkpoint has: pooling norm, head
            state_dict[prefix + key] = converted.pop(key, value)
        if converted:
            raise KeyError(f"{source}: keys without a place in the model: {sorted(converted)}")


def _cfg(**kwargs) -> dict:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9,
                interpolation="bicubic", fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="patch_embed.convs.0", classifier="head",
                notes=("no hosted weights: load a mimjepa checkpoint, a SCOTT reference-code encoder state dict or "
                       "this model's own state dict with checkpoint_path=",), **kwargs)


# timm's pretrained cfgs of the SCOTT ViTs (no weights anywhere: url, file and hf_hub_id are empty)
default_cfgs = generate_default_cfgs({name: _cfg() for name in SCOTT_VIT_SIZES})


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def scott_vit(variant: str, pretrained: bool = False, **kwargs) -> ScottVisionTransformer:
    """Builds ``variant`` through timm's builder (pretrained cfg, features_only, out_indices), as
    timm builds its own ViTs."""
    refuse_fixed_arguments(kwargs, patch_size=16)
    pretrained_cfg, overlay = kwargs.pop("pretrained_cfg", None), dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained and not resolve_pretrained_cfg(variant, pretrained_cfg, overlay).has_weights:
        raise ValueError(f"{variant}: no published weights (pretrained=True has nothing to download); load yours "
                         f"with checkpoint_path= (a mimjepa checkpoint, a SCOTT reference-code encoder state dict "
                         f"or this model's state dict), or name a file with pretrained_cfg_overlay=dict(file=...)")
    if "img_size" in kwargs or "in_chans" in kwargs:
        # the cfg describes the input this model takes (timm's data config reads it)
        base = resolve_pretrained_cfg(variant, pretrained_cfg, overlay).input_size
        size = _pair(kwargs.get("img_size", base[1:]))
        overlay.setdefault("input_size", (kwargs.get("in_chans", base[0]), *size))
    args = dict(SCOTT_VIT_SIZES[variant], patch_size=16)
    args.update(kwargs)
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(ScottVisionTransformer, variant, pretrained, pretrained_cfg=pretrained_cfg,
                                pretrained_cfg_overlay=overlay,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


@register_model
def scott_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ScottVisionTransformer:
    """SCOTT ViT-Ti/16: sparse convolutional tokenizer + 12 blocks of width 192, 3 heads."""
    return scott_vit("scott_vit_tiny_patch16_224", pretrained, **kwargs)


@register_model
def scott_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> ScottVisionTransformer:
    """SCOTT ViT-S/16: sparse convolutional tokenizer + 12 blocks of width 384, 4 heads."""
    return scott_vit("scott_vit_small_patch16_224", pretrained, **kwargs)


@register_model
def scott_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> ScottVisionTransformer:
    """SCOTT ViT-B/16: sparse convolutional tokenizer + 12 blocks of width 768, 12 heads."""
    return scott_vit("scott_vit_base_patch16_224", pretrained, **kwargs)
