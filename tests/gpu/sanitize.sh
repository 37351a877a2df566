#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over tests/gpu/sanitize_cases.py (every native and
# triton kernel, forward and backward). Exit status non-zero on any reported error.
#   bash tests/gpu/sanitize.sh [cuda] [triton]
#   SANITIZE_TOOLS=racecheck bash tests/gpu/sanitize.sh     # one tool (tests/gpu/check.sh runs both at once)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
sanitizer="${COMPUTE_SANITIZER:-compute-sanitizer}"
command -v "$sanitizer" >/dev/null || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }
# PyTorch's caching allocator hides out-of-bounds accesses inside its pools: allocate directly.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
  echo "== $tool"
  "$sanitizer" --tool "$tool" --error-exitcode 1 --target-processes all "${PYTHON:-python}" "$here/sanitize_cases.py" "$@"
done
echo "sanitizer: clean"
