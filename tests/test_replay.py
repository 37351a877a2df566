"""Launch plans (scott_kernels._replay): an eager call's op body recorded once per signature and
replayed. The recorder is checked on plain torch bodies (what it keeps, what it refuses); the
triton tokenizer's replayed steps are checked against the same steps through its ops (no plan),
bit for bit, under Triton's interpreter. What a replay launches on a GPU (the compiled kernels,
grids and arguments) is checked against the recorded step in test_codegen."""

import pytest
import torch

from conftest import RecordingMode, random_weights
from scott_kernels import _replay
from scott_kernels._replay import Plans, global_state, persistent, tensor_signature


def _key(*tensors):
    return (global_state(tensors[0].device), *map(tensor_signature, tensors))


class _Body:
    """A plain torch body, counting its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _run(plans, body, *tensors):
    return plans.run(_key(*tensors), tensors, body, *tensors)


def test_a_plan_replays_the_ops_with_the_new_inputs():
    """Allocations (each kind a replay calls through torch's bindings), views, in-place ops, casts
    and a reduction, replayed on new values: fresh outputs equal to the body's, and the body not
    called again."""
    def fn(x, w):
        out = torch.empty((x.shape[0], 3), dtype=x.dtype)
        out.copy_(x.detach().view(-1, 3) * 2)
        out.add_(w.sum())
        filled = torch.zeros(3, dtype=torch.float64).add_(torch.empty_like(w).fill_(1.5)[:3])
        filled += w.new_zeros(3) + x.new_empty((3,), dtype=torch.float64).fill_(0.25)
        filled += torch.empty_strided((3,), (2,)).fill_(2.0)
        torch._assert_async(w.sum() == w.sum())   # an op returning nothing
        return [out, out.view(-1), out.t().contiguous(), x.double(), x.to(torch.float32), filled, None]

    plans, body = Plans(), _Body(fn)
    first = _run(plans, body, torch.randn(4, 3), torch.randn(5))
    assert body.calls == 1 and len(plans) == 1 and first[-1] is None
    for _ in range(3):
        x, w = torch.randn(4, 3), torch.randn(5)
        got = _run(plans, body, x, w)
        want = fn(x, w)
        assert body.calls == 1
        for a, b in zip(got[:-1], want[:-1]):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert got[-1] is None
        # a view of a replayed allocation is a view of it, an input passed through is the input
        assert got[1].data_ptr() == got[0].data_ptr() and got[2].data_ptr() != got[0].data_ptr()
        assert got[4] is x


@pytest.mark.parametrize("fn, why", [
    (lambda x: [x * int(x.sum() > 0)], "reads tensor data"),                 # a host read
    (lambda x: [x[x > 0]], "reads tensor data"),                             # a data-dependent shape
    (lambda x: [x + _OUTSIDE], "from outside the call"),                     # a tensor not passed in
    (lambda x: [torch.cat([x, x])], "inside a list"),
    (lambda x: [x + x.to("meta").sum().dim()], "off the call's device"),   # a copy to read elsewhere
])
def test_recording_refuses_what_a_replay_could_not_repeat(fn, why):
    """A body that reads tensor data on the host, makes a data-dependent shape or uses a tensor it
    was not given gets no plan: it runs (correctly) on every call, and after a few refusals its
    signature is no longer recorded."""
    plans, body = Plans(), _Body(fn)
    for i in range(5):
        x = torch.randn(6) + i
        got = _run(plans, body, x)
        torch.testing.assert_close(got[0], fn(x)[0], rtol=0, atol=0)
    assert body.calls == 5 and len(plans) == 0
    assert len(plans.refusals) == _replay._TRIES and why in plans.refusals[-1]


def test_a_tensor_passed_twice_gets_no_plan():
    """Recorded with one tensor as two inputs, a replay could not tell which use reads which."""
    plans, body = Plans(), _Body(lambda a, b: [a * 2 + b])
    x = torch.randn(4)
    _run(plans, body, x, x)
    assert len(plans) == 0 and "two inputs" in plans.refusals[-1]
    a, b = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(_run(plans, body, a, b)[0], a * 2 + b, rtol=0, atol=0)


_OUTSIDE = torch.ones(6)
_KEPT = torch.zeros(6)


def test_a_persistent_buffer_is_held_by_the_plan():
    """A buffer the package keeps on purpose (``persistent``) is passed to every replay as is."""
    fn = lambda x: [x + persistent(_KEPT), _KEPT.view(2, 3)]
    plans, body = Plans(), _Body(fn)
    _run(plans, body, torch.randn(6))
    x = torch.randn(6)
    got = _run(plans, body, x)
    assert body.calls == 1
    torch.testing.assert_close(got[0], x, rtol=0, atol=0)
    assert got[1].data_ptr() == _KEPT.data_ptr()


def test_a_body_running_inside_a_recording_runs_itself():
    """Inside another body's recording a body runs (that recording takes its ops), neither
    recording nor replaying its own plan."""
    inner_plans, inner = Plans(), _Body(lambda x: [x + 1])
    x = torch.randint(-9, 9, (4,)).float()
    _run(inner_plans, inner, x)
    assert len(inner_plans) == 1 and inner.calls == 1
    outer_plans = Plans()
    outer = _Body(lambda x: [_run(inner_plans, inner, x * 2)[0] - 1])
    for _ in range(3):
        x = torch.randint(-9, 9, (4,)).float()
        torch.testing.assert_close(_run(outer_plans, outer, x)[0], x * 2, rtol=0, atol=0)
    assert len(outer_plans) == 1 and outer.calls == 1
    assert inner.calls == 2   # once alone, once inside the outer recording; the outer plan replays its ops


def test_a_plan_holds_only_what_the_body_dispatched():
    """The recorder watches the tensors it names without holding them (a factory op whose output
    Python holds elsewhere returns a detached alias, which no replay would make), and an alias that
    only launches read is its input: a body of an allocation and a fill replays as those two ops."""
    plans, body = Plans(), _Body(lambda x: [torch.empty(3, dtype=x.dtype).fill_(2.0) + x])
    _run(plans, body, torch.randn(3))
    (plan,) = plans._plans.values()
    assert len(plan.steps) == 3 and plan.steps[0][0] is torch.empty   # empty, fill_, add


def test_signatures_tell_apart_what_a_body_reads():
    """Shapes, strides, dtype, device and 16-byte alignment each change a tensor's signature; the
    deterministic mode and autocast change the global state."""
    base = torch.zeros(64)
    x = base[:32]
    assert tensor_signature(x) == tensor_signature(torch.zeros(32))
    others = [base[1:33], base[:32].view(4, 8), base[:64:2], base[:32].to(torch.float64)]
    assert len({tensor_signature(t) for t in [x, *others]}) == 5
    assert tensor_signature(None) is None
    state = global_state(x.device)
    with torch.autocast("cpu"):
        assert global_state(x.device) != state
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not was)   # (the conftest fixture restores it)
    assert global_state(x.device) != state
    torch.use_deterministic_algorithms(was)
    assert global_state(x.device) == state


def test_plans_can_be_turned_off(monkeypatch):
    """With ``enabled`` off (SCOTT_LAUNCH_PLANS=0 at import) every call runs its body."""
    monkeypatch.setattr(_replay, "enabled", False)
    plans, body = Plans(), _Body(lambda x: [x + 1])
    for _ in range(3):
        _run(plans, body, torch.randn(3))
    assert body.calls == 3 and len(plans) == 0


def test_a_launch_outside_the_autotuner_refuses_the_plan():
    """On a GPU, Triton's launch hook (its JIT calls it on every launch) refuses a recording for a
    launch the package's autotuner did not report; the autotuner's own launches pause the recorder."""
    pytest.importorskip("triton")
    from scott_kernels import triton_configs
    knobs = triton_configs._triton_knobs()
    if knobs is None or not hasattr(knobs.runtime.launch_enter_hook, "add"):
        pytest.skip("this Triton keeps no launch-hook chain")
    triton_configs._tuner()   # registers the guard
    assert triton_configs._unreported_launches in _replay.GUARDS
    rec = _replay._Recorder([torch.zeros(1)])
    with triton_configs._unreported_launches(rec):
        with rec.pause():
            knobs.runtime.launch_enter_hook("metadata")
        assert rec.refused is None
        knobs.runtime.launch_enter_hook("metadata")
        assert "JIT alone" in rec.refused
    assert not knobs.runtime.launch_enter_hook.calls


def test_forget_plans_drops_every_plan():
    plans, body = Plans(), _Body(lambda x: [x + 1])
    _run(plans, body, torch.randn(3))
    assert len(plans) == 1
    _replay.forget_plans()
    assert len(plans) == 0


# --------------------------------------------------------------------------------------------
# The triton tokenizer's replayed steps (Triton's interpreter on the CPU)
# --------------------------------------------------------------------------------------------
triton = pytest.importorskip("triton", reason="the triton tokenizer needs triton")
from scott_kernels import triton_backend  # noqa: E402
from scott_kernels.functional import sparse_conv_tokenize  # noqa: E402
from scott_kernels.triton_configs import triton_supports  # noqa: E402

needs_triton_cpu = pytest.mark.skipif(not triton_supports("cpu"),
                                      reason="runs the triton backend on the CPU: needs TRITON_INTERPRET=1")


def _fixed_keep(batch, patches, visible, generator):
    keep = torch.zeros(batch, patches, dtype=torch.bool)
    keep.scatter_(1, torch.rand(batch, patches, generator=generator).argsort(1)[:, :visible], True)
    return keep


CASES = {
    "masked": dict(),
    "all visible": dict(keep=False),
    "image gradient": dict(need_x=True),
    "packed": dict(packed=True),
    "epilogue": dict(epilogue=True),
    "uint8 images": dict(uint8=True),
    "three stages": dict(stages=3),
    "float16": dict(dtype=torch.float16),
    "host count": dict(count=False),
}


def _step(case: dict, seed: int, device: str = "cpu"):
    """A training step's tokens and gradients, plain (eager: plans) and through the ops (a
    pass-through dispatch mode: no plan)."""
    g = torch.Generator().manual_seed(seed)
    on = lambda t: t.to(device).requires_grad_(t.requires_grad)   # drawn on the CPU, the same on every device
    dtype = case.get("dtype", torch.float64)
    stages = case.get("stages", 2)
    patch = 4 ** stages
    B, GH, GW, visible = (2, 2, 3, 3) if stages == 2 else (2, 1, 2, 1)
    x = torch.randn(B, 3, GH * patch, GW * patch, generator=g, dtype=torch.float64)
    kw = dict(patch_size=patch, backend="triton", packed=case.get("packed", False))
    if case.get("uint8"):
        x = on((x * 40 + 128).clamp(0, 255).to(torch.uint8))
        kw.update(pixel_mean=(120.0, 125.0, 130.0), pixel_std=(50.0, 60.0, 70.0))
    else:
        x = on(x.to(dtype)).requires_grad_(case.get("need_x", False))
    widths, kernels = ((5, 6), (7, 5)) if stages == 2 else ((4, 5, 6), (5, 3, 3))
    weights = [on(w.detach().to(dtype)).requires_grad_(True) for w in random_weights(3, widths, kernels)]
    keep = _fixed_keep(B, GH * GW, visible, g) if case.get("keep", True) else None
    if keep is not None and case.get("count", True):
        kw["num_visible"] = visible
    elif keep is not None:   # the total fixed (read on the host), the rows' counts not
        keep = _fixed_keep(1, B * GH * GW, B * visible, g).view(B, GH * GW)
    keep = None if keep is None else keep.to(device)
    params = list(weights)
    if case.get("epilogue"):
        ln_weight, ln_bias, pos, mask_token = (on(torch.randn(shape, generator=g, dtype=dtype)).requires_grad_(True)
                                               for shape in (6, 6, (1, GH * GW, 6), 6))
        kw.update(norm=(ln_weight, ln_bias, 1e-5), pos_embed=pos, mask_token=mask_token)
        params += [ln_weight, ln_bias, pos, mask_token]
    if x.requires_grad:
        params.append(x)

    def run():
        tokens = sparse_conv_tokenize(x, weights, keep, **kw)
        grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=tokens.dtype).to(device)
        return [tokens, *torch.autograd.grad(tokens, params, grad)]

    plain = run()
    with RecordingMode():
        through_ops = run()
    return plain, through_ops


@needs_triton_cpu
@pytest.mark.parametrize("name", list(CASES))
def test_replayed_steps_match_the_ops(name, monkeypatch):
    """Three training steps of one signature on new values: the first records the forward's and
    the backward's plans, the next two replay them (neither body runs), and every step's tokens
    and gradients equal the ops' bit for bit. Without ``num_visible`` the visible total (read on
    the host before the forward) is part of the signature, the rows' counts are not and vary."""
    _check_replays(CASES[name], "cpu", monkeypatch)


