#!/usr/bin/env bash
# Build the Python 3.10 environment that runs Intel's Lava (lava-nc) and lava-dl (netx) beside neurosdm.
#
# Lava 0.10 / lava-dl 0.6 declare Python >=3.10,<3.11 and lava-dl pins torch 2.3, so they cannot share
# neurosdm's Python 3.11 / torch 2.13 environment (.venv). This script makes a separate, git-ignored
# environment (.venv-lava by default) and never touches .venv. It is idempotent: a second run only checks the
# imports and prints where the environment is. The first run downloads a few GB (torch 2.3 and its CUDA
# libraries from PyPI: there is no CPU-only torch 2.3 wheel on PyPI).
#
# Usage: scripts/lava_env.sh [ENV_DIR]      (env var LAVA_PYTHON picks the Python 3.10 interpreter)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${1:-$here/.venv-lava}"
stamp="$env_dir/.lava-installed"

find_python310() {
    if [[ -n "${LAVA_PYTHON:-}" ]]; then echo "$LAVA_PYTHON"; return; fi
    for cand in python3.10 /root/.pyenv/versions/3.10.*/bin/python "$HOME"/.pyenv/versions/3.10.*/bin/python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
            command -v "$cand"; return
        fi
    done
    echo "lava_env.sh: no Python 3.10 found (Lava needs 3.10); set LAVA_PYTHON=/path/to/python3.10" >&2
    exit 2
}

check() {
    "$env_dir/bin/python" - <<'PY'
import lava.proc.lif.models, lava.lib.dl.netx, h5py, numpy, nir
print("lava-nc", __import__("importlib.metadata").metadata.version("lava-nc"),
      "lava-dl", __import__("importlib.metadata").metadata.version("lava-dl"), "numpy", numpy.__version__)
PY
}

if [[ -f "$stamp" ]] && check >/dev/null 2>&1; then
    echo "Lava environment ready: $env_dir"
    exit 0
fi

py310="$(find_python310)"
if [[ ! -x "$env_dir/bin/python" ]]; then
    "$py310" -m venv "$env_dir"
fi
"$env_dir/bin/python" -m pip install -q --upgrade pip
"$env_dir/bin/python" -m pip install -q "lava-nc==0.10.0" "lava-dl==0.6.0" "h5py>=3.7,<4" "numpy>=1.24.4,<2" "nir==1.0.8"
check
touch "$stamp"
echo "Lava environment ready: $env_dir"
