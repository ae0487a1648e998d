"""The papers' model at full size (issue 14, items 3-4): paper-cifar10 (random weights, seeded) and the shipped tiny
model through export, both engines, the GPU path and pricing; every measurement in a child process of its own.

    python benchmarks/deep_model.py [--models paper-cifar10,tiny] [--steps 3] [--calibration-images 8] [--threads 1]

Per model (``paper-cifar10``: ``SpikingUNet(preset("paper-cifar10").model)`` after ``torch.manual_seed(0)``, saved
with ``neurosdm.checkpoint.save_checkpoint``, 66,696,413 parameters; ``tiny``: ``neurosdm/assets/tiny_fashion.pt``):

(a) export: ``export_checkpoint`` float and int8 (``--upsample auto``), wall time, file size, peak RSS; for int8 also
    the calibration alone (``pipeline.calibrate`` wrapped: its time and the process's peak RSS while it runs, the
    float graph held). There is no CIFAR-10 on this machine: paper-cifar10 is calibrated on SYNTHETIC images, uniform
    random pixels (seed 0) that the script writes in the CIFAR-10 python-batch format (``--calibration cifar10
    --data-dir WORK/noise_cifar``); for random weights no real data would mean more. tiny calibrates on its own
    training set (Fashion-MNIST if installed, else the built-in sample, as ``neurosdm export`` does).
(b) memory: peak resident memory (``VmHWM`` of ``/proc/self/status``, read in the child) above the bare-import
    baseline (a child that imports the same modules and nothing else), batch 1, on the int8 export: the load peak
    (``load_program``: ``nir.read`` materialises the whole graph, float32 weights, while it is translated), then,
    the peak reset, the run peak after one network call and after a short generation (``--steps`` DDIM calls), both
    engines. Against (stored weights + neuron state of one image): the weight, bias and per-step table arrays as the
    Program holds them (int8 mantissas for an int8 export, ``graph.nodes.mantissas``) + one int64 per I/LI/IF
    neuron; also stated against the float32 parameters of the checkpoint (what the file stores). Target: 3x. "Code
    pages": the growth of file-backed resident memory (``RssFile``: the machine code of numba's LLVM, torch's
    kernels) over the run, included in the peaks.
(c) speed, the same children (one thread, ``OMP_NUM_THREADS=1``): every network call timed (the first one, with the
    kernel compile, reported apart). Event engine time per operation = call time / (synops + graded_ops + macs of
    the call: the work it does, events times fan-out, plus the analog convs it runs densely); torch engine time per
    dense operation = call time / (sum of ``Layer.macs`` of every conv x spiking steps: what a clocked dense engine
    computes). Fixed cost per call: the same call with every IF layer silenced (``EventEngine(force_rate=0)``,
    benchmarks only: the neuron updates, the analog convs, buffers; no events); time per synaptic operation at the
    real activity = (real call - fixed cost) / (synops + graded_ops); its ratio to the dense time per operation is
    the issue's 4x target. Also the whole-call ratio, and the fit ``call time = a + b x (synops + graded_ops)``
    over forced random spikes at 0/1/5/20 % (``b``: the marginal time per synaptic operation). Time per image at
    DDIM 20: the GPU path (torch model, float32) and both engines; for paper-cifar10
    measured over ``--steps`` calls and scaled (20 x the median call time, stated), for tiny measured at DDIM 20.
(d) energy: ``neurosdm.energy.price_all`` on the event engine's counts of the int8 export (every shipped profile,
    the ANN baselines): mJ per image for the ``--steps`` calls run and per network call; per-layer firing rates and
    synaptic operations.

Writes ``results/deep_model.json`` and prints Markdown tables. The load average (``uptime``) is recorded at the
start and the end: these machines are shared.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import (RESULTS_DIR, load_average, log, machine_info, machine_line, markdown_table,  # noqa: E402
                     median_seconds, write_json_atomic)

TINY = HERE.parent / "neurosdm" / "assets" / "tiny_fashion.pt"
FORCED_RATES = (0.0, 0.01, 0.05, 0.20)
IMPORTS = ("torch", "nir", "neurosdm.checkpoint", "neurosdm.exporters.pipeline", "neurosdm.graph.program",
           "neurosdm.simulators.run", "neurosdm.simulators.event", "neurosdm.sample", "neurosdm.energy")


# ----------------------------------------------------------------------------------------------- in the child

def _status(key: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _import_all():
    import importlib

    for name in IMPORTS:
        importlib.import_module(name)


class _Timed:
    """A denoiser (torch model or GraphDenoiser) whose every call is timed."""

    training = False

    def __init__(self, inner, after_first=None):
        self.inner, self.times, self.after_first = inner, [], after_first

    def __call__(self, x, t):
        t0 = time.perf_counter()
        out = self.inner(x, t)
        self.times.append(time.perf_counter() - t0)
        if len(self.times) == 1 and self.after_first:
            self.after_first()
        return out

    def eval(self):
        self.inner.eval()
        return self

    def train(self, mode: bool = True):
        self.inner.train(mode)
        return self


def _weights_and_state(program) -> dict:
    held = 0
    for layer in program.layers:
        for name in ("weight", "bias"):
            v = getattr(layer, name, None)
            if isinstance(v, np.ndarray):
                held += v.nbytes
    tables = sum(np.asarray(t).nbytes for key in ("bias_tables", "scale_tables")
                 for t in program.metadata.get(key, {}).values())
    state = sum(layer.size * 8 for layer in program.layers if layer.kind in ("if", "li", "i"))
    dense = sum(layer.macs for layer in program.layers if layer.kind == "conv") * program.num_steps
    return {"weights_bytes_held": held, "tables_bytes_held": tables, "neuron_state_bytes": state,
            "dense_ops_per_call": dense}


def child_baseline(spec) -> dict:
    _import_all()
    return {"hwm": _status("VmHWM"), "rss": _status("VmRSS")}


def child_export(spec) -> dict:
    _import_all()
    from neurosdm.exporters import pipeline

    base = _status("VmHWM")
    cal = {}
    real_calibrate = pipeline.calibrate

    def calibrate(*a, **k):
        cal["rss_before"] = _status("VmRSS")
        cal["hwm_before"] = _status("VmHWM")
        cal["peak_reset"] = _reset_peak()
        t0 = time.perf_counter()
        out = real_calibrate(*a, **k)
        cal["seconds"] = time.perf_counter() - t0
        cal["peak_rss"] = _status("VmHWM")
        return out

    pipeline.calibrate = calibrate
    t0 = time.perf_counter()
    path = pipeline.export_checkpoint(spec["ckpt"], spec["out"], quantize=spec["quantize"], force=True,
                                      calibration=spec.get("calibration"), data_dir=spec.get("data_dir"),
                                      calibration_images=spec.get("calibration_images", 64))
    sec = time.perf_counter() - t0
    # the peak over the whole export: before the calibration (the counter is reset there) or from it to the end
    peak = max(_status("VmHWM"), cal.get("hwm_before", 0))
    return {"seconds": sec, "file_bytes": Path(path).stat().st_size, "imports_hwm": base,
            "calibration": cal or None, "peak_rss": peak}


def child_gpu_path(spec) -> dict:
    _import_all()
    import torch
    from neurosdm.checkpoint import load_model
    from neurosdm.sample import generate

    torch.set_num_threads(spec["threads"])
    model, config = load_model(spec["ckpt"])
    timed = _Timed(model)
    t0 = time.perf_counter()
    generate(timed, config, 1, seed=0, num_sample_steps=spec["steps"], batch_size=1)
    return {"seconds": time.perf_counter() - t0, "call_s": timed.times, "hwm": _status("VmHWM"),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def child_engine(spec) -> dict:
    _import_all()
    import torch
    from neurosdm.energy import price_all
    from neurosdm.graph.program import load_program
    from neurosdm.sample import generate
    from neurosdm.simulators import run as r
    from neurosdm.simulators.event import EventEngine

    torch.set_num_threads(spec["threads"])
    marks = {"imports": _status("VmRSS")}
    file_pages = {"imports": _status("RssFile")}
    program = load_program(spec["nir"])
    marks["program_loaded"] = _status("VmRSS")
    marks["load_peak"] = _status("VmHWM")  # nir.read holds the whole graph (float32 weights) while it translates
    marks["peak_reset"] = _reset_peak()
    eng = r.make_engine(spec["engine"], program, dtype=torch.float64)
    marks["engine_built"] = _status("VmRSS")
    den = r.GraphDenoiser(program, eng)
    after = {}
    timed = _Timed(den, after_first=lambda: after.update(hwm_one_call=_status("VmHWM")))
    t0 = time.perf_counter()
    generate(timed, r.config_of(program), 1, seed=0, num_sample_steps=spec["steps"], batch_size=1)
    file_pages["after_generation"] = _status("RssFile")
    out = {"seconds": time.perf_counter() - t0, "call_s": timed.times, "rss_marks": marks, "rss_file": file_pages,
           "hwm_one_call": after["hwm_one_call"], "hwm_generation": _status("VmHWM"),
           **_weights_and_state(program)}
    stats = den.stats("ddim", 0.0, 1)
    calls = len(stats.timesteps)
    out["per_call"] = {c: stats.total(c) / calls for c in ("synops", "graded_ops", "macs", "events_in",
                                                           "spikes_out", "neuron_updates")}
    out["calls"] = calls
    if spec["engine"] == "event":
        rows = stats.layer_rows()
        out["layers"] = [{k: row.get(k) for k in ("layer", "kind", "rate", "events_in", "synops", "graded_ops",
                                                  "macs", "spikes_out", "neuron_updates")} for row in rows]
        priced = price_all(stats, program)
        out["energy"] = {"summary": {k: {kk: v[kk] for kk in ("per_image_mj", "per_call_per_image_uj",
                                                              "time_per_image_ms", "vs_ann_fp32")}
                                     for k, v in priced["summary"].items()},
                         "ann_baseline": priced["ann_baseline"],
                         "paper_formula": priced["paper_formula_on_measured_rates"],
                         "firing_rates": priced["firing_rates"]}
        # fixed cost per call: forced random activity (a fresh engine per level, same x and t as the last call)
        md = program.metadata
        rng = np.random.default_rng(0)
        cfg = r.config_of(program).model
        x = rng.standard_normal((1, cfg.img_ch, cfg.image_size, cfg.image_size))
        from neurosdm.graph.dialect import quantize_input

        xq = quantize_input(x, md)[0] if program.fixed is not None else x
        t = program.num_diffusion_steps // 2
        points = []
        for rate in (None, *FORCED_RATES):
            forced = EventEngine(program) if rate is None else EventEngine(program, force_rate=rate, force_seed=1)
            forced.run(xq, t)  # its first call sizes the kernel buffer: not timed
            secs, ops = [], 0
            for _ in range(2):
                t0 = time.perf_counter()
                res = forced.run(xq, t)
                secs.append(time.perf_counter() - t0)
                ops = sum(int(np.asarray(c.get("synops", 0)).sum() + np.asarray(c.get("graded_ops", 0)).sum())
                          for c in res["counts"].values())
            points.append({"rate": rate, "event_ops": ops, "seconds": min(secs), "samples_s": secs})
            del forced
        b, a = np.polyfit([p["event_ops"] for p in points], [p["seconds"] for p in points], 1)
        out["forced"] = {"points": points, "t": t, "fit": {"a_s": float(a), "b_s_per_op": float(b)}}
        out["kernels"] = _kernels(program, eng, xq, t)
    return out


def _kernels(program, eng, x, t) -> list[dict]:
    """Every spike/graded-input conv on its real input (a recorded call of the warm engine): the event kernel
    (``ConvPlan.scatter``, the engine's own call, summed over the spiking steps) against ``torch.nn.functional.conv2d``
    on the same layer, dense, float64 and float32, one step times the spiking steps (as benchmarks/event_engine.py)."""
    import torch
    import torch.nn.functional as F

    res = eng.run(x, t, record=True)
    rec, counts, K = res["records"], res["counts"], program.num_steps
    rows = []
    for layer in program.layers:
        if layer.kind != "conv" or layer.input == "analog" or layer.nd != 2:
            continue
        plan = eng.plans[layer.name]
        inp = rec[layer.sources[0]]
        buf = eng.backend.scratch(plan, inp.shape[1])
        event_s = sum(median_seconds(lambda xk=np.ascontiguousarray(inp[k]): plan.scatter(xk, True, buf))
                      for k in range(K))
        c = counts[layer.name]
        ops = int(np.asarray(c.get("synops", 0)).sum() + np.asarray(c.get("graded_ops", 0)).sum())
        pad = (layer.padding[1][0], layer.padding[1][1], layer.padding[0][0], layer.padding[0][1])
        dense = {}
        for dt in (torch.float64, torch.float32):
            w = torch.from_numpy(np.asarray(layer.weight, np.float64)).to(dt)
            xx = F.pad(torch.ones((1, *layer.in_shape), dtype=dt), pad)
            f = (lambda xx=xx, w=w: F.conv2d(xx, w, None, layer.stride))
            f()
            dense[str(dt).split(".")[-1]] = median_seconds(f) * K
        rows.append({"layer": layer.name, "synops": ops, "event_s": event_s, "dense_ops": plan.macs_per_image * K,
                     "dense_float64_s": dense["float64"], "dense_float32_s": dense["float32"]})
    return rows


CHILDREN = {"baseline": child_baseline, "export": child_export, "gpu_path": child_gpu_path, "engine": child_engine}


# ----------------------------------------------------------------------------------------------- the parent

def run_child(kind: str, spec: dict) -> dict:
    log(f"  child {kind} {json.dumps({k: v for k, v in spec.items() if k not in ('threads',)})}")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        log(p.stderr[-3000:])
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}",
                "wall_s": time.perf_counter() - t0}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def make_paper_checkpoint(work: Path) -> Path:
    """paper-cifar10 with random weights (seed 0) and the synthetic calibration set (noise in CIFAR-10 batches)."""
    ckpt = work / "paper-cifar10.pt"
    if not ckpt.exists():
        code = ("import torch; from neurosdm.config import preset; from neurosdm.models import SpikingUNet; "
                "from neurosdm.checkpoint import save_checkpoint; torch.manual_seed(0); c = preset('paper-cifar10'); "
                f"save_checkpoint({str(ckpt)!r}, c, SpikingUNet(c.model))")
        subprocess.run([sys.executable, "-c", code], check=True)
    batches = work / "noise_cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(batches / name, "wb") as f:  # 2 images a batch: uniform random pixels, uint8 [N, 3072]
            pickle.dump({b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 0]}, f)
    return ckpt


def measure(name: str, ckpt: Path, work: Path, args, baseline_hwm: int) -> dict:
    paper = name != "tiny"
    cal = {"calibration": "cifar10", "data_dir": str(work / "noise_cifar")} if paper else {}
    res = {"checkpoint": str(ckpt.name), "calibration": "synthetic: uniform random pixels in CIFAR-10 batch format "
           f"({args.calibration_images} images, seed 0)" if paper else "the checkpoint's training set (else builtin)"}
    f32, q8 = work / f"{name}_f32.nir", work / f"{name}_int8.nir"
    log(f"{name}: export")
    res["export_float"] = run_child("export", {"ckpt": str(ckpt), "out": str(f32), "quantize": "none"})
    res["export_int8"] = run_child("export", {"ckpt": str(ckpt), "out": str(q8), "quantize": "int8",
                                              "calibration_images": args.calibration_images, **cal})
    steps = args.steps if paper else 20
    log(f"{name}: GPU path, DDIM {steps}")
    res["gpu_path"] = run_child("gpu_path", {"ckpt": str(ckpt), "steps": steps, "threads": args.threads})
    for engine in ("torch", "event"):
        log(f"{name}: {engine} engine on the int8 export, DDIM {steps}")
        res[f"engine_{engine}"] = run_child("engine", {"nir": str(q8), "engine": engine, "steps": steps,
                                                       "threads": args.threads})
    res["steps"] = steps
    return derive(res, baseline_hwm)


def _median(xs):
    return float(np.median(xs)) if xs else float("nan")


def derive(res: dict, baseline_hwm: int) -> dict:
    d = {}
    for key in ("export_float", "export_int8"):
        e = res[key]
        if "error" not in e:
            d[key] = {"seconds": e["seconds"], "file_mb": e["file_bytes"] / 1e6,
                      "peak_rss_gb": e["peak_rss"] / 1e9,
                      "peak_rss_above_baseline_gb": (e["peak_rss"] - baseline_hwm) / 1e9}
            if e.get("calibration"):
                c = e["calibration"]
                d[key]["calibration_s"] = c["seconds"]
                d[key]["calibration_peak_rss_gb"] = c["peak_rss"] / 1e9
                d[key]["calibration_peak_rss_above_baseline_gb"] = (c["peak_rss"] - baseline_hwm) / 1e9
    gp = res["gpu_path"]
    params = gp.get("parameters")
    if "error" not in gp:
        d["gpu_path"] = {"call_s_median": _median(gp["call_s"][1:] or gp["call_s"]), "first_call_s": gp["call_s"][0],
                         "calls": len(gp["call_s"])}
        d["gpu_path"]["ddim20_s_per_image"] = 20 * d["gpu_path"]["call_s_median"]
        if params:
            d["float32_parameter_bytes"] = params * 4
            for key in ("export_float", "export_int8"):
                if key in d:
                    d[key]["file_over_float32_weights"] = res[key]["file_bytes"] / (params * 4)
    for engine in ("torch", "event"):
        e = res[f"engine_{engine}"]
        if "error" in e:
            continue
        stored = e["weights_bytes_held"] + e["tables_bytes_held"]
        denom = stored + e["neuron_state_bytes"]
        call = _median(e["call_s"][1:] or e["call_s"])
        x = {"call_s_median": call, "first_call_s": e["call_s"][0], "calls": e["calls"],
             "ddim20_s_per_image": 20 * call,
             "stored_weights_mb": stored / 1e6, "neuron_state_mb": e["neuron_state_bytes"] / 1e6,
             "peak_above_baseline_one_call_mb": (e["hwm_one_call"] - baseline_hwm) / 1e6,
             "peak_above_baseline_generation_mb": (e["hwm_generation"] - baseline_hwm) / 1e6,
             "rss_marks_mb": {k: v / 1e6 for k, v in e["rss_marks"].items() if k != "peak_reset"},
             "code_pages_mb": (e["rss_file"]["after_generation"] - e["rss_file"]["imports"]) / 1e6}
        x["ratio_one_call"] = (e["hwm_one_call"] - baseline_hwm) / denom
        x["load_peak_above_baseline_mb"] = (e["rss_marks"]["load_peak"] - baseline_hwm) / 1e6
        x["ratio_load_peak"] = (e["rss_marks"]["load_peak"] - baseline_hwm) / denom
        x["ratio_generation"] = (e["hwm_generation"] - baseline_hwm) / denom
        if params:
            x["ratio_generation_vs_float32_params_plus_state"] = \
                (e["hwm_generation"] - baseline_hwm) / (params * 4 + e["neuron_state_bytes"])
        pc = e["per_call"]
        x["per_call"] = pc
        x["dense_ops_per_call"] = e["dense_ops_per_call"]
        x["event_work_per_call"] = pc["synops"] + pc["graded_ops"] + pc["macs"]
        if engine == "torch":
            x["s_per_dense_op"] = call / e["dense_ops_per_call"]
        else:
            x["s_per_event_op"] = call / x["event_work_per_call"]
            x["forced"] = e["forced"]
            pts = {p["rate"]: p for p in e["forced"]["points"]}
            x["fixed_s_zero_activity"] = pts[0.0]["seconds"]
            x["s_per_synop_real_activity"] = (pts[None]["seconds"] - pts[0.0]["seconds"]) / pts[None]["event_ops"]
            x["layers"] = e["layers"]
            x["energy"] = e["energy"]
            x["activity"] = pc["spikes_out"] / pc["neuron_updates"] if pc["neuron_updates"] else None
            kr = e["kernels"]
            ops, ev_s = sum(k["synops"] for k in kr), sum(k["event_s"] for k in kr)
            dense_ops = sum(k["dense_ops"] for k in kr)
            x["kernel"] = {"layers": len(kr), "synops": ops, "event_s": ev_s, "event_s_per_synop": ev_s / ops,
                           "dense_ops": dense_ops, **{f"dense_{dt}_s_per_op": sum(k[f"dense_{dt}_s"] for k in kr)
                                                      / dense_ops for dt in ("float64", "float32")}}
            for dt in ("float64", "float32"):
                x["kernel"][f"ratio_{dt}"] = x["kernel"]["event_s_per_synop"] / x["kernel"][f"dense_{dt}_s_per_op"]
            x["kernels"] = kr
        d[f"engine_{engine}"] = x
    if "engine_torch" in d and "engine_event" in d:
        ev, to = d["engine_event"], d["engine_torch"]
        d["event_s_per_op_over_dense_s_per_op"] = ev["s_per_event_op"] / to["s_per_dense_op"]
        d["event_marginal_s_per_op_over_dense_s_per_op"] = ev["forced"]["fit"]["b_s_per_op"] / to["s_per_dense_op"]
        d["event_real_s_per_synop_over_dense_s_per_op"] = ev["s_per_synop_real_activity"] / to["s_per_dense_op"]
    return {"raw": res, "derived": d}


def tables(results: dict) -> str:
    out = []
    rows = []
    for name, r in results.items():
        d = r["derived"]
        for key, label in (("export_float", "float32"), ("export_int8", "int8")):
            e = d.get(key)
            if e is None:
                rows.append([name, label, "failed", "", "", "", ""])
                continue
            rows.append([name, label, f"{e['seconds']:.1f}", f"{e['file_mb']:.1f}",
                         f"{e.get('file_over_float32_weights', float('nan')):.2f}", f"{e['peak_rss_gb']:.2f}",
                         f"{e['calibration_s']:.1f} s, {e['calibration_peak_rss_gb']:.2f} GB"
                         if "calibration_s" in e else ""])
    out.append(markdown_table(["model", "export", "s", "MB", "x f32 weights", "peak RSS GB",
                               "calibration (time, peak RSS)"], rows))
    rows = []
    for name, r in results.items():
        d = r["derived"]
        for engine in ("torch", "event"):
            e = d.get(f"engine_{engine}")
            if e is None:
                rows.append([name, engine, "failed", "", "", "", "", ""])
                continue
            rows.append([name, engine, f"{e['stored_weights_mb']:.1f}", f"{e['neuron_state_mb']:.1f}",
                         f"{e['load_peak_above_baseline_mb']:.0f}", f"{e['ratio_load_peak']:.2f}",
                         f"{e['peak_above_baseline_one_call_mb']:.0f}", f"{e['ratio_one_call']:.2f}",
                         f"{e['peak_above_baseline_generation_mb']:.0f}", f"{e['ratio_generation']:.2f}",
                         f"{e.get('ratio_generation_vs_float32_params_plus_state', float('nan')):.2f}",
                         f"{e['code_pages_mb']:.0f}"])
    calls = "/".join(str(r["raw"]["steps"]) for r in results.values())
    out.append(markdown_table(["model", "engine (int8)", "weights + tables MB (as held)", "state MB",
                               "load peak MB", "ratio", "run peak MB, 1 call", "ratio",
                               f"run peak MB, {calls} calls",
                               "ratio", "ratio vs f32 params + state", "of which code pages MB"], rows))
    rows = []
    for name, r in results.items():
        d = r["derived"]
        ev, to, gp = d.get("engine_event"), d.get("engine_torch"), d.get("gpu_path")
        if not (ev and to):
            continue
        rows.append([name, f"{gp['call_s_median']:.2f}" if gp else "-", f"{to['call_s_median']:.2f}",
                     f"{ev['call_s_median']:.2f}", f"{to['s_per_dense_op'] * 1e9:.3f}",
                     f"{ev['s_per_event_op'] * 1e9:.3f}", f"{d['event_s_per_op_over_dense_s_per_op']:.2f}",
                     f"{ev['fixed_s_zero_activity'] * 1e3:.0f}",
                     f"{ev['s_per_synop_real_activity'] * 1e9:.3f}",
                     f"{d['event_real_s_per_synop_over_dense_s_per_op']:.2f}",
                     f"{d['event_marginal_s_per_op_over_dense_s_per_op']:.2f}",
                     f"{ev['kernel']['event_s_per_synop'] * 1e9:.3f}",
                     f"{ev['kernel']['dense_float64_s_per_op'] * 1e9:.3f}", f"{ev['kernel']['ratio_float64']:.2f}",
                     f"{ev['kernel']['ratio_float32']:.2f}", f"{ev['activity']:.3f}"])
    out.append(markdown_table(["model", "GPU path s/call", "torch eng s/call", "event eng s/call", "dense ns/op",
                               "event ns/op (whole call)", "ratio", "event fixed ms/call (no spikes)",
                               "event ns/synop (call - fixed)", "ratio (target 4x)", "marginal ratio (fit)",
                               "kernel ns/synop", "conv2d f64 ns/op", "kernel ratio f64", "kernel ratio f32",
                               "firing rate"], rows))
    rows = []
    for name, r in results.items():
        d = r["derived"]
        rows.append([name] + [f"{d[k]['ddim20_s_per_image']:.1f}" if k in d else "-"
                              for k in ("gpu_path", "engine_torch", "engine_event")])
    out.append("time per image at DDIM 20 (paper-cifar10: 20 x the median call of the run, scaled):\n\n"
               + markdown_table(["model", "GPU path s", "torch engine s", "event engine s"], rows))
    for name, r in results.items():
        ev = r["derived"].get("engine_event")
        if not ev:
            continue
        rows = [[p, f"{v['per_image_mj']:.4g}", f"{v['per_call_per_image_uj'] / 1e3:.4g}",
                 f"{v['vs_ann_fp32']:.3g}" if v.get("vs_ann_fp32") is not None else "-"]
                for p, v in ev["energy"]["summary"].items()]
        for b, v in ev["energy"]["ann_baseline"].items():
            rows.append([f"ANN {b}", f"{v['pj_per_image'] * 1e-9:.4g}", f"{v['pj_per_call'] * 1e-9:.4g}", "1"
                         if b == "cmos45-fp32" else "-"])
        out.append(f"{name}: energy of the int8 export on the event engine ({ev['calls']} DDIM calls, 1 image)\n\n"
                   + markdown_table(["profile", f"mJ / image ({ev['calls']} calls)", "mJ / call", "SNN / ANN fp32"],
                                    rows))
    for name, r in results.items():
        ev = r["derived"].get("engine_event")
        if not ev:
            continue
        rows = [[x["layer"], x["kind"], f"{x['rate']:.4f}" if x.get("rate") is not None else "",
                 f"{x['events_in']:,}" if x.get("events_in") else "",
                 f"{(x.get('synops') or 0) + (x.get('graded_ops') or 0):,}" if x.get("synops") or x.get("graded_ops")
                 else "", f"{x['macs']:,}" if x.get("macs") else ""]
                for x in ev["layers"] if x["kind"] in ("if", "conv")]
        out.append(f"{name}: per layer, event engine, int8, {ev['calls']} DDIM calls, 1 image (firing rate = spikes / "
                   "neuron updates; synops = events x fan-out, graded ops included; macs: convs on analog input)\n\n"
                   + markdown_table(["layer", "kind", "firing rate", "events in", "synops", "macs"], rows))
    return "\n\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="paper-cifar10,tiny")
    ap.add_argument("--steps", type=int, default=3, help="DDIM calls for paper-cifar10 (tiny: 20)")
    ap.add_argument("--calibration-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and the exports go (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "deep_model.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps(CHILDREN[kind](json.loads(spec))))
        return 0
    info = machine_info()
    info["uptime_start"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    log("bare-import baseline")
    base = run_child("baseline", {})
    results = {}
    for name in args.models.split(","):
        ckpt = TINY if name == "tiny" else make_paper_checkpoint(work)
        results[name] = measure(name, ckpt, work, args, base["hwm"])
    info["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    info["load_average_end"] = load_average()
    text = tables(results)
    write_json_atomic(args.out, {"machine": info, "settings": vars(args) | {"child": None},
                                 "baseline_import_peak_rss_bytes": base["hwm"], "imports": IMPORTS,
                                 "results": results})
    footer = (f"baseline (imports only): {base['hwm'] / 1e6:.0f} MB peak RSS; {machine_line(info)}; "
              f"{info['uptime_start']} -> {info['uptime_end']}")
    print(text + "\n\n" + footer)
    md = Path(args.out).with_suffix(".md")
    tmp_md = md.with_name(md.name + f".{os.getpid()}.tmp")
    tmp_md.write_text(f"# `deep_model.py` ({info['timestamp_utc']})\n\n{text}\n\n{footer}\n")
    os.replace(tmp_md, md)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
