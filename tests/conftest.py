import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Without a GPU, Triton kernels run under its interpreter: set before scott_kernels imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def _cuda_param():
    return pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)"))


DEVICES = ["cpu", _cuda_param()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    # restored after each test: a training run with deterministic=true sets it for the process
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


class RecordingMode(TorchDispatchMode):
    """Passes every op through and records its name: with it active, eager calls dispatch every op
    (the package runs an op's body itself only where nothing would see the call)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def random_weights(in_chans, widths, kernels, dtype=torch.float64, device="cpu", requires_grad=True):
    weights, c_in = [], in_chans
    for width, k in zip(widths, kernels):
        w = torch.randn(width, c_in, k, k, dtype=dtype, device=device) * (2.0 / (c_in * k * k)) ** 0.5
        weights.append(w.requires_grad_(requires_grad))
        c_in = width
    return weights


def random_keep(batch, num_patches, ratio, device="cpu", generator=None):
    """Bool (B, N) with roughly `ratio` of each row masked, plus the edge cases mixed in."""
    keep = torch.rand(batch, num_patches, generator=generator).to(device) >= ratio
    return keep


# ---- the emulated device's summary line (tests/test_cuda_emulated.py) ----------------------------
# What the session's emulated runs found, filled by tests/test_cuda_emulated.py: the kernels that ran
# (launched, or only queried for their attributes) of every __global__ kernel in csrc/*.cu, the
# value mismatches its comparisons detected, and the races and out-of-bounds accesses the emulated
# device reported in its runs. What is counted: every run of the main suite, whether or not its
# test passed. What is not: the reports a test provokes on purpose and requires (the checks' own
# tests, Emulated(expect=...)), and the mutation runs (broken copies of the kernels, built and run
# in a subprocess of their own, whose expected failures are that subprocess's).
EMULATED = {"collected": False, "built": False, "kernels": set(), "ran": set(), "mismatches": 0, "races": 0,
            "out-of-bounds": 0}


def pytest_terminal_summary(terminalreporter):
    """One line in the summary of any run that collected tests/test_cuda_emulated.py."""
    e = EMULATED
    if not e["collected"]:
        return
    if not e["built"]:
        line = "emulated kernels: not run, scott_kernels._emu is not built (python tests/emu/build.py builds it)"
    else:
        line = (f"emulated kernels {len(e['ran'] & e['kernels'])}/{len(e['kernels'])}, mismatches {e['mismatches']}, "
                f"races {e['races']}, out-of-bounds {e['out-of-bounds']}")
    if os.environ.get("SCOTT_EMU_MUTATION"):
        line += f" (mutation {os.environ['SCOTT_EMU_MUTATION']}: a deliberately broken build)"
    terminalreporter.write_line(line)
