"""Shared test builders (plain helpers, imported by the test modules with ``from conftest import ...``) and
fixtures. No test module imports another test module."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurosdm import cli
from neurosdm.checkpoint import save_checkpoint
from neurosdm.config import Config, DiffusionConfig, ModelConfig
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.models import SpikingUNet
from neurosdm.quantize import QuantSpec
from neurosdm.simulators.peers.suite import perturb_batchnorm

torch.set_num_threads(int(os.environ.get("NEUROSDM_TEST_THREADS", min(2, os.cpu_count() or 1))))

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
SHARED_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sdm_reference"

__all__ = ["invoke", "neurosdm", "assert_one_line_error", "tiny_checkpoint", "perturb_batchnorm", "tiny_model",
           "quantized", "snntorch_conv_net"]


@pytest.fixture
def sdm_reference() -> Path:
    """The public-SDM-layout checkpoint with the reference model's input and output (copied into tests/fixtures)."""
    return FIXTURES / "sdm_reference"


# ------------------------------------------------------------------------------------------------------ the CLI

runner = CliRunner()


def invoke(*args):
    """``neurosdm ARGS`` in-process (typer's CliRunner)."""
    return runner.invoke(cli.app, [str(a) for a in args])


def neurosdm(*args, cwd):
    """``python -m neurosdm ARGS`` in a subprocess, in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "neurosdm", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, check=False)


def assert_one_line_error(r, *needles):
    """A subprocess result that failed with exit 1 and a one-line ``error:`` message holding every needle."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------- models


def tiny_checkpoint(path, head="spiking", ema=True, seed=0):
    """A checkpoint of an untrained tiny SpikingUNet (8x8, ch 4, ch_mult (1, 2), 2 spiking steps, 20 diffusion
    steps) from ``seed``, with an EMA model unless ``ema`` is False. Returns ``path``."""
    torch.manual_seed(seed)
    cfg = Config(ModelConfig(img_ch=1, image_size=8, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=2,
                             num_diffusion_steps=20, head=head), DiffusionConfig(num_diffusion_steps=20))
    model = SpikingUNet(cfg.model)
    ema_model = SpikingUNet(cfg.model) if ema else None
    save_checkpoint(path, cfg, model, ema_model, step=3)
    return path


def tiny_model(head="spiking", ch_mult=(1, 2), image_size=8, ch=4, num_steps=3, seed=0, tsm=False):
    """A tiny SpikingUNet in eval mode from ``seed`` with random BatchNorm statistics, biases, TSM scales and tail
    conv weights, so that folding is exercised and the output is not almost 0."""
    torch.manual_seed(seed)
    cfg = ModelConfig(img_ch=1, image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=1,
                      num_steps=num_steps, num_diffusion_steps=50, head=head, threshold_scale=0.97, tsm=tsm)
    m = SpikingUNet(cfg)
    with torch.no_grad():  # random BN statistics and biases, so that folding is exercised
        for mod in m.modules():
            perturb_batchnorm(mod)
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(-0.3, 0.3)
            if getattr(mod, "tsmp", None) is not None:  # distinct per-step scales, one near 0 and one negative
                mod.tsmp.copy_(torch.linspace(1.4, -0.3, mod.tsmp.numel()).roll(int(mod.tsmp.numel() > 2))
                               .reshape(mod.tsmp.shape))
        m.tail_conv.weight.normal_(0.0, 0.3)  # the default init (gain 1e-5) would make eps almost 0
    return m.eval()


def quantized(head="spiking", tsm=False, bits=8, ch_mult=(1, 2)):
    """:func:`tiny_model` exported (float64) and quantised to ``bits`` (calibrated on 8 random images, seed 5, 4
    diffusion steps): ``(model, graph, metadata, quantised graph, its metadata)``."""
    model = tiny_model(head, ch_mult, tsm=tsm)
    graph, md = to_nir_graph(model, dtype=np.float64)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cal = calibrate(graph, md, calibration_inputs(images, DiffusionConfig(num_diffusion_steps=50), steps=4))
    qg, qmd = quantize_graph(graph, md, cal, QuantSpec(weight_bits=bits))
    return model, graph, md, qg, qmd


def snntorch_conv_net():
    """snnTorch conv -> Leaky -> Flatten -> Linear -> Leaky (seed 0) and its own NIR export (skips the test when
    snnTorch is not installed)."""
    snn = pytest.importorskip("snntorch", reason="snntorch is not installed")
    from snntorch.export_nir import export_to_nir

    torch.manual_seed(0)

    def leaky(shape, beta, **kw):  # per-neuron parameters: nir 1.0.8 cannot infer the types of scalar ones
        return snn.Leaky(beta=torch.full(shape, beta), threshold=torch.ones(shape), init_hidden=True,
                         reset_delay=False, reset_mechanism="zero", **kw)

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), leaky((4, 6, 6), 0.8), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5), leaky((5,), 0.9, output=True))
    with torch.no_grad():
        net[3].weight.mul_(4.0)
    return net, export_to_nir(net, torch.zeros(2, 1, 6, 6), ignore_dims=[0])
