"""The event-driven engine (``neurosdm.simulators.event``) on the shipped model's int8 export, one thread.

(a) one denoiser call on a real noised test image (builtin test split, image 0, diffusion step ``--t``): per
    spike-input conv the synops, the time of its event conv (the kernel alone, and with the event extraction and
    output layout around it) and synops/s; the whole call's time;
(b) the real firing activity: spikes / neuron updates per IF layer and in total;
(c) forced activity: the spike inputs of every spike-input conv replaced by random spikes at 1..50 %; the event
    conv timed and fitted ``time = a + b * synops`` (per layer against events too; pooled over all layers);
(d) the same layers densely by ``torch.nn.functional.conv2d`` (float64 and float32, one thread): time per dense
    operation (dense ops = every input position times its nonzero fan-out, the ``macs`` count) and the ratio
    event time per synop (the fitted slope b) / dense time per op;
(e) memory, batch 1. Engine = what ``EventEngine`` holds beyond the Program (the kernel plans: weight runs,
    indices, per-tap counts; its shared output buffer) + the peak of what one call allocates (tracemalloc:
    activations, neuron state, outputs, temporaries). Against: the graph's weights (every conv weight and bias,
    float64, as the Program holds them) + the neuron state (one float64 per neuron of the I/LI/IF layers);
(f) whole calls at forced activity: every IF layer's output replaced by random spikes at 1..50 %
    (``EventEngine(program, force_rate=rate, force_seed=1)``: a fresh engine for every call, built outside the
    timed call, so the same random draw at every repeat), plus the real activity (a fresh engine too); the levels
    timed round robin, median of ``--repeats`` calls each; fitted ``call time = a + b * events``
    (events = the input events of all event convs over the call), and the ratio of each call time to the
    real-activity call time.

Writes ``results/event_engine.json`` and prints Markdown tables. ``python benchmarks/event_engine.py --help``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (RESULTS_DIR, log, machine_info, machine_line, markdown_table, median_seconds,  # noqa: E402
                     write_json_atomic)

RATES = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50)


def _fit(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    r2 = 1.0 - np.sum((y - (a + b * x)) ** 2) / np.sum((y - y.mean()) ** 2)
    return float(a), float(b), float(r2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="neurosdm/assets/tiny_fashion.pt")
    ap.add_argument("--t", type=int, default=500, help="diffusion step of the noised image")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(RESULTS_DIR / "event_engine.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from neurosdm.data import load_dataset
    from neurosdm.diffusion.schedules import GaussianDiffusion
    from neurosdm.exporters.pipeline import export_checkpoint
    from neurosdm.graph.dialect import quantize_input
    from neurosdm.simulators.event import HAVE_NUMBA, EventEngine, scatter_kernel
    from neurosdm.graph.program import load_program
    from neurosdm.simulators.run import config_of

    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        log("exporting the int8 graph ...")
        path = export_checkpoint(args.checkpoint, Path(tmp) / "model.nir", quantize="int8")
        prog = load_program(path)
    t0 = time.perf_counter()
    eng = EventEngine(prog)
    build_s = time.perf_counter() - t0
    diffusion = GaussianDiffusion(config_of(prog).diffusion)
    x0 = load_dataset("builtin", split="test", limit=1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = min(args.t, prog.num_diffusion_steps - 1)
    x_t = diffusion.q_sample(x0, torch.tensor([t]), noise).double().numpy()
    x, _ = quantize_input(x_t, prog.metadata)
    eng.run(x, t)  # compile / load the kernel
    call_s = median_seconds(lambda: eng.run(x, t), max(3, args.repeats // 3))
    res = eng.run(x, t, record=True)
    counts, rec = res["counts"], res["records"]
    K = prog.num_steps
    event_layers = [layer for layer in prog.layers if layer.kind == "conv" and layer.input != "analog"]

    # (a) the real call, per event conv
    real_rows, real = [], {}
    tot_ops = tot_kernel = tot_wrapped = 0.0
    for layer in event_layers:
        plan = eng.plans[layer.name]
        inp = rec[layer.sources[0]]  # [K, 1, C, H, W]
        kernel_s = wrapped_s = 0.0
        ops = 0
        for k in range(K):
            flat = np.ascontiguousarray(inp[k]).reshape(-1)
            addr = np.flatnonzero(flat)
            vals = flat[addr]
            dtype = plan.acc_dtype  # the engine's accumulator for this layer
            xk = np.ascontiguousarray(inp[k], dtype)
            out = np.zeros(plan.buffer_size, dtype)
            a = (xk, out, plan.rptr, plan.rstart, plan.rlen, plan.roff, plan.wv, plan.nnz, plan.cls_nnz, plan.sh,
                 plan.sw, plan.pt, plan.pl, plan.Ho, plan.Wo, plan.Hp, plan.Wp, plan.tY, plan.tX, plan.Co)
            ev_k, ops_k = scatter_kernel(*a)
            assert ev_k == addr.size
            ops += ops_k
            kernel_s += median_seconds(lambda: scatter_kernel(*a), args.repeats)  # the scan and the scatter, no zeroing
            buf = eng.backend.scratch(plan, inp[k].shape[0])
            wrapped_s += median_seconds(lambda: plan.scatter(inp[k], True, buf), args.repeats)
        key = "synops" if layer.input == "spikes" else "graded_ops"
        assert ops == int(counts[layer.name][key].sum())
        real[layer.name] = {"events": int(counts[layer.name]["events_in"].sum()), "synops": int(ops),
                            "kernel_s": kernel_s, "wrapped_s": wrapped_s}
        tot_ops += ops
        tot_kernel += kernel_s
        tot_wrapped += wrapped_s
        real_rows.append([layer.name, f"{real[layer.name]['events']:,}", f"{ops:,}", f"{kernel_s * 1e6:.0f}",
                          f"{wrapped_s * 1e6:.0f}", f"{ops / kernel_s / 1e6:.0f}", f"{ops / wrapped_s / 1e6:.0f}"])
    real_rows.append(["total", f"{sum(v['events'] for v in real.values()):,}", f"{int(tot_ops):,}",
                      f"{tot_kernel * 1e6:.0f}", f"{tot_wrapped * 1e6:.0f}", f"{tot_ops / tot_kernel / 1e6:.0f}",
                      f"{tot_ops / tot_wrapped / 1e6:.0f}"])

    # (b) activity
    act = {}
    for layer in prog.layers:
        if layer.kind == "if":
            c = counts[layer.name]
            act[layer.name] = float(c["spikes_out"].sum() / c["neuron_updates"].sum())
    spikes = sum(int(counts[n]["spikes_out"].sum()) for n in act)
    updates = sum(int(counts[n]["neuron_updates"].sum()) for n in act)

    # (c) forced activity and (d) dense
    rng = np.random.default_rng(0)
    forced, dense = {}, {}
    xs_syn, ys = [], []
    for layer in event_layers:
        plan = eng.plans[layer.name]
        pts = []
        for rate in RATES:
            s = (rng.random((1, *layer.in_shape)) < rate).astype(np.float64)
            _, ev, ops = plan.scatter(s, True, eng.backend.scratch(plan, s.shape[0]))
            sec = median_seconds(lambda: plan.scatter(s, True, eng.backend.scratch(plan, s.shape[0])), args.repeats)
            pts.append((rate, ev, ops, sec))
            xs_syn.append(ops)
            ys.append(sec)
        a, b, r2 = _fit([p[1] for p in pts], [p[3] for p in pts])
        forced[layer.name] = {"points": [dict(zip(("rate", "events", "synops", "seconds"), p)) for p in pts],
                              "fit_events": {"a_s": a, "b_s_per_event": b, "r2": r2},
                              "fit_synops": dict(zip(("a_s", "b_s_per_synop", "r2"),
                                                     _fit([p[2] for p in pts], [p[3] for p in pts])))}
        xt = torch.from_numpy(np.ones((1, *layer.in_shape)))
        w = torch.from_numpy(layer.weight)
        pad = (layer.padding[1][0], layer.padding[1][1], layer.padding[0][0], layer.padding[0][1])
        d = {}
        for dt in (torch.float64, torch.float32):
            xx, ww = torch.nn.functional.pad(xt.to(dt), pad), w.to(dt)
            f = (lambda xx=xx, ww=ww: torch.nn.functional.conv2d(xx, ww, None, layer.stride))
            f()
            d[str(dt).split(".")[-1]] = median_seconds(f, args.repeats)
        dense[layer.name] = {"dense_ops": plan.macs_per_image, **{f"{k}_s": v for k, v in d.items()}}
    a_all, b_all, r2_all = _fit(xs_syn, ys)
    dense_ops = sum(v["dense_ops"] for v in dense.values())
    per_op = {dt: sum(v[f"{dt}_s"] for v in dense.values()) / dense_ops for dt in ("float64", "float32")}
    slope_per_layer = {n: v["fit_synops"]["b_s_per_synop"] for n, v in forced.items()}

    # (e) memory
    weights = sum(np.asarray(layer.weight, np.float64).nbytes + np.asarray(layer.bias, np.float64).nbytes
                  for layer in prog.layers if layer.kind == "conv")
    state = sum(layer.size * 8 for layer in prog.layers if layer.kind in ("if", "li", "i"))
    step_acts = sum(layer.size * 8 for layer in prog.layers)
    plans = sum(p.weight_bytes for p in eng.plans.values())
    buf_bytes = int(sum(b.nbytes for b in eng.backend.bufs.values()))
    wv32 = all(p.wv.dtype == np.float32 for p in eng.plans.values() if p.event)
    tracemalloc.start()
    eng.run(x, t)
    _, peak_run = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    EventEngine(prog)
    _, peak_build = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    engine_total = plans + buf_bytes + peak_run
    mem_ratio = engine_total / (weights + state)

    # (f) whole calls at forced activity
    def call_events(res):
        return sum(int(res["counts"][layer.name]["events_in"].sum()) for layer in event_layers)

    def one_call(rate):
        forced_eng = EventEngine(prog, force_rate=rate, force_seed=1)  # the same draw at every repeat
        t0 = time.perf_counter()
        res = forced_eng.run(x, t)
        return call_events(res), time.perf_counter() - t0

    levels = (None, *RATES)
    for rate in levels:
        one_call(rate)  # warm up
    times = {rate: [] for rate in levels}
    events = {}
    for _ in range(max(5, args.repeats)):  # round robin: load drift hits every level alike
        for rate in levels:
            events[rate], sec = one_call(rate)
            times[rate].append(sec)
    s_real = float(np.median(times[None]))
    whole = [{"rate": rate, "events": events[rate], "seconds": float(np.median(times[rate])),
              "ratio_to_real": float(np.median(times[rate])) / s_real} for rate in levels]
    wa, wb, wr2 = _fit([w["events"] for w in whole], [w["seconds"] for w in whole])
    wa_f, wb_f, wr2_f = _fit([w["events"] for w in whole[1:]], [w["seconds"] for w in whole[1:]])

    result = {
        "machine": info, "numba": HAVE_NUMBA, "checkpoint": args.checkpoint, "diffusion_step": t,
        "num_steps": K, "build_s": build_s, "call_s": call_s,
        "real": real, "real_total": {"synops": tot_ops, "kernel_s": tot_kernel, "wrapped_s": tot_wrapped,
                                     "synops_per_s_kernel": tot_ops / tot_kernel,
                                     "synops_per_s_wrapped": tot_ops / tot_wrapped},
        "activity": {"per_layer": act, "spikes": spikes, "neuron_updates": updates, "rate": spikes / updates},
        "forced": forced, "fit_all": {"a_s": a_all, "b_s_per_synop": b_all, "r2": r2_all},
        "dense": dense, "dense_s_per_op": per_op,
        "ratio_event_per_synop_to_dense_per_op": {dt: b_all / v for dt, v in per_op.items()},
        "memory": {"peak_run_bytes": peak_run, "peak_build_bytes": peak_build, "graph_weights_bytes": weights,
                   "neuron_state_bytes": state, "one_step_activations_bytes": step_acts, "plan_bytes": plans,
                   "buffer_bytes": buf_bytes, "plan_weights_float32": wv32, "engine_total_bytes": engine_total,
                   "engine_total_over_weights_plus_state": mem_ratio,
                   "accounting": "engine_total = plan_bytes (what the engine holds beyond the Program) + "
                                 "buffer_bytes (its shared kernel output buffer) + peak_run_bytes (tracemalloc "
                                 "peak of one call, batch 1); against graph_weights_bytes (conv weights and "
                                 "biases, float64) + neuron_state_bytes (one float64 per I/LI/IF neuron)"},
        "whole_call": {"points": whole, "fit_all": {"a_s": wa, "b_s_per_event": wb, "r2": wr2},
                       "fit_forced": {"a_s": wa_f, "b_s_per_event": wb_f, "r2": wr2_f}},
    }
    write_json_atomic(args.out, result)

    print(f"### Event engine (`event_engine.py`), int8 `{Path(args.checkpoint).name}`, t={t}, batch 1, "
          f"{K} spiking steps, 1 thread\n")
    print(f"(a) one denoiser call: {call_s * 1e3:.1f} ms for the whole call (engine built in {build_s:.2f} s); "
          "event convs on the real input, summed over the steps:\n")
    print(markdown_table(["layer", "events", "synops", "kernel us", "with extraction us", "Msynops/s kernel",
                          "Msynops/s with extraction"], real_rows))
    print(f"\n(b) firing activity: {spikes:,} spikes / {updates:,} neuron updates = {spikes / updates:.3f} "
          f"(per IF layer {min(act.values()):.3f}..{max(act.values()):.3f})\n")
    rows = []
    for n, v in forced.items():
        fe, fs = v["fit_events"], v["fit_synops"]
        dn = dense[n]
        rows.append([n, f"{fe['a_s'] * 1e6:.1f}", f"{fe['b_s_per_event'] * 1e9:.1f}", f"{fe['r2']:.4f}",
                     f"{fs['b_s_per_synop'] * 1e9:.3f}", f"{dn['float64_s'] / dn['dense_ops'] * 1e9:.3f}",
                     f"{dn['float32_s'] / dn['dense_ops'] * 1e9:.3f}",
                     f"{fs['b_s_per_synop'] / (dn['float64_s'] / dn['dense_ops']):.1f}",
                     f"{fs['b_s_per_synop'] / (dn['float32_s'] / dn['dense_ops']):.1f}"])
    print("(c, d) forced activity 1-50 %: fit time = a + b * events per layer; slope per synop; torch conv2d dense "
          "time per (nonzero-weight) dense op; ratio = event ns/synop / dense ns/op\n")
    print(markdown_table(["layer", "a us", "b ns/event", "R^2", "ns/synop", "dense f64 ns/op", "dense f32 ns/op",
                          "ratio f64", "ratio f32"], rows))
    r = result["ratio_event_per_synop_to_dense_per_op"]
    print(f"\nall layers pooled: time = {a_all * 1e6:.1f} us + {b_all * 1e9:.3f} ns x synops (R^2 {r2_all:.4f}), "
          f"{1 / b_all / 1e6:.0f} Msynops/s; dense {per_op['float64'] * 1e9:.3f} ns/op (f64), "
          f"{per_op['float32'] * 1e9:.3f} ns/op (f32); ratio {r['float64']:.1f}x (f64), {r['float32']:.1f}x (f32) "
          f"(target 8x vs f64: {'met' if r['float64'] <= 8 else 'not met'})\n")
    m = result["memory"]
    print(f"(e) memory: engine {engine_total / 2**20:.2f} MiB = plans {plans / 2**20:.2f} MiB (weights "
          f"{'float32' if wv32 else 'float64'}) + buffer {buf_bytes / 2**20:.2f} MiB + peak of one call "
          f"{peak_run / 2**20:.2f} MiB (tracemalloc); graph weights {weights / 2**20:.2f} MiB (float64) + neuron "
          f"state {state / 2**20:.2f} MiB = {(weights + state) / 2**20:.2f} MiB; ratio {mem_ratio:.2f}x "
          f"(target 2x: {'met' if mem_ratio <= 2 else 'not met'}); building the engine peaks at "
          f"{m['peak_build_bytes'] / 2**20:.2f} MiB\n")
    rows = [["real" if w["rate"] is None else f"{w['rate']:.0%}", f"{w['events']:,}", f"{w['seconds'] * 1e3:.1f}",
             f"{w['ratio_to_real']:.2f}"] for w in whole]
    print("(f) whole denoiser calls, every IF layer forced to random spikes at the rate (real: the model's own "
          "activity)\n")
    print(markdown_table(["activity", "events", "call ms", "ratio to real"], rows))
    print(f"\nfit call time = a + b * events: all points a = {wa * 1e3:.1f} ms, b = {wb * 1e9:.1f} ns/event, "
          f"R^2 {wr2:.4f}; forced points only a = {wa_f * 1e3:.1f} ms, b = {wb_f * 1e9:.1f} ns/event, "
          f"R^2 {wr2_f:.4f}\n")
    print(machine_line(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
