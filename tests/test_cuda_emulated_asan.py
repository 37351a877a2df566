"""The emulated device's kernels under AddressSanitizer: every kernel's global loads and stores must
stay inside the allocation their pointer came from.

The access hooks of the normal emulated build (tests/test_cuda_emulated.py) accept a global access
anywhere inside any tensor the op passed, so a load or store that runs past the end of one tensor
into another tensor of the same op goes unnoticed there. Here ``python tests/emu/build.py --asan``
builds the same sources with ``-fsanitize=address`` (into build/emu-asan/, beside nothing), and
tests/test_cuda_emulated.py runs on that module in a Python that preloads libasan
(tests/emu/asan.py: the settings and why): torch's CPU allocator then allocates through ASan, so
every tensor, the ones the ops allocate inside included, is its own allocation with redzones, and
the first access into a redzone or into freed memory ends the run with ASan's report, the kernel,
block and thread it came from leading the failure.

Covered: every ``__global__`` kernel the emulated tests launch (all of tests/test_cuda_emulated.py
but its mutation tests; its last test fails if a kernel was never launched), in every dtype and
path, forward and backward; in those kernels and in the runtime's own copies (cp.async lands in
csrc/emu/runtime.cpp), global reads and writes past either end of their allocation (heap buffer
overflow) and into freed memory, and out-of-bounds indexing of a thread's local arrays that the
compiler keeps in memory (its fiber stack: stack buffer overflow). The runtime's checks that are not access hooks still run: barriers
and warp collectives reached by every thread, cp.async destinations not read before their wait,
__trap, the fragment layouts; the results are compared as in the normal run.

Not covered here: shared memory, a window of the runtime's own (the dynamic window is one static
array, the static __shared__ arrays thread-locals), so ASan does not see its bounds: out-of-bounds,
uninitialized, racing and misaligned shared accesses are the normal build's hooks' to find (this
variant has no hooks: -fsanitize=thread and -fsanitize=address do not combine). A stray access
that jumps over the redzones into another live allocation is not reported (redzones are at least
16 bytes, more for larger allocations); an access outside a tensor that is a view but inside its
storage is not either (the storage is the allocation). The host code of the bindings and the C++
twin is not instrumented.

The mutation test builds a copy of the kernels with an off-by-one channel vector in the tiled
MaxBlurPool (it reads the 16 bytes after its input): ASan reports it, while the normal build's
hooks stay silent when the op's next tensor lies in those bytes and report it only where no tensor
does.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))

import asan  # noqa: E402

REASON = asan.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"AddressSanitizer build of the emulated device: {REASON}")


@pytest.fixture(scope="module")
def asan_module():
    """The ASan variant of the emulated module (built here; a build that fails is an error)."""
    from build import build

    return build(asan=True, jobs=2, quiet=True)


def _failure(result) -> str:
    output = result.stdout + result.stderr
    return f"exit status {result.returncode}\n{asan.excerpt(output)}\n---- output ----\n{output[-6000:]}"


def test_emulated_kernels_under_asan(asan_module):
    """tests/test_cuda_emulated.py, all but its mutation tests and the probes that expect the
    shared-memory checks' reports (this build has no access hooks; the normal build runs them), on
    the ASan build: no report, and every test passes (its last one: every kernel launched)."""
    result = asan.run_tests(asan_module, "not mutation and not (cluster_shared_memory_checks and not ordered)")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "AddressSanitizer" not in output, _failure(result)
    assert " passed" in output and "deselected" in output, output[-3000:]


def test_asan_catches_a_read_into_the_next_tensor(asan_module, tmp_path):
    from mutations import build_mutation, probe_pool_layouts, run_mutation

    result = run_mutation("vector_past_the_end", tmp_path, asan=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"the ASan run missed the read past act:\n{output[-3000:]}"
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in output, _failure(result)
    assert "came from kernel scott_pool_forward block" in output, _failure(result)
    assert "0 bytes to the right of" in output, _failure(result)  # right after the tensor, not anywhere

    # the same copy built with the access hooks: they accept the read where tile_pos follows act in
    # memory, and report it only where no tensor of the op lies there
    probe = probe_pool_layouts(build_mutation("vector_past_the_end", tmp_path))
    for layout in ("adjacent", "gap"):
        assert probe[layout]["launches"] == {"scott_pool_forward": 1}, probe
    assert probe["adjacent"]["checks"] == {} and probe["adjacent"]["error"] is None, probe
    assert probe["gap"]["checks"].get("out-of-bounds", 0) > 0, probe
