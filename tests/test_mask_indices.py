"""Masks as (B, K) indices of the kept patches (MAE's ids_keep, I-JEPA's mask indices) against the
same masks as (B, N) bool: values and weight gradients on every backend that runs here."""

import pytest
import torch
from torch import nn

import scott_kernels
from scott_kernels import SparseConvTokenizer, keep_from_indices, sparse_conv_tokenize

from conftest import HAS_CUDA, random_weights

_NEEDS_CUDA = pytest.mark.skipif(not (HAS_CUDA and scott_kernels.build_info()["cuda"]),
                                 reason="needs a CUDA GPU and a CUDA build (none present)")
# B, H, W, patch, kernels, widths: a 2x3 grid, so a kept patch has masked and visible neighbours
# (small: the triton backend runs under its interpreter on a CPU)
CFG = (2, 32, 48, 16, (7, 7), (4, 5))


def _ids_keep(B, N, K, generator, sort=False):
    """MAE's random_masking: argsort of uniform noise, first K -> random (unsorted) order."""
    ids = torch.argsort(torch.rand(B, N, generator=generator), dim=1)[:, :K]
    return ids.sort(dim=1).values if sort else ids


def _as_bool(ids, N):
    keep = torch.zeros(ids.shape[0], N, dtype=torch.bool)
    keep[torch.arange(ids.shape[0]).unsqueeze(1), ids] = True
    return keep


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


# every backend x (K kept of N = 6) x packed; the interpreted triton backend on fewer cases (its
# interpreter is slow): some kept in both layouts, and none kept
CASES = [pytest.param(b, K, packed, marks=[_NEEDS_CUDA] if b == "cuda" else [], id=f"{b}-K{K}-packed{packed}")
         for b in ("reference", "torch", "cuda") for K in (4, 0, 6) for packed in (True, False)]
CASES += [pytest.param("triton", K, packed, id=f"triton-K{K}-packed{packed}")
          for K, packed in ((4, True), (4, False), (0, True))]


@pytest.mark.parametrize("backend, K, packed", CASES)
def test_indices_match_bool_mask(backend, K, packed):
    B, H, W, P, kernels, widths = CFG
    N = (H // P) * (W // P)
    device = _device(backend)
    g = torch.Generator().manual_seed(K + 7 * packed)
    ids = _ids_keep(B, N, K, g)
    keep = _as_bool(ids, N).to(device)
    ids = ids.to(device)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, generator=g).to(device)
    weights = random_weights(3, widths, kernels, device=device)

    full = sparse_conv_tokenize(x, weights, keep, patch_size=P, backend=backend)
    expected = full.gather(1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1])) if packed else full
    out = sparse_conv_tokenize(x, weights, ids, patch_size=P, backend=backend, packed=packed)
    assert out.shape == expected.shape == ((B, K, widths[-1]) if packed else (B, N, widths[-1]))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    probe = torch.randn(expected.shape, dtype=torch.float64, generator=g).to(device)
    want = torch.autograd.grad((expected * probe).sum(), weights, allow_unused=True)
    got = torch.autograd.grad((out * probe).sum(), weights, allow_unused=True)
    for w, a, b in zip(weights, want, got):
        a = torch.zeros_like(w) if a is None else a
        b = torch.zeros_like(w) if b is None else b
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_sorted_indices_pack_in_row_major_order(backend):
    """I-JEPA's context indices are ascending: packed tokens then equal the bool form's packed
    (row-major) tokens, and num_visible given alongside must agree with K."""
    B, H, W, P, kernels, widths = CFG
    N = (H // P) * (W // P)
    g = torch.Generator().manual_seed(3)
    ids = _ids_keep(B, N, 4, g, sort=True)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, generator=g)
    weights = random_weights(3, widths, kernels, requires_grad=False)
    by_mask = sparse_conv_tokenize(x, weights, _as_bool(ids, N), patch_size=P, backend=backend, packed=True,
                                   num_visible=4)
    by_ids = sparse_conv_tokenize(x, weights, ids, patch_size=P, backend=backend, packed=True, num_visible=4)
    torch.testing.assert_close(by_ids, by_mask, rtol=0, atol=0)


def test_indices_with_token_epilogue():
    """Position embedding and norm follow each token into the indices' order."""
    B, H, W, P, kernels, widths = CFG
    N, D = (H // P) * (W // P), widths[-1]
    g = torch.Generator().manual_seed(5)
    ids = _ids_keep(B, N, 3, g)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, generator=g)
    weights = random_weights(3, widths, kernels, requires_grad=False)
    pos = torch.randn(N, D, dtype=torch.float64, generator=g)
    norm = (torch.rand(D, dtype=torch.float64, generator=g), torch.randn(D, dtype=torch.float64, generator=g), 1e-6)
    full = sparse_conv_tokenize(x, weights, _as_bool(ids, N), patch_size=P, backend="torch", norm=norm, pos_embed=pos)
    out = sparse_conv_tokenize(x, weights, ids, patch_size=P, backend="torch", norm=norm, pos_embed=pos, packed=True)
    torch.testing.assert_close(out, full.gather(1, ids.unsqueeze(-1).expand(-1, -1, D)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])   # the backends' part is covered above
