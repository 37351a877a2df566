#!/usr/bin/env bash
# Everything a GPU must check, in one command and one short window (<= 7 min on an H100/H200,
# build included; no network): build for this GPU, pytest tests/, compute-sanitizer memcheck and
# racecheck, the headline tokenizer benchmark and the MIM-JEPA training-step benchmark. Writes
# summary.md, check.json, two benchmark JSON files and four logs into OUT_DIR (8 files at most).
#
#   bash tests/gpu/check.sh OUT_DIR           # on the GPU machine
#   bash tests/gpu/check.sh --dry OUT_DIR     # every stage on tiny shapes on a CPU (CI runs this)
#
# Stages, time budget and options: tests/gpu/check.py (python tests/gpu/check.py --help).
# PYTHON selects the interpreter (default: python3, else python).
set -uo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  py="$(command -v python3 || command -v python || true)"
fi
[ -n "$py" ] || { echo "check.sh: no python3 or python on PATH (set PYTHON)" >&2; exit 2; }
exec "$py" tests/gpu/check.py "$@"
