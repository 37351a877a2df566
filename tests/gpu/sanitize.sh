#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over tests/gpu/sanitize_cases.py (every native and
# triton kernel, forward and backward). Exit status non-zero on any reported error.
#   bash tests/gpu/sanitize.sh [cuda] [triton]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sanitizer="${COMPUTE_SANITIZER:-compute-sanitizer}"
command -v "$sanitizer" >/dev/null || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }
# PyTorch's caching allocator hides out-of-bounds accesses inside its pools: allocate directly.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck; do
  echo "== $tool"
  "$sanitizer" --tool "$tool" --error-exitcode 1 --target-processes all python "$here/sanitize_cases.py" "$@"
done
echo "sanitizer: clean"
