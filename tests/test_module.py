"""SparseConvTokenizer: API, timm drop-in, state dicts, masks, bad input."""

import pytest
import torch
from torch import nn

import scott_kernels as sk
from scott_kernels import SparseConvTokenizer, reference_tokenize, sparse_conv_tokenize


def test_scott_defaults():
    tok = SparseConvTokenizer()
    assert tok.img_size == (224, 224) and tok.patch_size == (16, 16) and tok.grid_size == (14, 14)
    assert tok.num_patches == 196 and tok.embed_dim == 384 and tok.feat_ratio() == 16
    assert [tuple(c.weight.shape) for c in tok.convs] == [(64, 3, 7, 7), (384, 64, 7, 7)]
    assert all(c.bias is None and c.stride == (2, 2) and c.padding == (3, 3) for c in tok.convs)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_forward_matches_reference(backend):
    tok = SparseConvTokenizer(img_size=64, embed_dim=24, hidden_channels=8, backend=backend).double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    keep = torch.rand(3, 16) >= 0.6
    out = tok(x, keep)
    assert out.shape == (3, 16, 24)
    assert (out[~keep] == 0).all()
    torch.testing.assert_close(out, reference_tokenize(x, tok.weights, keep, 16), rtol=1e-10, atol=1e-12)


def test_configurable_stages_and_kernels():
    tok = SparseConvTokenizer(img_size=128, patch_size=64, embed_dim=10, hidden_channels=(4, 6), kernel_size=(5, 3, 7))
    assert len(tok.convs) == 3 and tok.grid_size == (2, 2)
    assert tok(torch.randn(1, 3, 128, 128)).shape == (1, 4, 10)
    tok4 = SparseConvTokenizer(img_size=32, patch_size=4, embed_dim=10)
    assert len(tok4.convs) == 1 and tok4(torch.randn(2, 3, 32, 32)).shape == (2, 64, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(patch_size=8), "power of 4"),
    (dict(patch_size=(16, 8)), "square"),
    (dict(img_size=200), "multiple of patch_size"),
    (dict(kernel_size=4), "odd"),
    (dict(hidden_channels=(8, 8)), "hidden_channels"),
    (dict(backend="fastest"), "backend"),
    (dict(output_fmt="NLHW"), "output_fmt"),
    (dict(dynamic_img_pad=True), "dynamic_img_pad"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConvTokenizer(**kwargs)


def test_output_formats_and_norm():
    x = torch.randn(2, 3, 32, 48)
    keep = torch.rand(2, 6) >= 0.5
    base = SparseConvTokenizer(img_size=(32, 48), embed_dim=8, hidden_channels=4)
    tokens = base(x, keep)
    nhwc = SparseConvTokenizer(img_size=(32, 48), embed_dim=8, hidden_channels=4, output_fmt="NHWC")
    nhwc.load_state_dict(base.state_dict())
    assert torch.equal(nhwc(x, keep), tokens.view(2, 2, 3, 8))
    nchw = SparseConvTokenizer(img_size=(32, 48), embed_dim=8, hidden_channels=4, flatten=False)
    nchw.load_state_dict(base.state_dict())
    assert torch.equal(nchw(x, keep), tokens.view(2, 2, 3, 8).permute(0, 3, 1, 2))
    normed = SparseConvTokenizer(img_size=(32, 48), embed_dim=8, hidden_channels=4, norm_layer=nn.LayerNorm)
    normed.load_state_dict(base.state_dict(), strict=False)
    out = normed(x, keep)
    assert (out[~keep] == 0).all()
    torch.testing.assert_close(out[keep], nn.functional.layer_norm(tokens[keep], (8,)), rtol=1e-5, atol=1e-5)


def test_masked_context_manager():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[True, False, False, True], [False, False, False, False]])
    with tok.masked(keep):
        inside = tok(x)
    assert torch.equal(inside, tok(x, keep))
    assert not torch.equal(tok(x), inside)  # the mask does not outlive the block
    assert tok._pending_keep is None


def test_timm_vision_transformer_drop_in():
    timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install '.[test]')")
    from timm.models import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=7,
                            embed_layer=SparseConvTokenizer)
    tok = vit.patch_embed
    assert isinstance(tok, SparseConvTokenizer) and tok.num_patches == 16
    assert vit.pos_embed.shape == (1, 17, 32)
    x = torch.randn(2, 3, 64, 64)
    keep = torch.rand(2, 16) >= 0.6
    assert vit(x).shape == (2, 7)
    captured = {}
    hook = tok.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    with sk.masked(vit, keep):
        logits = vit(x)
    hook.remove()
    assert logits.shape == (2, 7)
    assert (captured["tokens"][~keep] == 0).all()
    torch.testing.assert_close(captured["tokens"], tok(x, keep))
    logits.sum().backward()
    assert tok.convs[0].weight.grad is not None
    # timm's dynamic-size path asks for NHWC output and non-strict sizes
    dyn = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                            embed_layer=SparseConvTokenizer, dynamic_img_size=True)
    assert dyn(torch.randn(1, 3, 48, 80)).shape == (1, 3)


def test_masked_requires_a_tokenizer():
    with pytest.raises(ValueError, match="no SparseConvTokenizer"):
        with sk.masked(nn.Linear(2, 2), None):
            pass


