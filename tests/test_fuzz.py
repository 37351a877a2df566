"""Property-based tests: random tokenizer problems (image and patch sizes, channels, kernel sizes,
masks in bool and index form, all-visible, all-masked rows, single patches, dtypes, ``packed``,
normalisation and the token epilogue) through every CPU-runnable backend, against the float64
reference in values and gradients; and random invalid inputs, which must raise the documented
error. A failure shrinks to a minimal case, printed by hypothesis in the log."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scott_kernels import functional, sparse_conv_tokenize  # noqa: E402
from scott_kernels.cuda_backend import cuda_tokenize  # noqa: E402



# SCOTT_FUZZ_SEED=random draws new problems on every run (for exploring); by default the draw is
# derandomized, so a CI run is reproducible and a tolerance never flips on a rare draw.
RANDOM = os.environ.get("SCOTT_FUZZ_SEED", "") == "random"


def fuzz(examples: int):
    """Settings of every test here: no deadline (CPU timing varies), no example database (CI
    starts clean), the reproduction blob printed with a failure."""
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# per compute dtype: (rtol, atol relative to the reference's largest magnitude)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3}


@st.composite
def problems(draw, dtypes=(torch.float64, torch.float32)):
    """One tokenizer problem: shapes, weights, mask, options (all tensors drawn from a seed)."""
    patch = draw(st.sampled_from([4, 16]))
    stages = 1 if patch == 4 else 2
    batch = draw(st.integers(1, 2))
    grid_h, grid_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = grid_h * grid_w
    c_in = draw(st.integers(1, 4))
    epilogue = draw(st.sampled_from(["none", "norm", "pos", "mask_token", "all"]))
    # a LayerNorm over one feature is identically its bias, over two or three ill-conditioned in float32
    widths = [draw(st.integers(1, 6)) for _ in range(stages - 1)]
    widths.append(draw(st.integers(4 if epilogue in ("norm", "all") else 1, 6)))
    kernels = [draw(st.sampled_from([1, 3, 5, 7])) for _ in range(stages)]
    dtype = draw(st.sampled_from(dtypes))
    mask_kind = draw(st.sampled_from(["none", "all_visible", "random", "single", "all_masked_row", "fixed_count"]))
    index_form = mask_kind in ("fixed_count", "single", "all_visible") and draw(st.booleans())
    equal_rows = mask_kind in ("none", "all_visible", "fixed_count", "single")
    packed = equal_rows and draw(st.booleans())
    give_count = equal_rows and mask_kind != "none" and draw(st.booleans())
    uint8 = draw(st.booleans()) and draw(st.booleans())   # a quarter of the problems
    normalise = uint8 or draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))

    g = torch.Generator().manual_seed(seed)
    if mask_kind == "none":
        keep = None
    elif mask_kind == "all_visible":
        keep = torch.ones(batch, n, dtype=torch.bool)
    elif mask_kind == "random":
        keep = torch.rand(batch, n, generator=g) >= 0.5
    elif mask_kind == "all_masked_row":
        keep = torch.rand(batch, n, generator=g) >= 0.5
        keep[0] = False
    else:
        count = 1 if mask_kind == "single" else int(torch.randint(0, n + 1, (1,), generator=g))
        keep = torch.zeros(batch, n, dtype=torch.bool)
        for b in range(batch):
            keep[b, torch.randperm(n, generator=g)[:count]] = True
    ids = None
    if keep is not None and index_form:
        count = int(keep[0].sum())
        ids = torch.stack([torch.randperm(n, generator=g)[:count] for _ in range(batch)]) if count else \
            torch.zeros(batch, 0, dtype=torch.int64)
        keep = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, ids, True)

    shape = (batch, c_in, grid_h * patch, grid_w * patch)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8 else \
        torch.randn(shape, generator=g, dtype=torch.float64)
    weights, c = [], c_in
    for width, k in zip(widths, kernels):
        weights.append(torch.randn(width, c, k, k, generator=g, dtype=torch.float64) * (2.0 / (c * k * k)) ** 0.5)
        c = width
    d = widths[-1]
    options = {}
    if normalise:
        scale = 255.0 if uint8 else 1.0
        options["pixel_mean"] = (torch.rand(c_in, generator=g, dtype=torch.float64) * scale).tolist()
        options["pixel_std"] = ((torch.rand(c_in, generator=g, dtype=torch.float64) + 0.5) * scale * 0.3).tolist()
    if epilogue in ("norm", "all"):
        options["norm"] = (torch.randn(d, generator=g, dtype=torch.float64),
                           torch.randn(d, generator=g, dtype=torch.float64), 1e-5)
    if epilogue in ("pos", "all"):
        options["pos_embed"] = torch.randn(n, d, generator=g, dtype=torch.float64)
    if epilogue in ("mask_token", "all"):
        options["mask_token"] = torch.randn(d, generator=g, dtype=torch.float64)
    return dict(x=x, weights=weights, keep=keep if ids is None else ids, patch=patch, dtype=dtype, packed=packed,
                num_visible=int(keep[0].sum()) if give_count and ids is None else None, options=options)


def _as(value, dtype, grad=False):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype).requires_grad_(grad)
    if isinstance(value, tuple):
        return tuple(_as(v, dtype, grad) for v in value)
    return value


def _run(backend, p, dtype):
    """Tokens and the gradients of (tokens * probe).sum() with respect to the float tensors."""
    x = p["x"] if p["x"].dtype == torch.uint8 else _as(p["x"], dtype, True)
    weights = [_as(w, dtype, True) for w in p["weights"]]
    options = {k: _as(v, dtype, True) if k != "pixel_mean" and k != "pixel_std" else v for k, v in p["options"].items()}
    out = sparse_conv_tokenize(x, weights, p["keep"], patch_size=p["patch"], backend=backend,
                               num_visible=p["num_visible"], packed=p["packed"], **options)
    inputs = weights + ([x] if x.is_floating_point() else [])
    inputs += [t for v in options.values() for t in (v if isinstance(v, tuple) else (v,))
               if isinstance(t, torch.Tensor)]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad((out * probe).sum(), inputs, allow_unused=True) if out.numel() else [None] * len(inputs)
    return out, grads


def _check(backend, p):
    ref, ref_grads = _run("reference", p, torch.float64)
    out, grads = _run(backend, p, p["dtype"])
    assert out.shape == ref.shape and out.dtype == p["dtype"], (out.shape, ref.shape, out.dtype)
    tol = TOLERANCE[p["dtype"]]
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * max(scale, 1e-30))
    # a gradient that cancels to ~0 in float64 is compared on the scale of the largest one
    floor = 1e-3 * max([r.abs().max().item() for r in ref_grads if r is not None and r.numel()] + [1e-30])
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None or g is None:
            assert (r is None or not r.any()) and (g is None or not g.any()), f"gradient {i}: one side is missing"
            continue
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * max(r.abs().max().item(), floor),
                                   msg=lambda m: f"gradient {i}: {m}")


def _cuda_twin():
    """backend="cuda" on CPU tensors: the CUDA kernels' C++ twin, through the public entry point."""
    return mock.patch.dict(functional.BACKENDS, {"cuda": (cuda_tokenize, lambda device: True)})