def _check_replays(case: dict, device: str, monkeypatch):
    triton_backend._FORWARD_PLANS.clear()
    triton_backend._BACKWARD_PLANS.clear()
    bodies = []
    for body in ("_tokenize_forward", "_tokenize_backward"):
        original = getattr(triton_backend, body)

        def counted(*args, _original=original, _name=body):
            bodies.append(_name)
            return _original(*args)
        monkeypatch.setattr(triton_backend, body, counted)
    # the interpreter's launches are recorded from the first step; a GPU's from the second, whose
    # launches call compiled kernels the first one kept
    replayed_from = 1 if device == "cpu" else 2
    for seed in range(replayed_from + 2):
        bodies.clear()
        plain, through_ops = _step(case, seed, device)
        for a, b in zip(plain, through_ops):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if seed >= replayed_from:
            # the ops' run calls the bodies, the plain one replays
            assert bodies == ["_tokenize_forward", "_tokenize_backward"], bodies
    assert len(triton_backend._FORWARD_PLANS) == 1 and len(triton_backend._BACKWARD_PLANS) == 1


needs_triton_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton_supports(torch.device("cuda", 0))),
                                      reason="needs a CUDA GPU the triton backend runs on")
GPU_CASES = {"bfloat16": dict(dtype=torch.bfloat16), "float32": dict(dtype=torch.float32),
             "epilogue": dict(dtype=torch.bfloat16, epilogue=True), "image gradient": dict(dtype=torch.bfloat16, need_x=True),
             "host count": dict(dtype=torch.bfloat16, count=False)}