def test_state_dict_round_trip_and_official_keys():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4)
    own = tok.state_dict()
    assert set(own) == {"convs.0.weight", "convs.1.weight"}
    official = {"tokenizer.0.weight": torch.randn(4, 3, 7, 7), "tokenizer.3.weight": torch.randn(8, 4, 7, 7)}
    fresh = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4)
    fresh.load_state_dict(official)
    assert torch.equal(fresh.convs[0].weight, official["tokenizer.0.weight"])
    assert torch.equal(fresh.convs[1].weight, official["tokenizer.3.weight"])
    fresh.load_state_dict(own)
    assert torch.equal(fresh.convs[1].weight, own["convs.1.weight"])
    # nested as in the reference model: <model>.tokenizer.tokenizer.{0,3}.weight
    holder = nn.Module()
    holder.tokenizer = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4)
    holder.load_state_dict({f"tokenizer.{k}": v for k, v in official.items()})
    assert torch.equal(holder.tokenizer.convs[0].weight, official["tokenizer.0.weight"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({"tokenizer.0.weight": torch.randn(5, 3, 7, 7),
                               "tokenizer.3.weight": official["tokenizer.3.weight"]})
    with pytest.raises(KeyError, match="tokenizer.0, .3"):
        fresh.load_state_dict({"tokenizer.1.weight": torch.randn(1)})


# ---- bad input to forward: each names the argument and what was expected ---------------------
@pytest.fixture
def tok():
    return SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, strict_img_size=False)


def test_uint8_images_with_normalisation():
    """uint8 images go in as they are; the module normalises them with its pixel_mean/pixel_std."""
    mean, std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, pixel_mean=mean, pixel_std=std).double()
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    normalised = (raw.double() - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)
    torch.testing.assert_close(tok(raw, keep), reference_tokenize(normalised, tok.weights, keep, 16))
    assert "pixel_mean" not in tok.state_dict()   # a setting, not a weight
    with pytest.raises(ValueError, match="in_chans=3 values"):
        SparseConvTokenizer(pixel_mean=(0.0,), pixel_std=(1.0,))


def test_bad_images(tok):
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        tok([[1.0]])
    with pytest.raises(ValueError, match=r"images must be 4-D \(B, C, H, W\)"):
        tok(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="images must be uint8, float16, bfloat16, float32 or float64"):
        tok(torch.zeros(1, 3, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty batch"):
        tok(torch.randn(0, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of patch_size=16, got 30x32"):
        tok(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expects 3 input channels but images have 1"):
        tok(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="dtype torch.float32 but images have torch.float64"):
        tok(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    strict = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4)
    with pytest.raises(ValueError, match="images must be 32x32"):
        strict(torch.randn(1, 3, 48, 32))


def test_bad_masks(tok):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r"keep must be a \(B, N\) bool mask"):
        tok(x, torch.ones(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"keep must have shape \(B, N\) = \(2, 4\)"):
        tok(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep must have shape"):
        tok(x, torch.ones(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep must be a torch.Tensor"):
        tok(x, [[True] * 4] * 2)


def test_device_mismatch_is_named():
    x = torch.randn(1, 3, 32, 32)
    weights = [torch.randn(4, 3, 7, 7, device="meta"), torch.randn(8, 4, 7, 7)]
    with pytest.raises(ValueError, match=r"weights\[0\] is on meta but images are on cpu"):
        sparse_conv_tokenize(x, weights)
    with pytest.raises(ValueError, match="keep is on meta but images are on cpu"):
        sparse_conv_tokenize(x, [torch.randn(4, 3, 7, 7), weights[1]], torch.ones(1, 4, dtype=torch.bool, device="meta"))


def test_functional_geometry_errors():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="needs 2 conv stages, got 1"):
        sparse_conv_tokenize(x, [torch.randn(4, 3, 7, 7)])
    with pytest.raises(ValueError, match="odd size"):
        sparse_conv_tokenize(x, [torch.randn(4, 3, 6, 6), torch.randn(8, 4, 7, 7)])
    with pytest.raises(ValueError, match="backend must be"):
        sparse_conv_tokenize(x, [torch.randn(4, 3, 7, 7), torch.randn(8, 4, 7, 7)], backend="cudnn")


def test_backend_selection_and_build_info():
    # spconv (an optional extra) is listed after these when installed
    assert sk.available_backends("cpu")[:2] == ["torch", "reference"]
    assert sk.select_backend("auto", "cpu") == "torch"
    info = sk.build_info()
    assert {"cuda", "cuda_archs", "cpp_only", "torch", "triton_usable"} <= set(info)


def test_half_precision_on_cpu():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    keep = torch.rand(2, 4) >= 0.5
    out = tok(x, keep)
    ref = reference_tokenize(x.double(), [w.double() for w in tok.weights], keep, 16)
    low = reference_tokenize(x, tok.weights, keep, 16)
    err, err_low = (out.double() - ref).abs().max(), (low.double() - ref).abs().max()
    assert err <= 2 * err_low + 1e-2 * ref.abs().max()
    out.float().sum().backward()
    assert tok.convs[0].weight.grad.dtype == torch.bfloat16
