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


# --- built as timm builds its own models -----------------------------------------------------------
def test_pretrained_cfgs_are_registered():
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name
        assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
        assert cfg.first_conv == "patch_embed.convs.0" and cfg.classifier == "head"
        assert not cfg.has_weights   # nothing hosted
    assert not timm.list_models("scott_vit*", pretrained=True)
    model = timm.create_model("scott_vit_tiny_patch16_224", **SMALL)
    assert model.pretrained_cfg["architecture"] == "scott_vit_tiny_patch16_224"


def test_pretrained_cfg_overlay_is_honoured():
    model = timm.create_model("scott_vit_tiny_patch16_224", pretrained_cfg_overlay=dict(mean=(0.5,) * 3, crop_pct=1.0),
                              **SMALL)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["mean"] == (0.5,) * 3 and data["crop_pct"] == 1.0 and data["input_size"] == (3, 32, 32)


def test_pretrained_true_fails_clearly_without_a_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", no_download)
    for name in NAMES:
        with pytest.raises(ValueError, match="no published weights.*checkpoint_path="):
            timm.create_model(name, pretrained=True, **SMALL)


def test_pretrained_true_with_a_file_loads_it(tmp_path):
    """timm's own way to load local weights: pretrained_cfg_overlay=dict(file=...), here with a
    mimjepa checkpoint and with the model's own state dict."""
    source = timm.create_model("scott_vit_tiny_patch16_224", **SMALL).eval()
    encoder = _encoder(source, 7)
    path = tmp_path / "checkpoint.safetensors"
    save_weights({f"context_encoder.{k}": v for k, v in encoder.state_dict().items()}
                 | {f"target_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}, path)
    loaded = timm.create_model("scott_vit_tiny_patch16_224", pretrained=True, num_classes=4,
                               pretrained_cfg_overlay=dict(file=str(path)), **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)
    own = tmp_path / "own.pth"
    torch.save(loaded.state_dict(), own)
    # as for timm's models, the head is kept when the cfg's num_classes matches, else it starts fresh
    again = timm.create_model("scott_vit_tiny_patch16_224", pretrained=True, num_classes=4,
                              pretrained_cfg_overlay=dict(file=str(own), num_classes=4), **SMALL).eval()
    assert torch.equal(again(x), loaded(x))
    fresh_head = timm.create_model("scott_vit_tiny_patch16_224", pretrained=True, num_classes=4,
                                   pretrained_cfg_overlay=dict(file=str(own)), **SMALL).eval()
    assert torch.equal(fresh_head.forward_features(x), loaded.forward_features(x))


@pytest.mark.parametrize("out_indices", [(0, 1), (1,), 2])
def test_features_only(out_indices):
    model = timm.create_model("scott_vit_small_patch16_224", features_only=True, out_indices=out_indices, **SMALL)
    model.eval()
    count = len(out_indices) if isinstance(out_indices, tuple) else out_indices
    assert model.feature_info.channels() == [384] * count and model.feature_info.reduction() == [16] * count
    x = torch.randn(2, 3, 32, 32)
    features = model(x)
    assert [tuple(f.shape) for f in features] == [(2, 384, 2, 2)] * count
    # the same tensors forward_intermediates gives on the plain model with the same weights
    plain = timm.create_model("scott_vit_small_patch16_224", **SMALL).eval()
    plain.load_state_dict(model.model.state_dict(), strict=False)
    indices = list(out_indices) if isinstance(out_indices, tuple) else out_indices
    want = plain.forward_intermediates(x, indices=indices, intermediates_only=True)
    for got, expected in zip(features, want):
        assert torch.equal(got, expected)
    # masks reach the tokenizer of a feature model too
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])
    with scott_kernels.masked(model, keep):
        masked = model(x)
    assert not torch.equal(masked[-1], features[-1])


def test_forward_intermediates():
    model = timm.create_model("scott_vit_tiny_patch16_224", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    final, intermediates = model.forward_intermediates(x, indices=2, output_fmt="NLC")
    assert torch.equal(final, model.forward_features(x))
    assert [tuple(t.shape) for t in intermediates] == [(2, 4, 192)] * 2


@pytest.mark.parametrize("kwargs, error, why", [
    (dict(class_token=True), ValueError, "no class token"),
    (dict(global_pool="token"), ValueError, "needs a class token"),
    (dict(no_embed_class=False), ValueError, "patches only"),
    (dict(qkv_bias=True), ValueError, "no biases"),
    (dict(proj_bias=True), ValueError, "no biases"),
    (dict(pos_embed="none"), ValueError, "sin-cos"),
    (dict(patch_size=8), ValueError, "does not match the model's 16"),
    (dict(patch_size=(16, 8)), ValueError, "does not match"),
    (dict(embed_layer=torch.nn.Identity), TypeError, "SparseConvTokenizer"),
    (dict(block_fn=torch.nn.Identity), TypeError, "ScottBlock"),
    (dict(mlp_layer=torch.nn.Identity), TypeError, "ffn_layer="),
    (dict(act_layer=torch.nn.ReLU), TypeError, "activations are fixed"),
])
def test_arguments_the_scott_vit_fixes_are_refused_with_the_reason(kwargs, error, why):
    with pytest.raises(error, match=why):
        timm.create_model("scott_vit_tiny_patch16_224", **kwargs, **SMALL)
    if "patch_size" not in kwargs:   # the class refuses them too (the patch size is the name's)
        with pytest.raises(error, match=why):
            scott_kernels.timm_models.ScottVisionTransformer(**kwargs, **SMALL)


def test_the_fixed_values_themselves_are_accepted():
    model = timm.create_model("scott_vit_tiny_patch16_224", class_token=False, qkv_bias=False, proj_bias=False,
                              no_embed_class=True, patch_size=16, **SMALL)
    assert model.cls_token is None


# --- registration, whichever is imported first -------------------------------------------------------
def _python(code: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mimjepa

    paths = [str(Path(scott_kernels.__file__).resolve().parents[1]), str(Path(mimjepa.__file__).resolve().parents[1])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


SCOTT = "['scott_vit_base_patch16_224', 'scott_vit_small_patch16_224', 'scott_vit_tiny_patch16_224']"


def test_import_scott_kernels_alone_does_not_import_timm():
    assert _python("import sys, scott_kernels; print('timm' in sys.modules, "
                   "any(m.startswith('timm') for m in sys.modules))") == "False False"


@pytest.mark.parametrize("code", [
    "import scott_kernels\nimport timm\nprint(timm.list_models('*scott*'))",
    "import timm\nimport scott_kernels\nprint(timm.list_models('*scott*'))",
    "import scott_kernels\nfrom timm.models import list_models\nprint(list_models('*scott*'))",
    "import scott_kernels.timm_models\nimport timm\nprint(timm.list_models('*scott*'))",
])
def test_registration_does_not_depend_on_import_order(code):
    assert _python(code).splitlines()[-1] == SCOTT


def test_timm_loads_normally_after_scott_kernels():
    out = _python("import scott_kernels, sys\nimport timm\n"
                  "print(type(timm.__spec__.loader).__name__, timm.__loader__ is timm.__spec__.loader,\n"
                  "      [type(f).__name__ for f in sys.meta_path if 'Timm' in type(f).__name__],\n"
                  "      type(timm.create_model('scott_vit_tiny_patch16_224', img_size=32, depth=1)).__name__)")
    assert out == "SourceFileLoader True [] ScottVisionTransformer"
