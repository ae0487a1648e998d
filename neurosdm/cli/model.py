"""The GPU path: ``train``, ``sample``, ``info``, ``gamma`` and ``convert``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from neurosdm.cli.common import FORCE_HELP, GAMMA_HELP, SAMPLER_HELP, console, progress_bar, say
from neurosdm.config import check_real
from neurosdm.io import check_outputs


def train(
    out: Path = typer.Option(..., "--out", help="output directory (ckpt.pt, log.jsonl, sample grids)"),
    dataset: Optional[str] = typer.Option(None, help="builtin | fashion-mnist | mnist | cifar10 | folder"),
    preset: str = typer.Option("tiny", help="tiny | small | paper-fashion | paper-cifar10"),
    steps: Optional[int] = typer.Option(None, help="total optimisation steps"),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    num_steps: Optional[int] = typer.Option(None, help="spiking time steps per network call (T_snn)"),
    tsm: Optional[bool] = typer.Option(None, "--tsm/--no-tsm", help="temporal-wise spiking mechanism"),
    head: Optional[str] = typer.Option(None, help="sdm (analog Swish head) | spiking (all on chip)"),
    data_dir: Optional[str] = typer.Option(None, help="where the dataset files are"),
    init: Optional[Path] = typer.Option(None, help="start from this checkpoint's weights and architecture (any "
                                        "layout); e.g. --init SDDPM_CKPT --tsm for TSM fine-tuning"),
    qat: bool = typer.Option(False, "--qat", help="quantisation-aware training: every spiking-path conv runs with "
                             "the fake-quantised BN-folded weights the int8 export will use; BN statistics are "
                             "frozen. Meant with --init CKPT (fine-tune a trained model); without --init it trains "
                             "from scratch, BN statistics estimated once from training batches, then frozen. "
                             "Resuming a QAT run keeps QAT on"),
    qat_bits: Optional[int] = typer.Option(None, "--qat-bits", help="QAT weight mantissa bits (default 8)"),
    ann: bool = typer.Option(False, "--ann", help="train the ANN for ANN-to-SNN conversion: every IF neuron "
                             "replaced by a QCFS activation (learnable clip), one step; then `neurosdm convert`"),
    ann_bits: Optional[int] = typer.Option(None, "--ann-bits", help="QCFS bits b with --ann (L = 2**b - 1 levels; "
                                           "the converted SNN runs L steps; default 2)"),
    rate_penalty: Optional[float] = typer.Option(None, "--rate-penalty", help="firing-rate regularisation: loss += "
                                                 "LAMBDA x mean over IF layers of max(0, rate - target); rates logged "
                                                 "per layer in log.jsonl (default 0: off)"),
    rate_target: Optional[float] = typer.Option(None, "--rate-target", help="the rate (spikes per neuron per step) "
                                                "below which --rate-penalty costs nothing (default 0)"),
    seed: Optional[int] = typer.Option(None),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="bf16 autocast"),
    ckpt_every: Optional[int] = typer.Option(None),
    sample_every: Optional[int] = typer.Option(None),
    sample_images: int = typer.Option(64, help="images in the final sample grid (0: none)"),
    resume: bool = typer.Option(True, "--resume/--restart", help="continue from OUT/ckpt.pt if it exists"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N (under torchrun each rank takes its local GPU)"),
    force: bool = typer.Option(False, "--force", help="with --restart: overwrite an existing OUT/ckpt.pt"),
):
    """Train a spiking diffusion model (epsilon-MSE, surrogate gradients)."""
    if not resume:  # --resume continues OUT/ckpt.pt; --restart would replace it
        check_outputs(out, ["ckpt.pt"], force, sources=(init,))
    from neurosdm import jobs

    path = jobs.train(out, preset=preset, dataset=dataset, steps=steps, batch_size=batch_size, lr=lr,
                      num_steps=num_steps, tsm=tsm, head=head, data_dir=data_dir, init=init, qat=qat,
                      qat_bits=qat_bits, ann=ann, ann_bits=ann_bits, rate_penalty=rate_penalty,
                      rate_target=rate_target, seed=seed, bf16=bf16, ckpt_every=ckpt_every,
                      sample_every=sample_every, sample_images=sample_images, resume=resume, device=device,
                      progress=progress_bar("training"))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks
        console.print(f"checkpoint: {path}")
        if sample_images:
            console.print(f"samples:    {path.parent / 'samples.png'}")


def sample(
    ckpt: Path = typer.Argument(..., help="checkpoint (neurosdm, SDM or SDDPM layout)"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    num_images: int = typer.Option(64, help="number of images"),
    sampler: str = typer.Option("ddim", help=SAMPLER_HELP),
    steps: int = typer.Option(50, help="sampling steps (network calls)"),
    eta: float = typer.Option(0.0, help="DDIM eta"),
    order: int = typer.Option(3, help="DPM-Solver order (1-3)"),
    gamma: Optional[Path] = typer.Option(None, help=GAMMA_HELP),
    seed: int = typer.Option(0),
    threshold_scale: float = typer.Option(1.0, help="threshold guidance: inference threshold multiplier"),
    steps_schedule: Optional[str] = typer.Option(None, "--steps-schedule", help="spiking steps per network call by "
                                                 "diffusion step: rules 't<A:K' then a default K, e.g. "
                                                 "'t<300:4,t<700:3,2' (docs/pareto.md)"),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("cpu"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """Sample images on the GPU path (the float torch model): OUT/samples.png and OUT/samples.npy."""
    check_real("--eta", eta, 0.0, 1.0)  # DDIM's stochasticity: 0 (deterministic) .. 1 (DDPM-like)
    check_outputs(out, ["samples.png", "samples.npy"], force, sources=(ckpt, gamma))
    from neurosdm import jobs

    png = jobs.sample(ckpt, out, num_images, sampler=sampler, steps=steps, eta=eta, order=order, gamma_file=gamma,
                      seed=seed, threshold_scale=threshold_scale, batch_size=batch_size, device=device,
                      progress=progress_bar("sampling"), steps_schedule=steps_schedule)
    if png is not None:
        console.print(f"wrote {png} and {png.with_suffix('.npy')}")


def info(ckpt: Path = typer.Argument(..., help="checkpoint (neurosdm, SDM or SDDPM layout)")):
    """Show a checkpoint's layout, configuration and parameter count."""
    from neurosdm.checkpoint import describe

    table = Table(title=str(ckpt), show_header=False)
    for key, value in describe(ckpt).items():
        table.add_row(key, str(value))
    console.print(table)


