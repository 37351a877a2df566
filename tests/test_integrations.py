"""The README's integration snippets, executed as they are written in README.md.

Each snippet is the fenced code block after a ``<!-- snippet: NAME -->`` marker in README.md, so
the README and these tests cannot drift apart. The MAE and I-JEPA snippets run inside small
encoders written here with the structure of those codebases (MAE: ``random_masking``,
``forward_encoder``, ``initialize_weights``, the decoder's unshuffle; I-JEPA: ``forward(x,
masks=None)`` with an index gather of tokens and positions, ``_init_weights`` over every
``nn.Conv2d``); the timm ones as they are. Each integration is checked against the dense reference
(``scott_kernels.reference_tokenize`` in float64) and for leakage: outputs bit-identical when the
masked pixels are replaced by huge noise.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scott_kernels
from scott_kernels import SparseConvTokenizer, keep_from_indices, reference_tokenize
from scott_kernels.vit import sincos_pos_embed_2d

README = Path(__file__).resolve().parents[1] / "README.md"
P = 16


def snippet(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*\n```python\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no ```python block after <!-- snippet: {name} -->"
    return match.group(1)


def run(name: str, scope: dict) -> dict:
    exec(compile(snippet(name), f"README.md:{name}", "exec"), scope)
    return scope


def test_every_marked_snippet_is_tested():
    names = set(re.findall(r"<!-- snippet: ([\w-]+) -->", README.read_text()))
    tested = {"mae-init", "mae-initialize-weights", "mae-forward-encoder", "mae-finetune", "ijepa-init", "ijepa-forward",
              "ijepa-zero-edit", "timm-embed-layer", "timm-scott-vit", "timm-checkpoint", "timm-demo-checkpoint"}
    assert names == tested


# --- shared pieces ---------------------------------------------------------------------------------
class Block(nn.Module):
    """A pre-norm transformer block (attention + MLP) with biases, as both codebases use."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def images_and_noisy(batch: int, size: int, keep: torch.Tensor, seed: int = 0):
    """float64 images, and a copy whose masked patches (keep False) hold noise of size 1e6."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    pixel_keep = keep.view(batch, 1, size // P, size // P).repeat_interleave(P, 2).repeat_interleave(P, 3)
    noise = 1e6 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, torch.where(pixel_keep, x, noise)


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def reference_tokens(tok: SparseConvTokenizer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The dense emulation's tokens, (B, N, D), masked patches 0 (float64 throughout)."""
    return reference_tokenize(x, [w.double() for w in tok.weights], keep, P)


def kaiming_like(weight: torch.Tensor) -> bool:
    """Kaiming normal's spread (std sqrt(2 / fan_in)), not 0.02 or Xavier's."""
    fan_in = weight[0].numel()
    return abs(weight.std().item() / math.sqrt(2.0 / fan_in) - 1.0) < 0.15


