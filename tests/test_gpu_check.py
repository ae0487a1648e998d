"""scripts/gpu_check.py, the prepared run for a lent GPU machine: its device plumbing, checked on the CPU with the
tiny preset (the real run, paper-cifar10 on CUDA, needs a GPU: its figures go into a closing note)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, device):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", device, "--preset", "tiny",
                        "--train-steps", "2", "--batch", "8", "--sample-steps", "1", "--images", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NEUROSDM_COMPILE": "0"})  # eager kernels: no compile time in a test
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((tmp_path / "gpu_check.json").read_text())


def test_gpu_check_plumbing_on_cpu(tmp_path):
    out = _run(tmp_path, "cpu")
    assert out["device"] == "cpu" and out["train"]["steps"] == 2 and out["export"]["file_mb"] > 0
    assert out["engine"]["float32"]["finite"] and out["engine"]["float64"]["finite"]
    assert out["engine"]["float64"]["spikes"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_check_on_cuda(tmp_path):
    out = _run(tmp_path, "cuda")
    assert out["gpu"] and out["engine"]["float32"]["finite"]
