"""Forward+backward time of neurosdm's multi-step IF layer against spikingjelly's multi-step IFNode, same process.

For each input shape ``[num_steps, B, C, H, W]`` it times ``y = layer(x); y.sum().backward()`` (``x`` a leaf that
requires grad) for:

* ``neurosdm``        ``neurosdm.neurons.SpikingNeurons()`` (IF, threshold 1, hard reset, ATan alpha 2), with its
                      neuron kernels compiled by torch.compile (the default);
* ``functional``      ``neurosdm.neurons.multistep_neuron(x, 1.0)``, the function the module wraps;
* ``eager``           the same module with ``NEUROSDM_COMPILE=0`` set around the forward *and* backward (neurosdm
                      reads the variable at every call), i.e. its kernels run eagerly: the compile speed-up is
                      ``eager / neurosdm``;
* ``spikingjelly``    ``IFNode(surrogate_function=surrogate.ATan(), step_mode='m')`` with
                      ``functional.reset_net`` before each call (inside the timed region: a user has to do it). On a
                      CPU tensor this is spikingjelly's torch implementation (spikingjelly 2.x has no ``backend=``
                      argument and picks its CPU torch kernels from the device; older versions get
                      ``backend='torch'``).

The implementations are interleaved (the order rotates every repeat) so that load from other processes hits all of
them alike; the headline is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones. The first call
of each implementation on each shape is timed separately: for neurosdm's very first call that is the torch.compile
time (about 30 s cold, a few seconds when the inductor cache in /tmp already has the kernels).

Before timing, each shape is checked for parity: spikes and input gradients (for a random upstream gradient, which
catches more than ``sum()``) of every neurosdm variant against spikingjelly; the maximum absolute differences are
reported, and the script exits with status 1 when any exceeds ``--tol`` (the table and the JSON are still written).

Run ``python benchmarks/if_layer.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

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

SHAPE_SETS: dict[str, list[tuple[int, ...]]] = {
    # a smoke test that runs in seconds
    "small": [(4, 8, 16, 28, 28), (4, 8, 32, 14, 14)],
    # UNet activations of the 28x28 presets (tiny/small) at batch 64
    "unet": [(4, 64, 16, 28, 28), (4, 64, 32, 14, 14), (4, 64, 64, 28, 28)],
    # the papers' CIFAR-10 UNet (ch 128, 32x32) at batch 32, and one at num_steps 8
    "paper": [(4, 32, 128, 32, 32), (4, 32, 256, 16, 16), (8, 32, 128, 32, 32)],
}
SHAPE_SETS["default"] = SHAPE_SETS["unet"] + SHAPE_SETS["paper"]

IMPLS = ("neurosdm", "functional", "eager", "spikingjelly")
REFERENCE = "spikingjelly"


def _preset_shapes(name: str, batch: int) -> list[tuple[int, ...]]:
    """The distinct input shapes of the IF layers in the neurosdm preset ``name``, read from the real model with
    forward pre-hooks (one eager no-grad forward at batch 1; the batch axis is then set to ``batch``)."""
    from neurosdm.config import preset
    from neurosdm.models import SpikingUNet
    from neurosdm.neurons import SpikingNeurons

    cfg = preset(name).model
    model = SpikingUNet(cfg).eval()
    shapes: list[tuple[int, ...]] = []

    def hook(_module, args):
        s = tuple(args[0].shape)
        s = (s[0], batch, *s[2:])
        if s not in shapes:
            shapes.append(s)

    for m in model.modules():
        if isinstance(m, SpikingNeurons):
            m.register_forward_pre_hook(hook)
    x = torch.zeros(1, cfg.img_ch, cfg.image_size, cfg.image_size)
    with torch.no_grad(), _env("NEUROSDM_COMPILE", "0"):
        model(x, torch.zeros(1, dtype=torch.long))
    return shapes


def parse_shapes(spec: str, batch: int) -> list[tuple[int, ...]]:
    """``small,paper``, ``preset:tiny`` or ``4x64x16x28x28`` (comma-separated, mixed freely)."""
    shapes: list[tuple[int, ...]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in SHAPE_SETS:
            new = SHAPE_SETS[part]
        elif part.startswith("preset:"):
            new = _preset_shapes(part.split(":", 1)[1], batch)
        else:
            try:
                new = [tuple(int(v) for v in part.lower().split("x"))]
            except ValueError:
                raise SystemExit(f"--shapes: {part!r} is neither a shape set ({', '.join(SHAPE_SETS)}), "
                                 f"preset:<name>, nor a shape like 4x64x16x28x28") from None
            if len(new[0]) < 2 or min(new[0]) < 1:
                raise SystemExit(f"--shapes: {part!r} must be num_steps x batch x ... with positive sizes")
        for s in new:
            if s not in shapes:
                shapes.append(s)
    if not shapes:
        raise SystemExit("--shapes selected no shape")
    return shapes


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _make_spikingjelly_node():
    from spikingjelly.activation_based import neuron, surrogate

    try:  # spikingjelly <= 0.0.0.0.14 chooses kernels with `backend`
        return neuron.IFNode(surrogate_function=surrogate.ATan(), step_mode="m", backend="torch"), "torch"
    except TypeError:  # 2.x: no `backend`; a CPU tensor runs its torch implementation
        return neuron.IFNode(surrogate_function=surrogate.ATan(), step_mode="m"), "auto (CPU torch kernels)"


def make_impls(selected: list[str]):
    """name -> (context factory, forward). The context wraps forward *and* backward: neurosdm's backward kernel
    reads NEUROSDM_COMPILE when it runs, not when the forward ran."""
    from spikingjelly.activation_based import functional as sj_functional

    from neurosdm.neurons import SpikingNeurons, multistep_neuron

    module = SpikingNeurons(threshold=1.0, decay=1.0, reset="hard", surrogate="atan", alpha=2.0)
    node, sj_backend = _make_spikingjelly_node()
    node.train()

    def sj_forward(x):
        sj_functional.reset_net(node)
        return node(x)

    def compiled():
        return _env("NEUROSDM_COMPILE", "1")

    def eager():
        return _env("NEUROSDM_COMPILE", "0")

    table = {
        "neurosdm": (compiled, module),
        "functional": (compiled, lambda x: multistep_neuron(x, 1.0)),
        "eager": (eager, module),
        "spikingjelly": (contextlib.nullcontext, sj_forward),
    }
    return {k: table[k] for k in selected}, sj_backend


def fwd_bwd(impl, x: torch.Tensor, grad: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """One timed call: forward, then backward of ``sum()`` (or of ``grad`` when given). Returns (seconds, spikes)."""
    ctx, fwd = impl
    x.grad = None
    t0 = time.perf_counter()
    with ctx():
        y = fwd(x)
        if grad is None:
            y.sum().backward()
        else:
            y.backward(grad)
    return time.perf_counter() - t0, y.detach()


def parity(impls, x, grad) -> tuple[dict, dict]:
    """First call of each implementation (timed: includes compilation) doubling as the parity check against
    spikingjelly. Returns (first-call seconds, {name: {max_abs_spike_diff, spike_mismatches, max_abs_grad_diff}})."""
    first_s, out = {}, {}
    ref_spikes = ref_grad = None
    order = [REFERENCE] + [n for n in impls if n != REFERENCE] if REFERENCE in impls else list(impls)
    for name in order:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first_s[name], spikes = fwd_bwd(impls[name], x, grad)
        for msg in dict.fromkeys(str(w.message) for w in caught if "neurosdm" in str(w.filename)):
            log(f"  warning from {name}: {msg}")
        g = x.grad.detach().clone()
        if name == REFERENCE:
            ref_spikes, ref_grad = spikes, g
            out[name] = {"spike_rate": float(spikes.mean())}
            continue
        if ref_spikes is None:
            continue
        out[name] = {
            "max_abs_spike_diff": float((spikes - ref_spikes).abs().max()),
            "spike_mismatches": int((spikes != ref_spikes).sum()),
            "max_abs_grad_diff": float((g - ref_grad).abs().max()),
            "spike_rate": float(spikes.mean()),
        }
        del spikes, g
    x.grad = None
    return first_s, out


def bench_shape(shape, impls, repeats: int, warmup: int, tol: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    grad = torch.randn(shape, generator=gen)
    first_s, par = parity(impls, x, grad)
    del grad
    names = list(impls)
    for _ in range(warmup):
        for name in names:
            fwd_bwd(impls[name], x)
    samples = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order every repeat
            samples[name].append(fwd_bwd(impls[name], x)[0])
    x.grad = None
    times = {n: summarize_ms(s) | {"first_call_ms": 1000.0 * first_s[n]} for n, s in samples.items()}
    med = {n: t["median_ms"] for n, t in times.items()}
    ratios = {}
    if "spikingjelly" in med and "neurosdm" in med:
        ratios["spikingjelly_over_neurosdm"] = med["spikingjelly"] / med["neurosdm"]
    if "eager" in med and "neurosdm" in med:
        ratios["eager_over_neurosdm"] = med["eager"] / med["neurosdm"]
    if "spikingjelly" in med and "eager" in med:
        ratios["spikingjelly_over_eager"] = med["spikingjelly"] / med["eager"]
    checked = {n: p for n, p in par.items() if n != REFERENCE and "max_abs_grad_diff" in p}
    ok = all(p["max_abs_spike_diff"] <= tol and p["max_abs_grad_diff"] <= tol for p in checked.values())
    return {
        "shape": list(shape),
        "elements": x.numel(),
        "times": times,
        "ratios": ratios,
        "parity": {"reference": REFERENCE if checked else None, "tol": tol, "ok": ok if checked else None,
                   "per_impl": par},
    }


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def render(results: list[dict], names: list[str]) -> str:
    headers = ["shape [T,B,C,H,W]"] + [f"{n} ms" for n in names]
    if "spikingjelly" in names and "neurosdm" in names:
        headers.append("sj/neurosdm")
    if "eager" in names and "neurosdm" in names:
        headers.append("eager/neurosdm")
    has_ref = REFERENCE in names and len(names) > 1
    if has_ref:
        headers += ["max|dspike|", "max|dgrad|", "parity"]
    rows = []
    for r in results:
        row = ["x".join(map(str, r["shape"]))] + [_fmt(r["times"][n]["median_ms"]) for n in names]
        if "spikingjelly_over_neurosdm" in r["ratios"]:
            row.append(_fmt(r["ratios"]["spikingjelly_over_neurosdm"], ".2f") + "x")
        if "eager_over_neurosdm" in r["ratios"]:
            row.append(_fmt(r["ratios"]["eager_over_neurosdm"], ".2f") + "x")
        if has_ref:
            per = [p for n, p in r["parity"]["per_impl"].items() if n != REFERENCE]
            row.append(_fmt(max(p["max_abs_spike_diff"] for p in per), ".1e"))
            row.append(_fmt(max(p["max_abs_grad_diff"] for p in per), ".1e"))
            row.append("ok" if r["parity"]["ok"] else "DIFFERS")
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Forward+backward time of neurosdm's multi-step IF layer (compiled, functional, eager) against "
                    "spikingjelly's multi-step IFNode in the same process, with a spike/gradient parity check. "
                    "Prints a Markdown table (medians in ms) and writes JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", default="default",
                    help="comma-separated: shape sets " + "; ".join(f"{k}={['x'.join(map(str, s)) for s in v]}"
                                                                    for k, v in SHAPE_SETS.items())
                    + "; preset:<name> (the IF-layer input shapes of that neurosdm preset's UNet at --batch); "
                      "or explicit shapes like 4x64x16x28x28")
    ap.add_argument("--batch", type=int, default=64, help="batch size used by preset:<name> shapes")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and shape (median)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls per implementation and shape after the first (compiling) call")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--tol", type=float, default=1e-5, help="parity tolerance on spikes and gradients")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset: torch chooses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "if_layer.json", help="JSON output path")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    unknown = [n for n in names if n not in IMPLS]
    if unknown or not names:
        ap.error(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes, args.batch)

    note = contention_note(torch.get_num_threads())
    info = machine_info()
    info["contention_note"] = note
    impls, sj_backend = make_impls(names)
    log(f"if_layer: {len(shapes)} shapes x {names}, {args.warmup} warm-up + {args.repeats} timed calls each; "
        f"{machine_line(info)}")
    if note:
        log(note)

    results = []
    for i, shape in enumerate(shapes):
        t0 = time.perf_counter()
        r = bench_shape(shape, impls, args.repeats, args.warmup, args.tol, args.seed + i)
        results.append(r)
        med = ", ".join(f"{n} {r['times'][n]['median_ms']:.1f}" for n in names)
        log(f"  {'x'.join(map(str, shape))}: {med} ms (median); first calls "
            + ", ".join(f"{n} {r['times'][n]['first_call_ms'] / 1000:.2f} s" for n in names)
            + f"; parity {r['parity']['ok']}; {time.perf_counter() - t0:.0f} s")

    # neurosdm's compile cost: its first call on the first shape, less a steady-state call
    compile_info = None
    if "neurosdm" in names or "functional" in names:
        first = "neurosdm" if "neurosdm" in names else "functional"
        t = results[0]["times"][first]
        from neurosdm.neurons import functional as nf

        compiled = getattr(nf, "_COMPILED", {})
        compile_info = {
            "first_call_s": t["first_call_ms"] / 1000,
            "compile_overhead_s": (t["first_call_ms"] - t["median_ms"]) / 1000,
            "measured_on_shape": results[0]["shape"],
            "kernels_compiled": {k: v is not None for k, v in compiled.items()} if isinstance(compiled, dict)
            else None,
            "note": "includes torch.compile of the neuron kernels (or loading them from the inductor cache)",
        }
    info["load_average_at_end_1_5_15_min"] = load_average()

    all_ok = [r["parity"]["ok"] for r in results if r["parity"]["ok"] is not None]
    report = {
        "benchmark": "if_layer",
        "what": "forward + sum().backward() of a multi-step IF layer, median of repeats, ms",
        "machine": info,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "impls": names, "tol": args.tol,
                     "seed": args.seed, "input": "x ~ N(0,1), threshold 1, hard reset, ATan(alpha=2)",
                     "spikingjelly_backend": sj_backend,
                     "eager_method": "NEUROSDM_COMPILE=0 set in-process around forward and backward"},
        "neurosdm_compile": compile_info,
        "parity_ok": all(all_ok) if all_ok else None,
        "results": results,
    }
    path = write_json_atomic(args.out, report)

    print(render(results, names))
    print()
    if compile_info:
        print(f"neurosdm first call (torch.compile or inductor-cache load, excluded above): "
              f"{compile_info['first_call_s']:.1f} s on {'x'.join(map(str, compile_info['measured_on_shape']))}")
        if compile_info["kernels_compiled"] and not all(compile_info["kernels_compiled"].values()):
            print("WARNING: torch.compile failed for some neuron kernels; the 'neurosdm' column ran them eagerly")
    print(machine_line(info))
    if note:
        print(note)
    print(f"JSON: {path}")
    if all_ok and not all(all_ok):
        bad = ["x".join(map(str, r["shape"])) for r in results if r["parity"]["ok"] is False]
        print(f"PARITY FAILURE: neurosdm and spikingjelly differ by more than {args.tol} on {', '.join(bad)} "
              f"(see max|dspike| / max|dgrad| and the JSON)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
