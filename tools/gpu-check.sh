#!/usr/bin/env bash
# The GPU checks in one command: the `gpu` tests (tests/test_gpu.py), then the CUDA benchmark
# (`python -m bench.run --device cuda`), whose report, bench/results/gpu-vit-b-32.json, must have the
# CPU report's shape. From a fresh copy of the repo, on a machine whose python3 (or $PYTHON) has a CUDA
# torch and the project's dependencies (pip install -c docker/requirements.lock -e '.[dev]').
# A machine with PyTorch but no package index: run tools/gpu-wheels.sh DIR where there is one, bring DIR
# along, and pass it here; its wheels are installed beside that python's own packages, not into them.
#
#   tools/gpu-check.sh [WHEELS_DIR] [BENCH_OPTION...]     e.g. --quick: a smoke run of the benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -d "${1:-}" ]; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$1"/*.whl
  export PYTHONPATH=$site
  shift
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
"$python" -c "import sys, torch; torch.cuda.is_available() or sys.exit('tools/gpu-check.sh: torch sees no CUDA device')"
"$python" -m pytest -p no:cacheprovider -m gpu -rA tests/test_gpu.py
# The committed report's name for the standard run; a run with other options is not that report.
report=bench/results/gpu-vit-b-32.json
[ $# -eq 0 ] || report=$(mktemp --suffix .json)
"$python" -m bench.run --device cuda --out "$report" "$@" > /dev/null
"$python" - "$report" bench/results/cpu-vit-b-32.json << 'PY'
import json, sys

OPTIONAL = {"faces"}  # the face detector's figures need the development data, which may not be there
FREE = {"report.settings.service_env"}  # the FER_* variables of the model and options chosen
MISSING = type("Missing", (), {"__repr__": lambda self: "nothing"})()


def differences(a, b, path="report"):
    """Where two reports differ in shape: keys, nesting and value types (a list by its first item; a
    null matches anything; integers and floats alike)."""
    if a is None or b is None or path in FREE:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - (OPTIONAL if path == "report" else set())
        return [d for key in sorted(keys) for d in differences(a.get(key, MISSING), b.get(key, MISSING), f"{path}.{key}")]
    if isinstance(a, list) and isinstance(b, list):
        return differences(a[0], b[0], f"{path}[0]") if a and b else []
    kinds = [float if isinstance(v, int | float) and not isinstance(v, bool) else type(v) for v in (a, b)]
    return [] if kinds[0] is kinds[1] else [f"{path}: {a!r} against {b!r}"]


gpu, cpu = (json.load(open(path)) for path in sys.argv[1:])
problems = differences(gpu, cpu)
if problems or not gpu["complete"]:
    sys.exit(f"{sys.argv[1]} is incomplete or differs in shape from {sys.argv[2]}: " + "; ".join(problems))
print(f"{sys.argv[1]}: complete, with the CPU report's shape")
PY
