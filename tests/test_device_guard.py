"""Every op body runs under its inputs' device, never just the current one: each native and Triton
op is registered through ``scott_kernels._device.custom_op``, and a forward+backward through each
backend enters the guard for its tensors' device in every op it calls. On two GPUs the same
tokenizer runs on ``cuda:1`` while ``cuda:0`` is current."""

import ast
import contextlib
import inspect
from pathlib import Path
from unittest import mock

import pytest
import torch

import scott_kernels
from scott_kernels import _device, functional, sparse_conv_tokenize
from scott_kernels.cuda_backend import cuda_tokenize
from scott_kernels.reference import reference_tokenize
from scott_kernels.triton_configs import triton_supports

from conftest import RecordingMode, random_weights

PACKAGE = Path(scott_kernels.__file__).resolve().parent


def test_every_op_is_registered_through_the_guarded_custom_op():
    """No module registers an op with torch.library.custom_op / triton_op directly."""
    direct = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("custom_op", "triton_op") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "library" \
                    and path.name != "_device.py":
                direct.append(f"{path.name}:{node.lineno}")
    assert not direct, f"ops registered without the device guard: {direct}"


@contextlib.contextmanager
def _recording_ops():
    """(op name, device) of every guarded op body entered."""
    entered = []
    original_guard = _device.device_guard

    def guard(device):
        frame = inspect.currentframe().f_back   # the wrapper around the op body, which holds it as fn
        fn = frame.f_locals.get("fn")
        entered.append((getattr(fn, "__qualname__", "?"), getattr(fn, "__module__", "?"), device))
        return original_guard(device)

    _device.device_guard = guard
    try:
        yield entered
    finally:
        _device.device_guard = original_guard


def _run(backend, epilogue=False, num_visible=3, dense=False):
    weights = random_weights(3, (8, 8), (7, 7))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    keep = None if dense else torch.tensor([[True, False, True, True], [True, True, False, True]])
    kwargs = {}
    if epilogue:
        kwargs = dict(norm=(torch.ones(8, dtype=torch.float64, requires_grad=True), None, 1e-5),
                      pos_embed=torch.randn(4, 8, dtype=torch.float64), mask_token=torch.zeros(8, dtype=torch.float64))
    out = sparse_conv_tokenize(x, weights, keep, backend=backend, num_visible=None if dense else num_visible, **kwargs)
    out.sum().backward()


def _run_triton_stage_ops():
    """The triton stage ops, which the tokenizer (one op per direction) does not call: each once,
    forward and backward."""
    from scott_kernels import triton_backend, triton_conv, triton_pool, triton_tables
    keep = torch.tensor([[True, False, True, True], [True, True, False, True]])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    w1, w2 = random_weights(3, (8, 8), (7, 7))
    slot, tile_pos, *_ = triton_tables.visible_tables(keep, 3, 2, 2, 1, w2.detach())
    triton_tables.neighbour_table(slot, tile_pos, 1)
    triton_conv.weight_layouts(w2.detach())
    out, _ = triton_backend.conv_image(x, w1, slot, tile_pos, 16)   # backward: conv_image_wgrad, conv_relu_dgrad
    pooled = triton_backend.max_blur_pool(out, slot, tile_pos, True)
    act = triton_backend.conv_relu(pooled, w2, slot, tile_pos, 4, False)   # backward: conv_relu_wgrad, _dgrad
    norm = (torch.ones(8, dtype=torch.float64, requires_grad=True), None, 1e-5)
    triton_pool.pool_tokens_apply(act, slot, tile_pos, norm, relu=True).sum().backward()
    triton_backend.conv_relu(x, w1, slot, tile_pos, 16, True).sum().backward()   # an image source


def _op_names(module_names):
    """The op bodies registered in ``module_names``: their function names."""
    names = set()
    for module in module_names:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "custom_op":
                        names.add((module, node.name))
    return names


@pytest.mark.parametrize("backend, modules", [
    ("torch", ["ops"]),
    ("cuda", ["cuda_backend"]),
    ("triton", ["triton_backend", "triton_conv", "triton_image", "triton_pool", "triton_tables"]),
])
def test_each_op_enters_the_guard_for_its_tensors_device(backend, modules):
    if backend == "triton" and not triton_supports(torch.device("cpu")):
        pytest.skip("Triton's interpreter is not active")
    twin = mock.patch.dict(functional.BACKENDS, {"cuda": (cuda_tokenize, lambda device: True)})
    with _recording_ops() as entered, (twin if backend == "cuda" else contextlib.nullcontext()):
        _run(backend)   # backend="cuda" on CPU tensors: the kernels' C++ twin behind the same ops
        if backend == "triton":   # every path: the tables launch's, the read-back's, the dense one's
            _run(backend, epilogue=True)
            _run(backend, num_visible=None)
            _run(backend, dense=True)
            _run_triton_stage_ops()
            with RecordingMode():   # under a mode the tokenizer's two ops are dispatched
                _run(backend)
    assert entered and all(device == torch.device("cpu") for _, _, device in entered)
    seen = {(module.rsplit(".", 1)[-1], name) for name, module, _ in entered}
    missing = _op_names(modules) - seen
    if backend == "triton":   # a plain eager call runs the two ops' bodies (or their plans) in the guard too
        missing |= {("triton_backend", "_forward_body"), ("triton_backend", "_backward_body")} - seen
    assert not missing, f"ops whose body never entered the device guard: {sorted(missing)}"


def test_guard_selects_the_tensors_cuda_device(monkeypatch):
    """The guard for a CUDA tensor is torch.cuda.device(its device), whatever is current."""
    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: made.append(device) or contextlib.nullcontext())
    with _device.device_guard(torch.device("cuda", 1)):
        pass
    assert made == [torch.device("cuda", 1)]
    assert isinstance(_device.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_second_gpu_while_first_is_current(backend):
    if backend not in scott_kernels.available_backends("cuda:1"):
        pytest.skip(f"backend {backend} is not available on cuda:1")
    torch.cuda.set_device(0)
    weights = [w.cuda(1).detach().requires_grad_(True) for w in random_weights(3, (64, 96), (7, 7))]
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, device="cuda:1")
    keep = torch.rand(4, 16, device="cuda:1") >= 0.5
    wf = [w.float().detach().requires_grad_(True) for w in weights]
    out = sparse_conv_tokenize(x.float(), wf, keep, backend=backend)
    out.sum().backward()
    torch.cuda.synchronize(1)
    ref = reference_tokenize(x, weights, keep, 16)
    ref.sum().backward()
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    for g, r in zip(wf, weights):
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=1e-3, atol=1e-3 * r.grad.abs().max().item())