@needs_triton_gpu
@pytest.mark.parametrize("name, side_stream", [(name, False) for name in GPU_CASES] + [("bfloat16", True)])
def test_replayed_steps_match_the_ops_gpu(name, side_stream, monkeypatch):
    """On a GPU, the replayed steps (compiled kernels called directly, on the current stream) equal
    the same steps through the ops bit for bit; on a side stream too, where a plan of its own gets
    fresh weight-gradient arrival counters from each step (as CUDA-graph capture needs)."""
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        _check_replays(GPU_CASES[name], "cuda", monkeypatch)
    torch.cuda.synchronize()


@needs_triton_cpu
def test_a_new_signature_gets_its_own_plan():
    """A new shape, dtype or deterministic mode records a plan of its own; the earlier ones stay."""
    triton_backend._FORWARD_PLANS.clear()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    weights = random_weights(3, (5, 6), (7, 5), requires_grad=False)
    keep = _fixed_keep(2, 6, 3, torch.Generator().manual_seed(0))

    def tokens(x, weights):
        return sparse_conv_tokenize(x, weights, keep, patch_size=16, backend="triton", num_visible=3)

    want = tokens(x, weights)
    assert len(triton_backend._FORWARD_PLANS) == 1
    torch.testing.assert_close(tokens(x, weights), want, rtol=0, atol=0)
    x32, w32 = x.float(), [w.float() for w in weights]
    tokens(x32, w32)
    torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled())   # (the fixture restores it)
    torch.testing.assert_close(tokens(x, weights), want, rtol=0, atol=0)
    torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled())
    assert len(triton_backend._FORWARD_PLANS) == 3
    # float32's TF32 setting, which the kernels read: a plan of its own
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        tokens(x32, w32)
    assert len(triton_backend._FORWARD_PLANS) == 4
    # images at an odd offset (a view): their own plan, and the same tokens
    base = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = base[1:].view_as(x).copy_(x)
    torch.testing.assert_close(tokens(shifted, weights), want, rtol=0, atol=0)
    assert len(triton_backend._FORWARD_PLANS) == 5