@fuzz(400)
@given(problems())
def test_torch_backend_matches_reference(p):
    _check("torch", p)


@fuzz(400)
@given(problems())
def test_cuda_twin_matches_reference(p):
    with _cuda_twin():
        _check("cuda", p)


@fuzz(20)
@given(problems(dtypes=(torch.float64,)))
def test_triton_interpreter_matches_reference(p):
    """The Triton kernels under the interpreter (slow: fewer examples; float64, as float32 dot
    products on the interpreter are exact to float32 anyway)."""
    if not functional.BACKENDS["triton"][1](torch.device("cpu")):
        pytest.skip("Triton's interpreter is not active (TRITON_INTERPRET=1 before importing triton)")
    _check("triton", p)


# ---- invalid input: the documented error, naming the argument -----------------------------------
INVALID = {
    # name: (mutation of a valid call's kwargs, expected exception, message pattern)
    "image size not a multiple of the patch": (lambda a: a.update(x=a["x"][..., :-1]), ValueError, "multiples of patch_size"),
    "3-D images": (lambda a: a.update(x=a["x"][0]), ValueError, "images must be 4-D"),
    "int32 images": (lambda a: a.update(x=a["x"].int()), TypeError, "images must be uint8"),
    "wrong mask size": (lambda a: a.update(keep=a["keep"][:, :-1]), ValueError, "keep must have shape"),
    "float mask": (lambda a: a.update(keep=a["keep"].float()), TypeError, "keep must be a"),
    "mask on another batch": (lambda a: a.update(keep=a["keep"][:1].repeat(3, 1)), ValueError, "keep must have shape"),
    "out-of-range index": (lambda a: a.update(keep=torch.full((a["x"].shape[0], 1), 10 ** 6)), ValueError, "out of range"),
    "repeated index": (lambda a: a.update(keep=torch.zeros(a["x"].shape[0], 2, dtype=torch.int64)), ValueError, "repeats"),
    "num_visible too large": (lambda a: a.update(num_visible=10 ** 6), ValueError, "num_visible must be in"),
    "num_visible disagrees": (lambda a: a.update(num_visible=int(a["keep"][0].sum()) + 1, keep=a["keep"]),
                              ValueError, "num_visible"),
    "wrong stage count": (lambda a: a.update(weights=a["weights"][:1]), ValueError, "conv stages"),
    "channels mismatch": (lambda a: a.update(weights=[torch.cat([a["weights"][0], a["weights"][0][:, :1]], 1)]
                                             + a["weights"][1:]), ValueError, "input channels"),
    "even kernel": (lambda a: a.update(weights=[a["weights"][0].new_zeros(*a["weights"][0].shape[:2], 2, 2)]
                                       + a["weights"][1:]), ValueError, "odd size"),
    "mixed dtypes": (lambda a: a.update(weights=[a["weights"][0].float()] + a["weights"][1:]), TypeError, "dtype"),
    "unknown backend": (lambda a: a.update(backend="fastest"), ValueError, "backend must be"),
    "bad pos_embed": (lambda a: a.update(pos_embed=torch.zeros(a["keep"].shape[1] + 1, a["weights"][-1].shape[0],
                                                               dtype=torch.float64)), ValueError, "pos_embed"),
    "pixel_std without mean": (lambda a: a.update(pixel_std=[1.0] * a["x"].shape[1]), ValueError, "go together"),
}


