#!/usr/bin/env bash
# Build .venv-sanafe: SANA-FE (PyPI `sanafe`, GPL-3.0, a binary wheel) in its own environment, called by
# scripts/sanafe_compare.py and never imported by neurosdm. Idempotent: a stamp file records a finished install.
#
#   scripts/sanafe_env.sh [PYTHON]      (default python3; a cp310 or cp311 interpreter, the wheels that exist)
#
# `sanafe` is installed with --no-deps: its import needs nothing beyond its own compiled module (`sanafecpp`);
# the comparison script needs numpy (arrays) and nir + h5py (to read the same .nir file neurosdm simulates).
# No torch is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-${PYTHON:-python3}}"
VENV="${SANAFE_VENV:-.venv-sanafe}"
STAMP="$VENV/.sanafe-installed"
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import sanafe, nir, numpy" 2>/dev/null; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps sanafe==2.2.9
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "numpy>=1.24" "h5py>=3.8"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps nir==1.0.8
"$VENV/bin/python" -c "import sanafe, nir, numpy; sanafe.load_loihi()"
touch "$STAMP"
echo "$VENV ready: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("sanafe", m.version("sanafe"))')"
