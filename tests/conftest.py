import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("NEUROSDM_TEST_THREADS", min(2, os.cpu_count() or 1))))

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
SHARED_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sdm_reference"


@pytest.fixture
def sdm_reference() -> Path:
    """The public-SDM-layout checkpoint with the reference model's input and output (copied into tests/fixtures)."""
    return FIXTURES / "sdm_reference"
