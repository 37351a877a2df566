"""NaN and Inf go where torch's conv, ReLU and max-pool put them, and nowhere else: the reference masks
by selection, so a non-finite value in a masked patch reaches no visible token; the sparse backends
put NaN exactly where the reference does, in values and weight gradients."""

import pytest
import torch

from scott_kernels import SparseConvTokenizer, sparse_conv_tokenize
from scott_kernels.reference import reference_tokenize

from conftest import random_weights

# a 4 x 4 patch grid of 16-px patches, SCOTT's two 7x7 stages
GRID, P = 4, 16


def _images_with(value, at_patches, seed=0):
    """Images with ``value`` at one pixel of each patch in ``at_patches`` (channel 0, 5 px in)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, GRID * P, GRID * P, dtype=torch.float64, generator=g)
    for n in at_patches:
        gy, gx = divmod(n, GRID)
        x[0, 0, gy * P + 5, gx * P + 5] = value
    return x


def _keep(masked):
    keep = torch.ones(1, GRID * GRID, dtype=torch.bool)
    keep[0, list(masked)] = False
    return keep


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_reference_keeps_masked_nonfinite_out_of_visible_tokens(value):
    weights = random_weights(3, (4, 8), (7, 7))
    clean = reference_tokenize(_images_with(0.0, []), weights, _keep([5]), P)
    dirty = reference_tokenize(_images_with(value, [5]), weights, _keep([5]), P)
    assert torch.equal(clean, dirty)   # the masked patch's pixel reaches nothing


def test_reference_nan_reaches_exactly_the_connected_tokens():
    """A NaN in visible patch 0 reaches patch 0 and its visible neighbours (receptive field: two
    patches away), never a masked token."""
    weights = random_weights(3, (4, 8), (7, 7))
    keep = _keep([5])
    out = reference_tokenize(_images_with(float("nan"), [0]), weights, keep, P)
    nan_tokens = torch.isnan(out).any(-1)[0]
    assert not nan_tokens[5] and (out[0, 5] == 0).all()
    assert nan_tokens[0]
    assert not nan_tokens[~keep[0]].any()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["visible", "masked"])
def test_torch_backend_puts_nonfinite_where_the_reference_does(value, where):
    weights = random_weights(3, (4, 8), (7, 7))
    keep = _keep([5, 10])
    x = _images_with(value, [0] if where == "visible" else [5])
    ref = reference_tokenize(x, weights, keep, P)
    out = sparse_conv_tokenize(x, weights, keep, patch_size=P, backend="torch")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-12, atol=1e-12)


def test_num_visible_that_disagrees_with_keep_is_an_error_on_cpu():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, backend="torch")
    keep = torch.tensor([[True, True, False, False], [True, True, True, False]])
    with pytest.raises(ValueError, match=r"row 1 holds 3 visible patches but num_visible=2"):
        tok(torch.randn(2, 3, 32, 32), keep, num_visible=2, packed=True)
    assert tok(torch.randn(2, 3, 32, 32), keep[[0, 0]], num_visible=2, packed=True).shape == (2, 2, 8)


# ---- the triton backend (under TRITON_INTERPRET=1 without a GPU) -----------------------------
def _triton_ok():
    from scott_kernels.triton_configs import triton_supports
    return triton_supports(torch.device("cpu"))


def _images_at(value, patch, offset, seed=0):
    """``_images_with`` at pixel (offset, offset) of one patch: offset 12 is an even column that
    the image stage's zero-weight tap (its 8th column of a 7-wide kernel row) reads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, GRID * P, GRID * P, dtype=torch.float64, generator=g)
    gy, gx = divmod(patch, GRID)
    x[0, 0, gy * P + offset, gx * P + offset] = value
    return x


def _tokens_and_weight_grads(backend, x, keep, seed=0):
    weights = random_weights(3, (4, 8), (7, 7))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for w in weights:
            w.copy_(torch.randn(w.shape, dtype=w.dtype, generator=g) * w.shape[1] ** -0.5 / 7)
    if backend == "reference":
        out = reference_tokenize(x, weights, keep, P)
    else:
        out = sparse_conv_tokenize(x, weights, keep, patch_size=P, backend=backend)
    probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed + 1))
    # the loss reads the finite tokens only, so every weight gradient is finite unless an
    # activation is (a NaN or Inf activation times any gradient, 0 included, is NaN)
    loss = (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * probe).sum()
    return out.detach(), torch.autograd.grad(loss, weights)


@pytest.mark.skipif(not _triton_ok(), reason="triton is not installed (or TRITON_INTERPRET=1 is unset)")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's numpy dot
@pytest.mark.parametrize("offset", [5, 12])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["visible", "masked"])
def test_triton_backend_puts_nonfinite_where_the_reference_does(value, where, offset):
    """Values: NaN and Inf exactly where the reference has them, the rest equal to rounding.

    Weight gradients: the image stage's (the first weight) has NaN exactly where the reference's
    has. The second stage's reference gradient also multiplies activations at masked conv
    outputs by their zero gradient, products the sparse function never forms: a NaN activation
    in a visible patch read by a masked output's window makes the reference NaN at taps where no
    visible output reads it (with the NaN at offset 12 the reference's second gradient is NaN
    everywhere). So there the triton backend's NaN must be those of the other sparse backend
    (torch) and within the reference's, and the values finite in both must agree."""
    keep = _keep([5, 10])
    x = _images_at(value, 6 if where == "visible" else 5, offset)
    ref, ref_grads = _tokens_and_weight_grads("reference", x, keep)
    peer, peer_grads = _tokens_and_weight_grads("torch", x, keep)
    out, grads = _tokens_and_weight_grads("triton", x, keep)

    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)])
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-10, atol=1e-10)
    if where == "masked":
        assert finite.all()

    (r1, r2), (p1, p2), (g1, g2) = ref_grads, peer_grads, grads
    assert torch.equal(torch.isnan(g1), torch.isnan(r1))
    assert torch.equal(torch.isnan(g2), torch.isnan(p2))
    assert not (torch.isnan(g2) & ~torch.isnan(r2)).any()
    if where == "visible":
        assert torch.isnan(g1).any() and torch.isnan(g2).any()
        if offset == 12:
            assert torch.isnan(r2).all()   # nothing of the reference's second gradient to compare
    else:
        assert not torch.isnan(r2).any()
    for g, r in ((g1, r1), (g2, r2)):
        both = torch.isfinite(g) & torch.isfinite(r)
        torch.testing.assert_close(g[both], r[both], rtol=1e-10, atol=1e-10)
