"""The torch backend under torch.compile: the custom ops trace through their fake kernels."""

import pytest
import torch

from scott_kernels import SparseConvTokenizer, reference_tokenize


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_dense_path():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(tok, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, reference_tokenize(x, tok.weights, None, 16), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(w.grad is not None for w in tok.weights)


def test_compile_masked_inductor():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, backend="torch").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    compiled = torch.compile(tok)
    out = compiled(x, keep)
    torch.testing.assert_close(out, reference_tokenize(x, tok.weights, keep, 16), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), tok.convs[1].weight)
    (expected,) = torch.autograd.grad(reference_tokenize(x, tok.weights, keep, 16).sum(), tok.convs[1].weight)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_through_the_tile_ops():
    """gather_tiles and its scatter gradient trace as single graph nodes (fake kernels)."""
    from scott_kernels.ops import gather_tiles

    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2 * 6) >= 0.4
    keep[0] = True
    tile_pos = keep.nonzero().squeeze(1)
    slot = torch.where(keep, torch.arange(12), -1).view(2, 2, 3)

    def f(images):
        src = images.view(2, 3, 2, 16, 3, 16).permute(0, 2, 4, 1, 3, 5)
        return gather_tiles(src, slot, tile_pos, 3, 2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
