"""Measure the int8 export's error against the float model: eps and whole samples, over fixed seeds.

    python scripts/quant_error.py [--ckpt neurosdm/assets/tiny_fashion.pt] [--images 32] [--samples 8]
        [--steps 20] [--out docs/data/quant_error.json]

Three versions of the same denoiser, all run on the same inputs:

- ``torch32``: the torch model in float32 (the GPU path);
- ``float64``: the float NIR export run by the reference interpreter in float64 (equal to the torch model in
  float64 to ~1e-15, so ``torch32`` vs ``float64`` is the float32 rounding floor: a spiking net flips a spike
  whenever a membrane sits within rounding of the threshold);
- ``int8``: ``neurosdm export --quantize int8`` (calibrated on 64 training images), run with the fixed-point rules;
- ``jitter``: the float64 graph with every input pixel moved by less than half the int8 input step (uniform), the
  sensitivity of the spiking net to a perturbation far below any quantisation step of the int8 model.

eps: held-out test images noised at several diffusion steps (seeded): MSE between versions, spike disagreement per
IF layer (int8 vs float64), and the denoising MSE against the true noise for each version. Samples: DDIM from the
same x_T; PSNR (peak-to-peak 2, images in [-1, 1]) and max abs difference between versions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nir
import numpy as np
import torch

from neurosdm.checkpoint import load_checkpoint, load_model
from neurosdm.compare import psnr
from neurosdm.data import load_dataset
from neurosdm.diffusion import GaussianDiffusion, sample
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.simulators.reference import run_reference

STEPS = (10, 100, 250, 500, 750, 999)


class GraphDenoiser:
    """``eps = f(x_t, t)`` of an exported graph in the reference interpreter (a sampler's model)."""

    training = False

    def __init__(self, graph, metadata):
        self.graph, self.md = graph, metadata

    def __call__(self, x, t):
        ts = set(t.tolist())
        assert len(ts) == 1, "one diffusion step per call"
        eps, _ = run_reference(self.graph, self.md, x.double().numpy(), ts.pop())
        return torch.from_numpy(eps).to(x.dtype)

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="neurosdm/assets/tiny_fashion.pt")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps for the samples")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--out", default="docs/data/quant_error.json")
    args = ap.parse_args()
    t0 = time.time()

    model, cfg = load_model(args.ckpt)
    model.eval()
    config = load_checkpoint(args.ckpt).config
    graph, md = to_nir_graph(model, diffusion=config.diffusion, dtype=np.float64)
    train = load_dataset("builtin", split="train", limit=args.calibration_images)
    cal = calibrate(graph, md, calibration_inputs(train, config.diffusion))
    qgraph, qmd = quantize_graph(graph, md, cal)
    ifs = [n for n, v in graph.nodes.items() if isinstance(v, nir.IF)]
    model64 = load_model(args.ckpt)[0].double().eval()

    gd = GaussianDiffusion(config.diffusion)
    test = load_dataset("builtin", split="test", limit=args.images)
    rows = []
    for t in STEPS:
        noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(1000 + t))
        x = gd.q_sample(test, t, noise)
        tt = torch.full((x.shape[0],), t)
        with torch.no_grad():
            e32 = model(x, tt).double().numpy()
            e64_torch = model64(x.double(), tt).numpy()
        e64, r64 = run_reference(graph, md, x.double().numpy(), t, record=True)
        # sensitivity floor: the float model with its input moved by less than half the int8 input step
        jitter = np.random.default_rng(t).uniform(-0.5, 0.5, x.shape) * 2.0 ** qmd["quant"]["input_exponent"]
        ej, rj = run_reference(graph, md, x.double().numpy() + jitter, t, record=True)
        eq, rq = run_reference(qgraph, qmd, x.double().numpy(), t, record=True)
        n = noise.double().numpy()
        flips = {k: float(np.mean(rq["records"][k] != r64["records"][k])) for k in ifs}
        rows.append(dict(
            t=t, eps_var=float(e64.var()),
            mse_float64_graph_vs_torch64=float(((e64 - e64_torch) ** 2).mean()),
            mse_torch32_vs_float64=float(((e32 - e64) ** 2).mean()),
            mse_int8_vs_float64=float(((eq - e64) ** 2).mean()),
            mse_input_jitter_vs_float64=float(((ej - e64) ** 2).mean()),
            spike_disagreement_input_jitter=float(np.mean([np.mean(rj["records"][k] != r64["records"][k])
                                                           for k in ifs])),
            max_abs_int8_vs_float64=float(np.abs(eq - e64).max()),
            spike_disagreement_int8=float(np.mean(list(flips.values()))),
            spike_disagreement_int8_max_layer=max(flips.values()),
            denoise_mse_torch32=float(((e32 - n) ** 2).mean()),
            denoise_mse_float64=float(((e64 - n) ** 2).mean()),
            denoise_mse_int8=float(((eq - n) ** 2).mean()),
            saturations_int8=int(sum(rq["saturations"].values())),
        ))
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)

    size = cfg.model.image_size
    x_T = torch.randn(args.samples, cfg.model.img_ch, size, size, generator=torch.Generator().manual_seed(0))
    samples = {}
    for name, den in (("torch32", model), ("float64", GraphDenoiser(graph, md)), ("int8", GraphDenoiser(qgraph, qmd))):
        xt = x_T.double() if name != "torch32" else x_T
        with torch.no_grad():
            samples[name] = sample(den, xt, gd, "ddim", args.steps).double().numpy()
        print(name, "sampled", f"{time.time() - t0:.0f} s", flush=True)
    pairs = {}
    for a, b in (("torch32", "float64"), ("int8", "float64"), ("int8", "torch32")):
        per_image = [psnr(samples[a][i], samples[b][i]) for i in range(args.samples)]
        pairs[f"{a}_vs_{b}"] = dict(psnr_per_image=per_image, psnr_mean=float(np.mean(per_image)),
                                    psnr_median=float(np.median(per_image)),
                                    max_abs=float(np.abs(samples[a] - samples[b]).max()))
    q = qmd["quant"]
    result = dict(
        checkpoint=str(args.ckpt), eps_images=args.images, eps_steps=list(STEPS),
        quant=dict(weight_bits=q["weight_bits"], state_bits=q["state_bits"], input_bits=q["input_bits"],
                   state_exponent=q["state_exponent"], input_exponent=q["input_exponent"],
                   weight_exponents=sorted(set(q["weight_exponents"].values())),
                   round_nodes=len(q["round_nodes"]), rerounded=q["rerounded_bits"],
                   calibration_images=q["calibration"]["images"]),
        eps=rows, samples=dict(n=args.samples, sampler="ddim", steps=args.steps, x_T_seed=0, pairs=pairs),
        seconds=round(time.time() - t0, 1),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    np.savez_compressed(Path(args.out).with_suffix(".npz"), **samples)
    print(json.dumps(pairs, indent=1))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
