"""SCOTT encoder (SparseConvTokenizer + ViT) and the MIM-JEPA predictor.

Module tree and parameter names follow the SCOTT reference code, so its checkpoints load
strictly: ``tokenizer.tokenizer.{0,3}.weight`` (handled by SparseConvTokenizer),
``transformer.{msk_embed,reg_embed,pos_embed}``, ``transformer.blocks.{i}.self_attn.{qkv,proj}``,
``transformer.blocks.{i}.ffn_layer.{w12,last_linear}`` (or ``linear1`` for the MLP) and, for the
predictor, ``head.{1,2}`` (SiLU -> LayerNorm -> Linear).

Block (as in that code, ``scott_kernels.vit.scott_block``): x = x + attn(LN(x)); x = LN(x);
x = x + ffn(x); layer norms without affine parameters, no biases in attention or feed-forward.
The 2-D sin-cos positions and the SwiGLU width come from ``scott_kernels.vit`` too, shared with
the timm SCOTT ViTs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scott_kernels import SparseConvTokenizer
from scott_kernels.compact import visible_positions
from scott_kernels.vit import scott_block, sincos_pos_embed_2d, swiglu_hidden

from .config import ModelConfig, as_model_config

__all__ = ["sincos_pos_embed_2d", "Transformer", "Encoder", "Predictor", "swiglu_hidden"]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescales survivors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, D)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = swiglu_hidden(dim)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.last_linear = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.last_linear(F.silu(a) * b)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, drop: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.linear1 = nn.Linear(dim, hidden, bias=False)
        self.last_linear = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.last_linear(self.drop(F.gelu(self.linear1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        D = cfg.embed_dim
        self.self_attn = Attention(D, cfg.num_heads, cfg.attention_dropout, cfg.dropout)
        self.ffn_layer = SwiGLU(D) if cfg.ffn_layer == "swiglu" else MLP(D, cfg.mlp_ratio, cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return scott_block(x, lambda h: self.drop_path(self.self_attn(h)), lambda h: self.drop_path(self.ffn_layer(h)),
                           _layer_norm, _layer_norm)


def _layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],))


class Transformer(nn.Module):
    """Blocks over (B, L, D) tokens with fixed sin-cos positions, mask token and registers."""

    def __init__(self, cfg: ModelConfig, depth: int, rescale_offset: int = 0):
        super().__init__()
        D, R = cfg.embed_dim, cfg.num_register_tokens
        grid = (cfg.img_size // cfg.patch_size,) * 2
        self.num_registers = R
        self.msk_embed = nn.Parameter(torch.zeros(1, 1, D))
        if R:
            self.reg_embed = nn.Parameter(torch.zeros(1, R, D))
        pos = torch.cat([torch.zeros(R, D), sincos_pos_embed_2d(D, grid)])
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed; a parameter for key parity
        self.position_dropout = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0, cfg.drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self._init(rescale_offset)

    def _init(self, rescale_offset: int) -> None:
        nn.init.trunc_normal_(self.msk_embed, std=1e-6)
        if self.num_registers:
            nn.init.trunc_normal_(self.reg_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
        # Deeper residual branches start smaller (per-layer rescale of the output projections).
        for i, block in enumerate(self.blocks):
            for w in (block.self_attn.proj.weight, block.ffn_layer.last_linear.weight):
                w.data.div_(math.sqrt(2.0 * (i + 1)))
                if rescale_offset:
                    w.data.div_(math.sqrt(2.0 * (rescale_offset + i + 1)))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D) tokens at patch indices ``positions`` (B, L), or all N patches in order."""
        R = self.num_registers
        pos = self.pos_embed[R:]
        pos = pos.unsqueeze(0) if positions is None else pos[positions]
        x = x + pos
        if R:
            x = torch.cat([self.reg_embed.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.position_dropout(x)
        for block in self.blocks:
            x = block(x)
        return x[:, R:]


class Encoder(nn.Module):
    """SCOTT context/target encoder: sparse CNN tokenizer + transformer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg = as_model_config(cfg)
        self.tokenizer = SparseConvTokenizer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                             embed_dim=cfg.embed_dim, hidden_channels=cfg.tokenizer_hidden,
                                             backend=cfg.tokenizer_backend)
        self.transformer = Transformer(cfg, cfg.depth)

    @property
    def num_patches(self) -> int:
        return self.tokenizer.num_patches

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None,
                visible_only: bool = False, num_visible: int | None = None) -> torch.Tensor:
        """keep=None: all N tokens, no masking (target encoder, probes).
        keep given, visible_only=False: (B, N, D), masked positions replaced by the mask token.
        keep given, visible_only=True: (B, K, D) for the K visible patches of each row (every row
        must keep the same number), in patch order."""
        if keep is None:
            return self.transformer(self.tokenizer(images))
        if visible_only:
            # the tokenizer hands over the visible tokens only (packed), computed only there
            tokens = self.tokenizer(images, keep, num_visible=num_visible, packed=True)
            return self.transformer(tokens, visible_positions(keep, tokens.shape[1]))
        tokens = self.tokenizer(images, keep, num_visible=num_visible)
        tokens = torch.where(keep[..., None], tokens, self.transformer.msk_embed.to(tokens.dtype))
        return self.transformer(tokens)


class Predictor(nn.Module):
    """Shallow transformer over all N positions + SiLU -> LayerNorm -> Linear head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = as_model_config(cfg)
        D = cfg.embed_dim
        self.transformer = Transformer(cfg, cfg.predictor_depth, rescale_offset=cfg.depth)
        self.head = nn.Sequential(nn.SiLU(), nn.LayerNorm(D), nn.Linear(D, D))

    def forward(self, context: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """context: (B, N, D) (mask_tokens mode) or (B, K, D) visible tokens (visible_only mode,
        ``keep`` given): the latter are placed at their positions and the masked positions get
        this predictor's mask token, before its own position embedding is added."""
        if keep is not None and context.shape[1] != keep.shape[1]:
            B, N = keep.shape
            full = self.transformer.msk_embed.to(context.dtype).expand(B, N, -1).clone()
            positions = visible_positions(keep, context.shape[1])
            full = full.scatter(1, positions[..., None].expand(-1, -1, context.shape[-1]), context)
            context = full
        return self.head(self.transformer(context))
