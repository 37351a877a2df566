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
