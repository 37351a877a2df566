"""SCOTT ViTs registered with timm: ``timm.create_model("scott_vit_small_patch16_224")``.

Importing this module registers three models (``import scott_kernels`` does it too when timm has
already been imported):

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
and ``ffn_layer="mlp"`` / ``tokenizer_hidden`` go through ``create_model``.

``checkpoint_path=`` loads, besides timm's own state dicts of these models:
- a ``mimjepa`` checkpoint (``checkpoint.safetensors``): its context encoder, or its target
  (EMA) encoder with ``checkpoint_encoder="target"``;
- a SCOTT reference-code encoder state dict (e.g. ``context-encoder_checkpoint.pth``).
Both are checked strictly (``scott_kernels.vit.check_state_dict``, the check mimjepa's loader
makes): any missing or unexpected key, or a shape that differs from the model built, is an error
listing them. The pretraining mask token is not part of this
model and is dropped; the pooling norm and head keep their fresh initialisation. The number of
attention heads is not visible in the weights: build the model with the checkpoint's
``num_heads`` (and ``img_size``, ``depth``, ...) when they differ from the name's.
Masks reach the tokenizer through ``scott_kernels.masked(model, keep)``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.layers import GluMlp, Mlp
from timm.models import VisionTransformer, register_model
from timm.models.vision_transformer import Block

from .module import SparseConvTokenizer
from .vit import (ScottViTConfig, check_state_dict, encoder_to_timm, rename_reference_tokenizer, scott_block,
                  sincos_pos_embed_2d, swiglu_hidden, timm_to_encoder)

__all__ = ["ScottBlock", "scott_vit", "SCOTT_VIT_SIZES"]

SCOTT_VIT_SIZES = {
    "scott_vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "scott_vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=4),
    "scott_vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


class ScottVisionTransformer(VisionTransformer):
    """VisionTransformer that also accepts mimjepa and SCOTT reference-code encoder state dicts."""

    def __init__(self, *, ffn_layer: str = "swiglu", tokenizer_hidden: int = 64, checkpoint_encoder: str = "context",
                 **kwargs):
        if ffn_layer not in ("swiglu", "mlp"):
            raise ValueError(f"ffn_layer must be 'swiglu' or 'mlp', got {ffn_layer!r}")
        if checkpoint_encoder not in ("context", "target"):
            raise ValueError(f"checkpoint_encoder must be 'context' or 'target', got {checkpoint_encoder!r}")
        super().__init__(embed_layer=partial(SparseConvTokenizer, hidden_channels=tokenizer_hidden),
                         block_fn=ScottBlock, mlp_layer=_swiglu if ffn_layer == "swiglu" else _mlp,
                         class_token=False, no_embed_class=True, global_pool=kwargs.pop("global_pool", "avg"),
                         qkv_bias=False, proj_bias=False, **kwargs)
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


def scott_vit(variant: str, pretrained: bool = False, **kwargs) -> ScottVisionTransformer:
    if pretrained:
        raise ValueError(f"{variant}: no published weights; load yours with checkpoint_path=")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(SCOTT_VIT_SIZES[variant], img_size=224, patch_size=16)
    args.update(kwargs)
    model = ScottVisionTransformer(**args)
    size = model.patch_embed.img_size
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=variant, num_classes=model.num_classes, input_size=(model.patch_embed.in_chans, *size),
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, interpolation="bicubic", crop_pct=0.9, fixed_input_size=True,
        first_conv="patch_embed.convs.0", classifier="head")
    return model


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
