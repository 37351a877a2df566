"""The SCOTT ViTs registered with timm: build, forward, checkpoints from mimjepa, the SCOTT
reference code and timm itself."""

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors = pytest.importorskip("safetensors")

import scott_kernels  # noqa: E402
import scott_kernels.timm_models  # noqa: E402,F401  (registers the models)
from mimjepa.checkpoint import CheckpointError, save_weights  # noqa: E402
from mimjepa.config import ModelConfig  # noqa: E402
from mimjepa.models import Encoder, Predictor  # noqa: E402

NAMES = ["scott_vit_tiny_patch16_224", "scott_vit_small_patch16_224", "scott_vit_base_patch16_224"]
SMALL = dict(img_size=32, depth=2)   # 2x2 patches, two blocks: CPU-cheap


def _encoder(model, seed):
    torch.manual_seed(seed)
    return Encoder(model.model_config()).eval()


@pytest.mark.parametrize("name", NAMES)
def test_create_and_forward(name):
    assert name in timm.list_models("scott_vit*")
    model = timm.create_model(name, pretrained=False, num_classes=7, **SMALL).eval()
    assert isinstance(model, timm.models.VisionTransformer)
    assert isinstance(model.patch_embed, scott_kernels.SparseConvTokenizer)
    width = scott_kernels.timm_models.SCOTT_VIT_SIZES[name]["embed_dim"]
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 4, width)
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    with scott_kernels.masked(model, keep):
        masked = model(x)
    assert masked.shape == (2, 7) and not torch.allclose(masked, model(x))
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


def test_default_sizes_match_the_names():
    model = timm.create_model("scott_vit_small_patch16_224")
    assert model.patch_embed.img_size == (224, 224) and model.embed_dim == 384 and len(model.blocks) == 12
    assert model.num_classes == 1000 and not model.pos_embed.requires_grad
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("scott_vit_small_patch16_224", pretrained=True)


@pytest.mark.parametrize("which", ["context", "target"])
def test_mimjepa_checkpoint(tmp_path, which):
    """A file laid out as mimjepa's Trainer.save writes it; the timm model computes what the saved
    encoder computes."""
    kwargs = dict(SMALL, num_classes=5)
    model = timm.create_model("scott_vit_tiny_patch16_224", **kwargs)
    cfg = model.model_config()
    context, target = _encoder(model, 1), _encoder(model, 2)
    torch.manual_seed(3)
    predictor = Predictor(cfg)
    weights = {f"context_encoder.{k}": v for k, v in context.state_dict().items()}
    weights.update({f"target_encoder.{k}": v for k, v in target.state_dict().items()})
    weights.update({f"predictor.{k}": v for k, v in predictor.state_dict().items()})
    path = tmp_path / "checkpoint.safetensors"
    save_weights(weights, path, metadata={"step": "1"})

    loaded = timm.create_model("scott_vit_tiny_patch16_224", checkpoint_path=str(path), checkpoint_encoder=which,
                               **kwargs).eval()
    x = torch.randn(3, 3, 32, 32)
    want = (context if which == "context" else target)(x)
    torch.testing.assert_close(loaded.forward_features(x), want, rtol=1e-5, atol=1e-5)
    keep = torch.tensor([[True, False, False, True]] * 3)
    with torch.no_grad(), scott_kernels.masked(loaded, keep):
        masked_tokens = loaded.patch_embed(x)
    torch.testing.assert_close(masked_tokens, (context if which == "context" else target).tokenizer(x, keep))
    # the head and pooling norm keep their fresh values: the file has none
    assert loaded(x).shape == (3, 5)


def test_reference_code_encoder_state_dict(tmp_path):
    model = timm.create_model("scott_vit_small_patch16_224", **SMALL)
    encoder = _encoder(model, 4)
    state = {}
    for key, value in encoder.state_dict().items():   # the reference code's names, saved under DDP
        key = key.replace("tokenizer.convs.0.", "tokenizer.tokenizer.0.").replace("tokenizer.convs.1.",
                                                                                  "tokenizer.tokenizer.3.")
        state[f"module.{key}"] = value
    path = tmp_path / "context-encoder_checkpoint.pth"
    torch.save(state, path)
    loaded = timm.create_model("scott_vit_small_patch16_224", checkpoint_path=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)


def test_registers_and_mlp_feed_forward(tmp_path):
    kwargs = dict(SMALL, reg_tokens=2, ffn_layer="mlp", mlp_ratio=2.0)
    model = timm.create_model("scott_vit_tiny_patch16_224", **kwargs)
    cfg = model.model_config()
    assert cfg.num_register_tokens == 2 and cfg.ffn_layer == "mlp" and cfg.mlp_ratio == 2.0
    encoder = _encoder(model, 5)
    torch.nn.init.normal_(encoder.transformer.reg_embed)
    path = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), path)
    loaded = timm.create_model("scott_vit_tiny_patch16_224", checkpoint_path=str(path), **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_features(x)[:, 2:], encoder(x), rtol=1e-5, atol=1e-5)


def test_timm_state_dict_round_trip(tmp_path):
    model = timm.create_model("scott_vit_base_patch16_224", num_classes=3, **SMALL).eval()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    loaded = timm.create_model("scott_vit_base_patch16_224", num_classes=3, checkpoint_path=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_mismatched_checkpoint_is_refused(tmp_path):
    model = timm.create_model("scott_vit_tiny_patch16_224", **SMALL)
    encoder = _encoder(model, 6)
    path = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): \['transformer.blocks.2"):
        timm.create_model("scott_vit_tiny_patch16_224", checkpoint_path=str(path), img_size=32, depth=3)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        timm.create_model("scott_vit_tiny_patch16_224", checkpoint_path=str(path), img_size=64, depth=2)
    state = dict(encoder.state_dict(), extra=torch.zeros(1))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): \['extra'\]"):
        timm.create_model("scott_vit_tiny_patch16_224", checkpoint_path=str(path), **SMALL)