@fuzz(200)
@given(problems(dtypes=(torch.float64,)), st.sampled_from(sorted(INVALID)), st.sampled_from(["torch", "reference"]))
def test_invalid_input_raises_the_documented_error(p, case, backend):
    if p["x"].dtype == torch.uint8:
        p["x"] = p["x"].double()
    n = (p["x"].shape[2] // p["patch"]) * (p["x"].shape[3] // p["patch"])
    kwargs = dict(x=p["x"], weights=p["weights"], keep=torch.rand(p["x"].shape[0], n) >= 0.5, patch_size=p["patch"],
                  backend=backend)
    mutate, error, pattern = INVALID[case]
    mutate(kwargs)
    if case == "wrong stage count" and len(p["weights"]) == 1:
        kwargs["weights"] = p["weights"] * 2
    if case == "num_visible disagrees" and kwargs["num_visible"] > n:
        pattern = "num_visible must be in"
    if case == "repeated index" and n == 1:   # two indices cannot fit one patch: the shape is wrong first
        pattern = "keep as indices must have shape"
    x = kwargs.pop("x")
    weights = kwargs.pop("weights")
    keep = kwargs.pop("keep")
    with pytest.raises(error, match=pattern):
        sparse_conv_tokenize(x, weights, keep, **kwargs)