def gamma(
    ckpt: Path = typer.Argument(..., help="checkpoint (GPU path)"),
    dataset: str = typer.Option(..., help="training data: builtin | fashion-mnist | mnist | cifar10 | folder"),
    steps: int = typer.Option(50, help="the sampler's steps: Gamma is estimated at their timesteps"),
    num_samples: int = typer.Option(100, help="Monte Carlo samples per timestep"),
    data_dir: Optional[str] = typer.Option(None),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", help="the Gamma table (.npz) for `neurosdm sample --gamma`"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """Estimate Analytic-DPM's Gamma_t = E||eps(x_t, t)||^2 / d on training data (Bao et al. 2022)."""
    check_outputs(out, (), force, sources=(ckpt,))
    from neurosdm import jobs

    timesteps, values = jobs.gamma(ckpt, dataset, out, steps=steps, num_samples=num_samples, data_dir=data_dir,
                                   seed=seed)
    say(f"Gamma at {len(timesteps)} timesteps ({num_samples} samples each; mean {float(values.mean()):.4f}) -> {out}")


def convert(
    ann_ckpt: Path = typer.Argument(..., help="QCFS ANN checkpoint (trained with `neurosdm train --ann`)"),
    out: Path = typer.Option(..., "--out", help="the converted SNN checkpoint to write"),
    num_steps: Optional[int] = typer.Option(None, help="spiking steps (default L = 2**bits - 1)"),
    finetune_steps: int = typer.Option(0, help="fine-tune the SNN with the denoising loss (surrogate gradients, "
                                       "BN frozen) for this many steps"),
    dataset: Optional[str] = typer.Option(None, help="fine-tuning data (default: the ANN's training dataset)"),
    data_dir: Optional[str] = typer.Option(None),
    lr: float = typer.Option(1e-4, help="fine-tuning learning rate"),
    batch_size: int = typer.Option(32, help="fine-tuning batch size"),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """ANN-to-SNN conversion: QCFS -> IF (threshold = clip, membrane starts at half of it, reset by subtraction,
    L = 2**bits - 1 steps, mean readout); writes an ordinary SNN checkpoint (export, simulate, sample)."""
    check_outputs(out, (), force, sources=(ann_ckpt,))
    from neurosdm.convert import convert_checkpoint

    r = convert_checkpoint(ann_ckpt, out, force=force, num_steps=num_steps, finetune_steps=finetune_steps,
                           dataset=dataset, data_dir=data_dir, lr=lr, batch_size=batch_size, seed=seed)
    ths = list(r["thresholds"].values())
    say(f"{len(ths)} IF layers, thresholds {min(ths):.4g}..{max(ths):.4g}, {r['num_steps']} spiking steps"
        + (f", fine-tuned {len(r['finetune_losses'])} steps (last loss {r['finetune_losses'][-1]:.4f})"
           if r["finetune_losses"] else "") + f" -> {r['out']}")
