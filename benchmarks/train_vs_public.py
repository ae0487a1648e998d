"""One training step of neurosdm's spiking UNet against the public SDM code's ``Spk_UNet_TSM``, same process.

The public model is imported from a local checkout that the user provides (``--public-repo PATH``: a clone of
github.com/AndyCao1125/SDM; ``PATH/SDM/TSM.py`` or ``PATH/TSM.py``); nothing of it is committed or vendored
here. It needs spikingjelly (the public code's neurons: multi-step ``IFNode`` with the ATan surrogate).

For each shape both models get the same configuration (TSM on, the SDM analog head, 4 spiking steps):

* ``tiny``:   ch 16, ch_mult [1, 2],       1 res block,  1x28x28, batch 64
* ``larger``: ch 32, ch_mult [1, 2, 2],    2 res blocks, 3x32x32, batch 64
* ``paper-cifar10``: ch 128, ch_mult [1, 2, 2, 4], 2 res blocks, 3x32x32 (the papers' CIFAR-10 UNet), batch 8

Checks before timing: the public model is built first, neurosdm's model loads its state dict (the SDM layout
through :func:`neurosdm.checkpoint.normalise_sdm_keys`), the parameter counts must be equal and both must give
the same output (training-mode forward, the one that is timed) on one batch. That check runs in float64: in
float32 the two differ by roundings (the memory layouts sum in different orders), and a membrane within ~1e-6
of the threshold then fires in one and not the other, which changes the output by O(1) downstream; the float32
difference is reported beside it. The script stops when the float64 difference exceeds ``--tol``.

Timed step, the same for both: forward of ``x_t`` (the same batch, ``t`` and noise for everybody at every step),
epsilon-MSE, ``zero_grad``, backward, Adam (each code's own: ``torch.optim.Adam`` for the public code as its
training scripts build it (ANN2SNN/ANN_train.py), :func:`neurosdm.train.adam`, torch's fused Adam, for neurosdm).
The public step also calls spikingjelly's ``functional.reset_net`` (its neurons keep state between calls; its
training loop resets them). neurosdm runs float32 and bfloat16 autocast (``torch.autocast``, as ``neurosdm train
--bf16``); the public code float32. ``--heap retain`` (the default) sets malloc to keep freed memory
(:mod:`neurosdm.heap`, as every ``neurosdm`` command does) for the whole process, so for both implementations;
``--heap default`` leaves glibc's defaults (then every large activation is page-faulted in at every step, which
slows both).
The implementations are interleaved step by step (the order rotates) so that load from other processes hits
all alike; headline numbers are medians and ratios ``public / neurosdm``.

The bound: every convolution of neurosdm's step is recorded (input shape, memory format, dtype, weight,
stride, padding), and the same convolutions alone (forward, then backward for the input where the step needs
it and for the weight and bias) are timed in the same rotation. ``public / convs`` is the largest speed-up any
implementation with these dense convolutions could reach; ``neurosdm / convs`` says how close neurosdm is.

After timing, one step of each is profiled with torch.profiler; the per-operator tables (self time, calls) go
to the JSON and the top rows to the report.

``--device cuda`` runs everything on the GPU (synchronising around each timed step; bf16 autocast on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neurosdm.heap import retain_freed_memory
from neurosdm.train import adam

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS_DIR,
    contention_note,
    load_average,
    log,
    machine_info,
    machine_line,
    markdown_table,
    summarize_ms,
    write_json_atomic,
)

SHAPES = {
    "tiny": dict(img_ch=1, image_size=28, ch=16, ch_mult=(1, 2), num_res_blocks=1, batch=64),
    "larger": dict(img_ch=3, image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, batch=64),
    "paper-cifar10": dict(img_ch=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, batch=8),
}
NUM_STEPS = 4
IMPLS = ("public", "neurosdm_fp32", "neurosdm_bf16", "convs_fp32", "convs_bf16")


def import_public(repo: Path):
    """``Spk_UNet_TSM`` and spikingjelly's ``functional`` from the user's checkout of the public SDM code."""
    for cand in (repo / "SDM" / "TSM.py", repo / "TSM.py"):
        if cand.is_file():
            spec = importlib.util.spec_from_file_location("sdm_public_tsm", cand)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.Spk_UNet_TSM, module.functional, cand
    raise SystemExit(f"--public-repo {repo}: no SDM/TSM.py or TSM.py there; pass a checkout of "
                     f"github.com/AndyCao1125/SDM")


def build_models(Spk_UNet_TSM, shape: dict, seed: int, device: torch.device):
    """The public model (seeded init) and neurosdm's model with the public weights; parameter counts checked."""
    from neurosdm.checkpoint import normalise_sdm_keys
    from neurosdm.config import ModelConfig
    from neurosdm.models import SpikingUNet, count_parameters

    torch.manual_seed(seed)
    public = Spk_UNet_TSM(T=1000, ch=shape["ch"], ch_mult=list(shape["ch_mult"]), attn=[], dropout=0.1,
                          num_res_blocks=shape["num_res_blocks"], timestep=NUM_STEPS, img_ch=shape["img_ch"],
                          global_thres=1.0)
    cfg = ModelConfig(img_ch=shape["img_ch"], image_size=shape["image_size"], ch=shape["ch"],
                      ch_mult=shape["ch_mult"], num_res_blocks=shape["num_res_blocks"], num_steps=NUM_STEPS,
                      tsm=True, head="sdm")
    ours = SpikingUNet(cfg)
    ours.load_state_dict(normalise_sdm_keys(public.state_dict()), strict=True)
    n_pub, n_ours = count_parameters(public), count_parameters(ours)
    if n_pub != n_ours:
        raise SystemExit(f"parameter counts differ: public {n_pub:,}, neurosdm {n_ours:,}")
    return public.to(device).train(), ours.to(device).train(), n_ours