def test_module_mae_style(backend):
    """MAE: `x = patch_embed(imgs); x = x + pos; x, mask, ids_restore = random_masking(x)` becomes one
    call with ids_keep; the packed tokens come in ids_keep's order, like MAE's gather."""
    tok = SparseConvTokenizer(img_size=(32, 48), embed_dim=6, hidden_channels=5, norm_layer=nn.LayerNorm,
                              backend=backend).double()
    B, N, K = 2, tok.num_patches, 4
    g = torch.Generator().manual_seed(11)
    imgs = torch.randn(B, 3, 32, 48, dtype=torch.float64, generator=g)
    ids_keep = _ids_keep(B, N, K, g)
    keep = _as_bool(ids_keep, N)
    full = tok(imgs, keep)
    packed = tok(imgs, ids_keep, packed=True)
    torch.testing.assert_close(packed, full.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, 6)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tok(imgs, ids_keep), full, rtol=0, atol=0)   # (B, N, D), masked rows 0 after norm
    grads = torch.autograd.grad(packed.square().sum(), tok.weights)
    ref = torch.autograd.grad(tok(imgs, keep, packed=True, num_visible=K).square().sum(), tok.weights)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with tok.masked(ids_keep):               # the timm path: the mask arrives without a call argument
        torch.testing.assert_close(tok(imgs), full, rtol=0, atol=0)


def test_int32_indices_are_accepted():
    tok = SparseConvTokenizer(img_size=32, embed_dim=4, hidden_channels=3, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[3, 0], [1, 2]])
    torch.testing.assert_close(tok(x, ids.int(), packed=True), tok(x, ids, packed=True))


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([[0, 4], [1, 2]]), "index 4 at row 0 is out of range for N=4"),
    (torch.tensor([[0, 1], [-1, 2]]), "index -1 at row 1 is out of range"),
    (torch.tensor([[0, 1], [2, 2]]), r"row 1 repeats patch indices \[2\]"),
    (torch.tensor([[0, 1, 2]]), r"keep as indices must have shape \(B, K\) = \(2, K <= 4\)"),
    (torch.zeros(2, 5, dtype=torch.long), r"\(2, K <= 4\)"),
    (torch.zeros(2, dtype=torch.long), r"\(B, K\)"),
])
def test_bad_indices(ids, match):
    tok = SparseConvTokenizer(img_size=32, embed_dim=4, hidden_channels=3, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=match):
        tok(x, ids)
    with pytest.raises(ValueError, match=match):
        sparse_conv_tokenize(x, tok.weights, ids, backend="reference")


def test_bad_index_dtypes_and_counts():
    tok = SparseConvTokenizer(img_size=32, embed_dim=4, hidden_channels=3, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r"or \(B, K\) int64 indices.*pass keep.bool\(\)"):
        tok(x, torch.ones(2, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got torch.float32"):
        tok(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="num_visible=3 but keep holds K=2 indices"):
        tok(x, torch.tensor([[0, 1], [2, 3]]), num_visible=3)


def test_keep_from_indices_checks():
    ids = torch.tensor([[2, 0], [3, 1]])
    assert keep_from_indices(ids, 4).tolist() == [[True, False, True, False], [False, True, False, True]]
    with pytest.raises(ValueError, match="repeats"):
        keep_from_indices(torch.tensor([[1, 1]]), 4, sync_check=True)
    # the device-side check (what runs on a GPU, and under torch.compile) fails too; on the CPU
    # torch raises it at once
    bad = torch.tensor([[1, 1]])
    with pytest.raises(RuntimeError, match="repeats a patch index"):
        torch.compile(lambda t: keep_from_indices(t, 4), backend="eager", fullgraph=True)(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
def test_indices_need_no_host_synchronisation():
    """Index masks on the GPU: conversion, check and the sync-free triton path never wait for the GPU."""
    tok = SparseConvTokenizer(img_size=64, embed_dim=32, hidden_channels=16, backend="triton").cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    ids = torch.argsort(torch.rand(4, tok.num_patches, device="cuda"), dim=1)[:, :6]
    expected = tok(x, ids, packed=True)          # also tunes the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tok(x, ids, packed=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, expected)
