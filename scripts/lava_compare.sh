#!/usr/bin/env bash
# Loihi arithmetic through Lava, end to end (docs/lava.md): build the Python 3.10 Lava environment if needed,
# record neurosdm's layers and spikes in the main environment, then run Lava and compare.
#   scripts/lava_compare.sh [WORK_DIR]      (default runs/lava; writes docs/data/lava_compare.json, docs/lava.md)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$here/runs/lava}"
main_py="${NEUROSDM_PYTHON:-$here/.venv/bin/python}"
"$here/scripts/lava_env.sh" "$here/.venv-lava"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$main_py" "$here/scripts/lava_data.py" --work "$work"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$here/.venv-lava/bin/python" "$here/scripts/lava_compare.py" --work "$work" \
    --docs "$here/docs"