def make_batches(shape: dict, n: int, seed: int, device: torch.device):
    """``n`` training batches ``(x_t, t, noise)`` as the epsilon-MSE objective draws them (linear betas)."""
    g = torch.Generator().manual_seed(seed)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    out = []
    for _ in range(n):
        size = (shape["batch"], shape["img_ch"], shape["image_size"], shape["image_size"])
        x_0 = torch.rand(size, generator=g) * 2 - 1
        t = torch.randint(0, 1000, (size[0],), generator=g)
        noise = torch.randn(size, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        out.append(((a.sqrt() * x_0 + (1 - a).sqrt() * noise).to(device), t.to(device), noise.to(device)))
    return out


def check_outputs(public, ours, reset_net, batch, tol: float) -> dict:
    """Training-mode forward (the one that is timed) of both on one batch, in float64 (float32 roundings that
    differ with the memory layout move a membrane that sits within ~1e-6 of the threshold to the other side, and a
    flipped spike changes the output by O(1) from there on), on copies (BN statistics untouched). Also reports the
    float32 difference."""
    x_t, t = batch[0][:8], batch[1][:8]  # eight images: the float64 copies of the larger models stay small
    out = {"images": len(t)}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        a_model, b_model = copy.deepcopy(public).to(dtype), copy.deepcopy(ours).to(dtype)
        with torch.no_grad():
            reset_net(a_model)
            a = a_model(x_t.to(dtype), t)
            b = b_model(x_t.to(dtype), t)
        out[f"max_abs_diff_{name}"] = float((a - b).abs().max())
        out["max_abs_output"] = float(a.abs().max())
    out["tol"] = tol
    diff, scale = out["max_abs_diff_float64"], out["max_abs_output"]
    if not diff <= tol * max(1.0, scale):
        raise SystemExit(f"outputs differ: max |public - neurosdm| = {diff:.3g} in float64 (|output| up to "
                         f"{scale:.3g}); tolerance {tol}")
    return out


def make_step(model, reset_net, device: torch.device, bf16: bool, optimizer=torch.optim.Adam):
    opt = optimizer(model.parameters(), lr=1e-4)

    def step(batch):
        x_t, t, noise = batch
        if reset_net is not None:
            reset_net(model)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps = model(x_t, t)
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


class _ConvRecorder(torch.overrides.TorchFunctionMode):
    """Records every 2-D convolution called while active (input shape, strides, whether it needs a gradient,
    weight shape, stride, padding)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            a = dict(zip(names, args)) | kwargs
            x, w = a["input"], a["weight"]
            self.calls.append({"x_shape": tuple(x.shape), "x_stride": tuple(x.stride()),
                               "input_grad": bool(x.requires_grad), "weight_shape": tuple(w.shape),
                               "stride": a.get("stride", 1), "padding": a.get("padding", 0)})
        return func(*args, **kwargs)


def record_convs(model, batch, device: torch.device) -> list[dict]:
    """The 2-D convolutions one training-mode forward of ``model`` runs, as the conv kernel sees them."""
    x_t, t, _ = batch
    rec = _ConvRecorder()
    with rec, torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
        model(x_t, t)
    return rec.calls


def make_conv_step(calls: list[dict], device: torch.device, bf16: bool, seed: int):
    """Forward + backward of the recorded convolutions alone, on random inputs with the recorded layouts."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for c in calls:
        dtype = torch.bfloat16 if bf16 else torch.float32
        x = torch.empty_strided(c["x_shape"], c["x_stride"], dtype=dtype)
        x.copy_(torch.rand(c["x_shape"], generator=g).round())  # spikes, or analog input: timing only
        x = x.to(device).requires_grad_(c["input_grad"])
        w = (torch.randn(c["weight_shape"], generator=g) * 0.1).to(device, dtype).requires_grad_()
        b = torch.zeros(c["weight_shape"][0], device=device, dtype=dtype, requires_grad=True)
        jobs.append((x, w, b, c["stride"], c["padding"]))

    def step(_batch=None):
        for x, w, b, stride, padding in jobs:
            y = F.conv2d(x, w, b, stride, padding)
            y.backward(torch.ones_like(y))
        return 0.0

    return step


def timed(fn, batch, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile_step(fn, batch, device: torch.device, rows: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    table = [{"name": e.key, "self_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total if total else 0,
              "calls": e.count} for e in events]
    conv = sum(r["self_ms"] for r in table if "conv" in r["name"].lower() and "backward" not in r["name"].lower()
               or r["name"] == "aten::convolution_backward")
    return {"time_key": key, "total_self_ms": total / 1000, "conv_self_ms": conv, "ops": table[:rows],
            "ops_left_out": max(0, len(table) - rows)}


def bench_shape(name: str, args, Spk_UNet_TSM, reset_net, device: torch.device) -> dict:
    shape = dict(SHAPES[name])
    if args.batch_size:
        shape["batch"] = args.batch_size
    elif name == "paper-cifar10" and args.paper_batch:
        shape["batch"] = args.paper_batch
    public, ours, params = build_models(Spk_UNet_TSM, shape, args.seed, device)
    batches = make_batches(shape, 4, args.seed + 1, device)
    parity = check_outputs(public, ours, reset_net, batches[0], args.tol)
    log(f"  {name}: {params:,} parameters each; outputs agree: max |diff| {parity['max_abs_diff_float64']:.2e} "
        f"(float64), {parity['max_abs_diff_float32']:.2e} (float32)")
    ours_bf16 = copy.deepcopy(ours)
    steps = {"public": make_step(public, reset_net, device, False),
             "neurosdm_fp32": make_step(ours, None, device, False, adam),
             "neurosdm_bf16": make_step(ours_bf16, None, device, True, adam)}
    conv_calls = record_convs(copy.deepcopy(ours), batches[0], device)
    for dt in ("fp32", "bf16"):
        steps[f"convs_{dt}"] = make_conv_step(conv_calls, device, dt == "bf16", args.seed)
    impls = [i for i in IMPLS if i in steps and (i.split("_")[-1] in args.dtypes or i == "public")]

    first_s, losses = {}, {i: [] for i in impls}
    for i in impls:
        first_s[i] = timed(steps[i], batches[0], device)
        log(f"    {i}: first step {first_s[i]:.1f} s")
    for k in range(args.warmup):
        for i in impls:
            losses[i].append(steps[i](batches[k % len(batches)]))
    samples = {i: [] for i in impls}
    for k in range(args.iters):
        order = impls[k % len(impls):] + impls[:k % len(impls)]
        for i in order:
            samples[i].append(timed(steps[i], batches[k % len(batches)], device))
        log(f"    iter {k + 1}/{args.iters}: " + ", ".join(f"{i} {samples[i][-1]:.2f} s" for i in impls))

    per_impl = {i: summarize_ms(samples[i]) | {"first_step_s": first_s[i]} for i in impls}
    med = {i: per_impl[i]["median_ms"] for i in impls}
    ratios = {}
    for dt in ("fp32", "bf16"):
        if f"neurosdm_{dt}" in med:
            ratios[f"public_over_neurosdm_{dt}"] = med["public"] / med[f"neurosdm_{dt}"]
            # paired ratios (same rotation round): less sensitive to load drifting during the run
            ratios[f"paired_median_public_over_neurosdm_{dt}"] = statistics.median(
                p / q for p, q in zip(samples["public"], samples[f"neurosdm_{dt}"]))
        if f"convs_{dt}" in med:
            ratios[f"public_over_convs_{dt}"] = med["public"] / med[f"convs_{dt}"]
            if f"neurosdm_{dt}" in med:
                ratios[f"neurosdm_{dt}_over_convs_{dt}"] = med[f"neurosdm_{dt}"] / med[f"convs_{dt}"]
    profiles = {}
    if args.profile_rows:
        for i in ("public", "neurosdm_fp32", "neurosdm_bf16"):
            if i in steps and i in impls:
                profiles[i] = profile_step(steps[i], batches[0], device, args.profile_rows)
    return {
        "shape": name,
        "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in shape.items()} | {"num_steps": NUM_STEPS,
                                                                                          "tsm": True},
        "parameters": params,
        "parity": parity,
        "conv_calls": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for c in conv_calls],
        "per_impl": per_impl,
        "ratios": ratios,
        "profiles": profiles,
    }


def render(results: list[dict]) -> str:
    headers = ["shape", "params", "batch", "public ms", "neurosdm fp32 ms", "bf16 ms", "convs fp32 ms",
               "convs bf16 ms", "fp32 speed-up", "bf16 speed-up", "bound fp32", "bound bf16"]
    rows = []
    for r in results:
        m, rt = r["per_impl"], r["ratios"]

        def ms(i):
            return f"{m[i]['median_ms']:.0f}" if i in m else "-"

        def x(k):
            return f"{rt[k]:.2f}x" if k in rt else "-"

        rows.append([r["shape"], f"{r['parameters'] / 1e6:.2f}M", str(r["model"]["batch"]), ms("public"),
                     ms("neurosdm_fp32"), ms("neurosdm_bf16"), ms("convs_fp32"), ms("convs_bf16"),
                     x("public_over_neurosdm_fp32"), x("public_over_neurosdm_bf16"), x("public_over_convs_fp32"),
                     x("public_over_convs_bf16")])
    return markdown_table(headers, rows)


def render_profiles(results: list[dict], rows: int) -> str:
    out = []
    for r in results:
        for impl, p in r["profiles"].items():
            out.append(f"\n{r['shape']} / {impl}: {p['total_self_ms']:.0f} ms self time, convolutions "
                       f"{p['conv_self_ms']:.0f} ms ({p['conv_self_ms'] / p['total_self_ms']:.0%})\n")
            out.append(markdown_table(["op", "self ms", "share", "calls"],
                                      [[o["name"][:60], f"{o['self_ms']:.1f}", f"{o['share']:.1%}", str(o["calls"])]
                                       for o in p["ops"][:rows]]))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Training step (forward, epsilon-MSE, backward, Adam) of neurosdm against the public SDM "
                    "Spk_UNet_TSM, same configuration and batch, interleaved in one process, plus the step's "
                    "convolutions alone. Prints Markdown tables and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--public-repo", type=Path, required=True,
                    help="local checkout of github.com/AndyCao1125/SDM (its SDM/TSM.py is imported)")
    ap.add_argument("--shapes", default="tiny,larger,paper-cifar10", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--batch-size", type=int, default=None, help="one batch size for every shape")
    ap.add_argument("--paper-batch", type=int, default=None, help="batch size of paper-cifar10 (default 8)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="neurosdm precisions (the public code runs fp32)")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per implementation (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first one")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch chooses")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest float64 output difference accepted "
                                                            "(relative to max(1, |output|))")
    ap.add_argument("--profile-rows", type=int, default=15, help="operators kept per profile (0: no profile)")
    ap.add_argument("--heap", choices=("retain", "default"), default="retain",
                    help="retain: malloc keeps freed memory (neurosdm.heap, as every neurosdm command sets it), "
                         "for the whole process, so for both implementations; default: glibc's defaults (large "
                         "blocks mmap'd and unmapped at every allocation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "train_vs_public.json", help="JSON output path")
    args = ap.parse_args(argv)

    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not names or any(n not in SHAPES for n in names):
        ap.error(f"--shapes: choose from {', '.join(SHAPES)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not set(args.dtypes) <= {"fp32", "bf16"}:
        ap.error("--dtypes: choose from fp32, bf16")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = "retain" if args.heap == "retain" and retain_freed_memory() else "default"
    if heap != args.heap:
        log("--heap retain: not available here (glibc on Linux only); glibc's defaults")
    Spk_UNet_TSM, sj_functional, source = import_public(args.public_repo)

    note = contention_note(torch.get_num_threads())
    info = machine_info() | {"contention_note": note, "device": str(device), "heap": heap}
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    log(f"train_vs_public: {names} on {device}; {machine_line(info)}")
    if note:
        log(note)
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(bench_shape(name, args, Spk_UNet_TSM, sj_functional.reset_net, device))
        log(f"  {name}: {time.perf_counter() - t0:.0f} s")
    info["load_average_at_end_1_5_15_min"] = load_average()
    report = {
        "benchmark": "train_vs_public",
        "what": "one training step (forward, epsilon-MSE, backward, Adam) of neurosdm's SpikingUNet (TSM) against "
                "the public SDM Spk_UNet_TSM (spikingjelly IFNode), same weights, batch and configuration, "
                "interleaved; convs_* = the step's convolutions alone (forward + backward), the bound",
        "public_source": str(source),
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    text = (render(results) + "\n\nmedian ms per step; speed-up = public / neurosdm; bound = public / convs (the "
            "step's convolutions alone: the largest speed-up possible with these dense convolutions); heap: "
            + ("retain (malloc reuses freed memory, neurosdm.heap; the whole process, both implementations)\n"
               if heap == "retain" else "glibc's defaults (both implementations)\n")
            + machine_line(info) + f", at the end {info['load_average_at_end_1_5_15_min']}\n")
    if args.profile_rows:
        text += render_profiles(results, min(args.profile_rows, 12)) + "\n"
    print(text, end="")
    write_json_atomic(args.out, report)
    md = args.out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(md)
    log(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