# --- MAE ----------------------------------------------------------------------------------------------
class MaeStyle(nn.Module):
    """MAE's MaskedAutoencoderViT structure, small, with the README's three edits."""

    def __init__(self, img_size=64, patch_size=16, in_chans=3, embed_dim=48, depth=2, num_heads=3,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2):
        super().__init__()
        run("mae-init", dict(self=self, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                             embed_dim=embed_dim))
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        for pos in (self.pos_embed, self.decoder_pos_embed):
            pos.data[0, 1:].copy_(sincos_pos_embed_2d(pos.shape[-1], grid))
        run("mae-initialize-weights", dict(self=self, torch=torch))   # instead of the two `proj` lines
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def random_masking(self, x, mask_ratio):
        """MAE's own masking of (B, N, D) tokens (used by the reference below)."""
        B, N, D = x.shape
        len_keep = int(N * (1 - mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(B, N, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = gather_rows(x, ids_shuffle[:, :len_keep])
        mask = torch.ones(B, N, device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def encoder_tail(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, x, mask_ratio):
        scope = run("mae-forward-encoder", dict(self=self, x=x, mask_ratio=mask_ratio, torch=torch))
        return self.encoder_tail(scope["x"]), scope["mask"], scope["ids_restore"]

    def forward_encoder_reference(self, imgs, mask_ratio):
        """MAE's original forward_encoder, with the dense reference tokenizer given the mask that
        random_masking draws (same random state)."""
        state = torch.random.get_rng_state()
        _, mask, ids_restore = self.random_masking(torch.zeros(imgs.shape[0], self.patch_embed.num_patches, 1),
                                                   mask_ratio)
        torch.random.set_rng_state(state)
        x = reference_tokens(self.patch_embed, imgs, mask == 0)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        return self.encoder_tail(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = gather_rows(x_, ids_restore)   # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        loss = ((pred - self.patchify(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, reference=False):
        encode = self.forward_encoder_reference if reference else self.forward_encoder
        latent, mask, ids_restore = encode(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask, latent


def test_mae_keeps_scott_init_and_matches_the_dense_reference():
    torch.manual_seed(0)
    model = MaeStyle().double().eval()
    assert all(kaiming_like(conv.weight) for conv in model.patch_embed.convs)
    with pytest.raises(AttributeError):   # why the README replaces MAE's two `proj` lines
        model.patch_embed.proj
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(5)
        loss, pred, mask, latent = model(x)
        torch.manual_seed(5)
        ref_loss, ref_pred, ref_mask, ref_latent = model(x, reference=True)
    assert latent.shape == (3, 1 + 4, 48) and mask.shape == (3, 16) and (mask == 0).sum(1).tolist() == [4] * 3
    assert torch.equal(mask, ref_mask)
    for got, want in ((latent, ref_latent), (pred, ref_pred), (loss, ref_loss)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mae_nothing_leaks_from_masked_pixels():
    torch.manual_seed(1)
    model = MaeStyle().double().eval()
    torch.manual_seed(6)
    _, _, mask, _ = model(torch.zeros(2, 3, 64, 64, dtype=torch.float64))
    x, noisy = images_and_noisy(2, 64, mask == 0)
    with torch.no_grad():
        torch.manual_seed(6)
        _, pred, mask_a, latent = model(x)
        torch.manual_seed(6)
        _, pred_noisy, mask_b, latent_noisy = model(noisy)
    assert torch.equal(mask_a, mask) and torch.equal(mask_b, mask)
    assert torch.equal(latent, latent_noisy) and torch.equal(pred, pred_noisy)


def test_mae_trains_through_the_tokenizer():
    torch.manual_seed(2)
    model = MaeStyle()
    loss, *_ = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in model.patch_embed.convs)


def test_mae_finetune_patch_embedding(tmp_path):
    """MAE's fine-tuning model (a timm VisionTransformer) with the README's patch embedding takes
    the pretrained encoder's tokenizer weights, and computes what it computes."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    from types import SimpleNamespace

    torch.manual_seed(3)
    pretrained = MaeStyle()
    model = timm_vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=4)
    run("mae-finetune", dict(model=model, args=SimpleNamespace(input_size=64)))
    encoder_state = {k: v for k, v in pretrained.state_dict().items() if k.startswith("patch_embed.")}
    missing, unexpected = model.load_state_dict(encoder_state, strict=False)   # as main_finetune loads
    assert not unexpected and not [k for k in missing if k.startswith("patch_embed.")]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.patch_embed(x), pretrained.patch_embed(x))
    assert model(x).shape == (2, 4)


# --- I-JEPA ---------------------------------------------------------------------------------------------
def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """I-JEPA-style: for each (B, K) index mask, the rows it keeps; the masks concatenated on the batch."""
    return torch.cat([gather_rows(x, m) for m in masks], dim=0)


class IJepaStyle(nn.Module):
    """I-JEPA's VisionTransformer structure, small, with the README's patch-embedding edit and its
    forward left as it is (the zero-edit path)."""

    def __init__(self, img_size=(64,), patch_size=16, in_chans=3, embed_dim=48, depth=2, num_heads=3, init_std=0.02):
        super().__init__()
        run("ijepa-init", dict(self=self, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                               embed_dim=embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim), requires_grad=False)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.init_std = init_std
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):   # meant for PatchEmbed's projection
            nn.init.trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x, pos_embed):
        assert x.shape[1] == pos_embed.shape[1], "this sketch has no interpolation"
        return pos_embed

    def embed(self, x, masks):
        """I-JEPA's own patchify, positions and masking (unmodified)."""
        x = self.patch_embed(x)
        x = x + self.interpolate_pos_encoding(x, self.pos_embed)
        if masks is not None:
            x = apply_masks(x, masks)
        return x

    def forward(self, x, masks=None):
        if masks is not None and not isinstance(masks, list):
            masks = [masks]
        x = self.embed(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class IJepaEdited(IJepaStyle):
    """The same encoder with the README's forward edit."""

    def embed(self, x, masks):
        return run("ijepa-forward", dict(self=self, x=x, masks=masks, torch=torch, apply_masks=apply_masks))["x"]


def ijepa_reference(model: IJepaStyle, x: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
    """Each mask's tokens from the dense reference given that mask, positions, blocks, norm."""
    N = model.patch_embed.num_patches
    if masks is None:
        tokens = reference_tokens(model.patch_embed, x, None) + model.pos_embed
    else:
        tokens = torch.cat([gather_rows(reference_tokens(model.patch_embed, x, keep_from_indices(m, N)) + model.pos_embed,
                                        m) for m in masks])
    for blk in model.blocks:
        tokens = blk(tokens)
    return model.norm(tokens)


def context_masks(batch: int, num_patches: int, kept: int, count: int, seed: int) -> list[torch.Tensor]:
    """I-JEPA-style context masks: (B, K) ascending patch indices, as its collator makes them."""
    g = torch.Generator().manual_seed(seed)
    return [torch.sort(torch.argsort(torch.rand(batch, num_patches, generator=g), 1)[:, :kept], 1).values
            for _ in range(count)]


def test_ijepa_init_keeps_scott_initialisation():
    torch.manual_seed(3)
    standalone = SparseConvTokenizer(img_size=64, embed_dim=48)
    torch.manual_seed(3)
    model = IJepaStyle()   # the tokenizer is built first, then _init_weights runs over every module
    for conv, fresh in zip(model.patch_embed.convs, standalone.convs):
        assert torch.equal(conv.weight, fresh.weight) and kaiming_like(conv.weight)
        assert not isinstance(conv, nn.Conv2d)
    assert abs(model.blocks[0].qkv.weight.std().item() - 0.02) < 0.004   # the rest got I-JEPA's init


@pytest.mark.parametrize("count", [1, 2])
def test_ijepa_forward_edit_matches_the_dense_reference(count):
    torch.manual_seed(4)
    model = IJepaEdited().double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    masks = context_masks(2, 16, 6, count, seed=count)
    with torch.no_grad():
        out = model(x, masks)
        assert out.shape == (count * 2, 6, 48)
        torch.testing.assert_close(out, ijepa_reference(model, x, masks), rtol=1e-10, atol=1e-10)
        single = model(x, masks[0])   # a mask tensor rather than a list, as I-JEPA accepts
        torch.testing.assert_close(single, out[:2], rtol=0, atol=0)
        # the target encoder: forward(x) with masks=None
        target = model(x)
        assert target.shape == (2, 16, 48)
        torch.testing.assert_close(target, ijepa_reference(model, x, None), rtol=1e-10, atol=1e-10)


def test_ijepa_forward_edit_leaks_nothing():
    torch.manual_seed(5)
    model = IJepaEdited().double().eval()
    masks = context_masks(2, 16, 5, 2, seed=9)
    for i, m in enumerate(masks):
        x, noisy = images_and_noisy(2, 64, keep_from_indices(m, 16), seed=i)
        with torch.no_grad():
            assert torch.equal(model(x, masks)[2 * i:2 * i + 2], model(noisy, masks)[2 * i:2 * i + 2])


def test_ijepa_zero_edit_path():
    """I-JEPA's unmodified forward inside scott_kernels.masked(encoder, masks_enc[0])."""
    torch.manual_seed(6)
    encoder = IJepaStyle().double().eval()
    edited = IJepaEdited().double().eval()
    edited.load_state_dict(encoder.state_dict())
    masks_enc = context_masks(2, 16, 7, 1, seed=3)
    imgs, noisy = images_and_noisy(2, 64, keep_from_indices(masks_enc[0], 16))
    with torch.no_grad():
        z = run("ijepa-zero-edit", dict(encoder=encoder, imgs=imgs, masks_enc=masks_enc))["z"]
        torch.testing.assert_close(z, ijepa_reference(encoder, imgs, masks_enc), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(z, edited(imgs, masks_enc), rtol=1e-12, atol=1e-12)
        z_noisy = run("ijepa-zero-edit", dict(encoder=encoder, imgs=noisy, masks_enc=masks_enc))["z"]
        assert torch.equal(z, z_noisy)
        # outside the block the encoder is dense again (the target encoder's call)
        torch.testing.assert_close(encoder(imgs), ijepa_reference(encoder, imgs, None), rtol=1e-10, atol=1e-10)


# --- timm ------------------------------------------------------------------------------------------------
timm = pytest.importorskip("timm")


def test_timm_embed_layer_snippet():
    torch.manual_seed(7)
    scope = run("timm-embed-layer", {})
    vit, images, keep = scope["vit"], scope["images"], scope["keep"]
    assert scope["logits"].shape == (2, 1000)
    assert all(kaiming_like(conv.weight) for conv in vit.patch_embed.convs)   # timm's init leaves them


@pytest.mark.parametrize("index_mask", [False, True])
def test_timm_vision_transformer_matches_the_reference_and_leaks_nothing(index_mask):
    from timm.models import VisionTransformer

    torch.manual_seed(8)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                            embed_layer=SparseConvTokenizer).double().eval()
    if index_mask:   # (B, K) indices of the kept patches, in any order
        mask = torch.argsort(torch.rand(2, 16), dim=1)[:, :6]
        bool_keep = keep_from_indices(mask, 16)
    else:
        mask = bool_keep = torch.rand(2, 16) >= 0.5
    x, noisy = images_and_noisy(2, 64, bool_keep)
    with torch.no_grad():
        with scott_kernels.masked(vit, mask):
            out, out_noisy = vit.forward_features(x), vit.forward_features(noisy)
        hook = vit.patch_embed.register_forward_hook(lambda m, inputs, _: reference_tokens(m, inputs[0], bool_keep))
        want = vit.forward_features(x)
        hook.remove()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(out, out_noisy)


def _mimjepa_checkpoint(path: Path, **arch) -> None:
    mimjepa_models = pytest.importorskip("mimjepa.models")
    from mimjepa.checkpoint import save_weights
    from mimjepa.config import ModelConfig

    encoder = mimjepa_models.Encoder(ModelConfig(**arch))
    state = encoder.state_dict()
    weights = {f"context_encoder.{k}": v for k, v in state.items()}   # the part the timm model reads
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(weights, path)


def test_timm_scott_vit_snippets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the checkpoint paths the README names, relative to the working folder
    _mimjepa_checkpoint(tmp_path / "runs/scott_vits16/checkpoint.safetensors")
    _mimjepa_checkpoint(tmp_path / "runs/demo/pretrain/checkpoint.safetensors", img_size=64, embed_dim=96, depth=4,
                        num_heads=4, tokenizer_hidden=32)
    scope = run("timm-scott-vit", {})
    assert scope["vit"].num_classes == 102 and scope["data_cfg"]["input_size"] == (3, 224, 224)
    assert [tuple(m.shape) for m in scope["maps"]] == [(2, 384, 14, 14)] * 3
    assert len(scope["blocks"]) == 2
    run("timm-checkpoint", scope)
    assert scope["vit"].num_classes == 102
    run("timm-demo-checkpoint", scope)
    assert scope["vit"].embed_dim == 96 and len(scope["vit"].blocks) == 4
