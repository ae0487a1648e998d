#!/usr/bin/env bash
# neurosdm vs SANA-FE on the same small IF networks and inputs (docs/sanafe.md):
#   1. .venv-sanafe (scripts/sanafe_env.sh; SANA-FE is GPL and lives only there),
#   2. neurosdm side: graphs, inputs, counts, energy (scripts/sanafe_suite.py build, main .venv),
#   3. SANA-FE side: the same networks on sanafe.load_loihi() (scripts/sanafe_compare.py, .venv-sanafe),
#   4. the comparison: docs/data/sanafe_compare.json and the tables of docs/sanafe.md.
#   scripts/sanafe_compare.sh [WORK_DIR]     (default runs/sanafe)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/sanafe}"
PY="${NEUROSDM_PYTHON:-.venv/bin/python}"
scripts/sanafe_env.sh
"$PY" scripts/sanafe_suite.py build "$WORK"
.venv-sanafe/bin/python scripts/sanafe_compare.py "$WORK"
"$PY" scripts/sanafe_suite.py report "$WORK" --json docs/data/sanafe_compare.json --doc docs/sanafe.md