@needs_triton_cpu
def test_saved_tensor_hooks_turn_the_backward_plan_off(monkeypatch):
    """Under saved-tensor hooks (whose unpacking may give the saved tensors another dtype, device
    or offset) the backward runs its body; the forward still replays."""
    triton_backend._FORWARD_PLANS.clear()
    triton_backend._BACKWARD_PLANS.clear()
    bodies = []
    original = triton_backend._tokenize_backward
    monkeypatch.setattr(triton_backend, "_tokenize_backward", lambda *a: bodies.append(1) or original(*a))
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    weights = random_weights(3, (5, 6), (7, 5))
    keep = _fixed_keep(2, 6, 3, torch.Generator().manual_seed(0))
    grads = []
    for _ in range(3):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            tokens = sparse_conv_tokenize(x, weights, keep, patch_size=16, backend="triton", num_visible=3)
        grads.append(torch.autograd.grad(tokens, weights, torch.ones_like(tokens)))
    assert len(bodies) == 3 and len(triton_backend._BACKWARD_PLANS) == 0 and len(triton_backend._FORWARD_PLANS) == 1
    for a, b in zip(grads[0], grads[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_triton_cpu
def test_every_kernel_launches_through_the_package_autotuner():
    """A plan records launches as the package's autotuner reports them: a kernel launched through
    the JIT alone would be missing from the replay, so there is none."""
    import inspect

    from scott_kernels import triton_conv, triton_image, triton_pool, triton_tables
    from scott_kernels.triton_configs import _tuner
    from triton.runtime.jit import JITFunction
    tuned = 0
    for module in (triton_conv, triton_image, triton_pool, triton_tables):
        source = inspect.getsource(module)
        for name, value in vars(module).items():
            if isinstance(value, JITFunction):   # a device function: called from kernels, never launched
                assert f"{name}[" not in source, f"{module.__name__}.{name} launches through the JIT alone"
            tuned += isinstance(value, _tuner()) and f"{name}[" in source   # launched: kernel[grid](...)
    assert tuned == 13
