"""Main-environment half of the Lava comparison (runs in .venv: Python 3.11, torch 2.13, neurosdm).

Exports the shipped checkpoint (neurosdm/assets/tiny_fashion.pt) to an int8 NIR file, runs it on real noisy
images (held-out Fashion-MNIST sample images noised at several diffusion steps) in neurosdm's three engines
(reference interpreter, event engine, torch engine), and writes, for scripts/lava_compare.py (which runs in the
Python 3.10 Lava environment):

- ``WORK/layers.npz``: for every IF layer of the graph, its integer synaptic input per step (the summed conv
  outputs minus their biases: what Lava's LIF receives as ``a_in``), the bias, threshold and decay, and the spikes
  neurosdm's reference engine produced;
- ``WORK/netx_t<t>.net``: the netx export (``neurosdm.exporters.lava``) of the feed-forward chain at each diffusion
  step ``t`` (the chain's biases include the time embedding of ``t``), and ``WORK/netx.npz``: its input spikes
  (the chain's start node) and, per chain layer, the spikes of each engine.

Usage: .venv/bin/python scripts/lava_data.py [--work runs/lava] [--images-per-step 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIFFUSION_STEPS = (0, 333, 666, 999)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "lava"), help="output folder (git-ignored runs/lava)")
    ap.add_argument("--ckpt", default=str(ROOT / "neurosdm" / "assets" / "tiny_fashion.pt"))
    ap.add_argument("--images-per-step", type=int, default=2, help="noisy images per diffusion step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import nir
    import torch

    from neurosdm.checkpoint import load_checkpoint
    from neurosdm.data import load_dataset
    from neurosdm.diffusion.schedules import GaussianDiffusion
    from neurosdm.exporters.lava import write_netx
    from neurosdm.exporters.pipeline import export_checkpoint
    from neurosdm.graph.dialect import graph_at, quantize_input
    from neurosdm.io import atomic_path
    from neurosdm.graph.program import load_program
    from neurosdm.simulators.reference import run_reference
    from neurosdm.simulators.run import make_engine

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    nir_path = export_checkpoint(args.ckpt, work / "tiny_int8.nir", quantize="int8", force=True)
    graph = nir.read(nir_path)
    md = graph.metadata
    print(f"exported {nir_path} ({time.time() - t0:.1f} s)", flush=True)

    ckpt = load_checkpoint(args.ckpt)
    n = args.images_per_step
    images = load_dataset("builtin", split="test", limit=n * len(DIFFUSION_STEPS))
    gd = GaussianDiffusion(ckpt.config.diffusion)
    g = torch.Generator().manual_seed(args.seed)

    srcs: dict[str, list[str]] = {}
    for s, d in graph.edges:
        srcs.setdefault(d, []).append(s)
    if_nodes = [name for name, node in graph.nodes.items() if isinstance(node, nir.IF)]

    layers: dict[str, list] = {}
    netx_data: dict[str, np.ndarray] = {}
    summary = {"diffusion_steps": list(DIFFUSION_STEPS), "images_per_step": n, "if_layers": if_nodes,
               "state_exponent": int(np.asarray(md["quant"]["state_exponent"])), "chains": {}}
    for i, t in enumerate(DIFFUSION_STEPS):
        x0 = images[i * n:(i + 1) * n]
        x_t = gd.q_sample(x0, t, torch.randn(x0.shape, generator=g)).double().numpy()
        _, res = run_reference(graph, md, x_t, t, record=True)
        rec = res["records"]
        g_t = graph_at(graph, md, t, 0)
        for name in if_nodes:
            x = sum(rec[s] for s in srcs[name])  # the IF's input: conv outputs (bias included), [T, B, C, H, W]
            convs = [s for s in srcs[name] if isinstance(g_t.nodes[s], nir.Conv2d)]
            bias = (sum(np.asarray(g_t.nodes[s].bias, np.float64) for s in convs)
                    if len(convs) == len(srcs[name]) else np.zeros(x.shape[2]))
            a = x - bias.reshape(1, 1, -1, 1, 1)
            if not np.array_equal(np.rint(a), a):
                raise SystemExit(f"{name}: non-integer synaptic input")
            th = np.unique(np.asarray(g_t.nodes[name].v_threshold))
            entry = layers.setdefault(name, [[], [], [], th])
            entry[0].append(a.astype(np.int32))
            entry[1].append(np.repeat(bias[None].astype(np.int32), x.shape[1], 0))
            entry[2].append(rec[name].astype(bool))

        # netx: the feed-forward chain with the biases of diffusion step t, run by the three engines
        net_path, chain = write_netx(work / f"netx_t{t}.net", graph, md, diffusion_step=t, source=nir_path.name)
        summary["chains"][str(t)] = {"file": net_path.name, "input_node": chain.input_node,
                                     "layers": [[L.conv, L.neuron] for L in chain.layers],
                                     "stop_node": chain.stop_node, "stop_reason": chain.stop_reason}
        netx_data[f"t{t}/input"] = rec[chain.input_node].astype(np.int8)
        for L in chain.layers:
            netx_data[f"t{t}/reference/{L.neuron}"] = rec[L.neuron].astype(np.int8)
        x_enc, _ = quantize_input(x_t, md)
        program = load_program(graph)
        for engine in ("event", "torch"):
            out = make_engine(engine, program).run(x_enc, t, record=True)
            for L in chain.layers:
                netx_data[f"t{t}/{engine}/{L.neuron}"] = np.asarray(out["records"][L.neuron]).astype(np.int8)
        print(f"t={t}: reference, event and torch engines run ({time.time() - t0:.1f} s)", flush=True)

    arrays = {}
    for name, (a, b, s, th) in layers.items():
        if th.size != 1:
            raise SystemExit(f"{name}: per-neuron thresholds")
        arrays[f"{name}/a"] = np.concatenate(a, axis=1)
        arrays[f"{name}/bias"] = np.concatenate(b, axis=0)
        arrays[f"{name}/spikes"] = np.concatenate(s, axis=1)
        arrays[f"{name}/threshold"] = np.int64(th[0])
        arrays[f"{name}/decay_q12"] = np.int64(4096)  # IF: no leak (the export's IF nodes)
    with atomic_path(work / "layers.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    with atomic_path(work / "netx.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **netx_data)
    summary["num_steps"] = int(np.asarray(md["num_steps"]))
    summary["source_checkpoint"] = Path(args.ckpt).name
    with atomic_path(work / "data.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(f"wrote {work}/layers.npz, netx.npz, data.json ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
