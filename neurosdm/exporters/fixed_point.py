"""Post-training quantisation of an exported NIR denoiser to Loihi-style fixed point (``--quantize int8``).

``quantize_graph(graph, metadata, calibration)`` turns the float graph of :func:`neurosdm.exporters.nir.to_nir_graph`
into the integer model it stands for. The quantised file is still plain core NIR; every value it holds is an
integer in one unit, so a float reader that runs it gets the integer arithmetic wherever no rounding is needed, and
:class:`neurosdm.graph.dialect.FixedPoint` (from ``metadata["quant"]``) gives it exactly; the host's input encoding
is :func:`neurosdm.graph.dialect.quantize_input` and the rule written in the metadata
:data:`neurosdm.graph.dialect.UNITS_RULE`.

Fixed-point model (``metadata["quant"]``, the numbers from :class:`neurosdm.quantize.QuantSpec`)::

    unit          U = 2**E, E = quant.state_exponent: every conv output, junction, IF/LI membrane, bias and
                  threshold is an integer number of U
    weights       per conv node a signed weight_bits mantissa m and a power-of-two exponent e
                  (quant.weight_exponents, the finest without clipping: neurosdm.quantize.choose_exponent)
    binary input  (the conv reads IF spikes): stored weight m * 2**(e - E), an integer (E <= e)
    graded input  (the image, a float stream, TSM-scaled spikes: quant.round_nodes): stored m * 2**(e + u - E)
                  with u the input's exponent; the output is rounded half to even to an integer of U
    input         the host sends x_int = clip(round_half_even(x_t / 2**E_in), +-(2**(input_bits-1) - 1)),
                  E_in = quant.input_exponent (u = E_in for the first conv)
    TSM           scale_tables hold integer p_q[k] = round_half_even(p[k] / 2**e_p) (quant.tsm_exponents), so the
                  scaled spikes are graded with u = e_p
    biases        round_half_even(b / U) (bias tables included)
    IF            v <- clip(v + x, +-V), V = 2**(state_bits-1) - 1; spike when v >= ceil(theta / U); reset to 0
    LI readout    v <- sign(v d) (|v d| >> 12) + x, d = round(4096 (1 - dt/tau)) (Loihi's decay), clipped at +-V
    output        eps = host(output * 2**quant.output_exponent)

Shifted membranes (converted SNNs: reset by subtraction, initial membrane ``a theta``, stored by the float export as
``v_threshold = (1 - a) theta``, ``v_reset = -a theta``): a fixed-point neuron resets to 0 and subtracts its own
threshold, so such an IF node becomes ``v_threshold = (1 - a) theta``, ``v_reset = 0`` plus a recurrent Scale node
``<if>.reset_offset`` (``scale = -a theta`` in units) from the node to itself. A spike at step k then removes
``(1 - a) theta`` at once and ``a theta`` at step k+1, before the next comparison: the membrane that is compared is
the same, so are the spikes (exact in float and in integers; only the state after the last step differs).

E is calibrated (``calibrate``): the finest exponent of the convs that read spikes (so the 8-bit mantissas of the
convs reading binary spikes are kept exactly), made coarser when the largest value seen on a few batches of real data (every conv output,
junction and readout, and an IF membrane bound of ``num_steps * max |input|``) would not fit ``state_bits`` with a
factor 2 of headroom; convs whose exponent is then finer than E are re-rounded to E (reported).
"""

from __future__ import annotations

import math

import nir
import numpy as np
import torch

from neurosdm.diffusion.schedules import GaussianDiffusion
from neurosdm.errors import QuantizationError
from neurosdm.graph.dialect import UNITS_RULE, as_str, meta_value, upsample_factor
from neurosdm.quantize import QuantSpec, bias_units, choose_exponent, quantize_weight, threshold_units
from neurosdm.graph.program import load_program
from neurosdm.simulators.torch_engine import TorchEngine

__all__ = ["calibration_inputs", "calibrate", "quantize_graph"]

HEADROOM = 2.0  # calibrated maxima must fit the state with this factor to spare


def calibration_inputs(images: torch.Tensor, diffusion, steps: int = 8, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """``[(t, x_t [B, C, H, W] float64)]`` for ``steps`` diffusion steps spread over the schedule (both ends
    included), the images split evenly between them, noise from ``seed``."""
    n_diff = int(diffusion.num_diffusion_steps)
    ts = np.unique(np.linspace(0, n_diff - 1, steps).round().astype(int))
    chunks = torch.chunk(images.float(), len(ts))
    gd = GaussianDiffusion(diffusion)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, x0 in zip(ts, chunks):
        noise = torch.randn(x0.shape, generator=g)
        out.append((int(t), gd.q_sample(x0, int(t), noise).double().numpy()))
    return out


def calibrate(graph: nir.NIRGraph, metadata: dict, inputs: list[tuple[int, np.ndarray]]) -> dict:
    """Run the float graph on calibration inputs ``[(t, x_t)]`` and return ``{"max_abs": {node: max |output|},
    "input_max_abs": float, "images": n, "diffusion_steps": [t...]}`` over the non-spiking nodes (convs, Scale
    nodes, readout). The graph runs on the torch engine in float64 (the reference's arithmetic to rounding, with
    torch's convolutions: about 10x faster at the papers' size), recording only those nodes."""
    observed = [name for name, node in graph.nodes.items() if isinstance(node, (nir.Conv2d, nir.Scale, nir.LI, nir.I))]
    engine = TorchEngine(load_program(nir.NIRGraph(nodes=graph.nodes, edges=list(graph.edges), metadata=metadata),
                                      fixed=None))
    max_abs: dict[str, float] = {}
    x_max, n = 0.0, 0
    for t, x in inputs:
        res = engine.run(np.asarray(x, np.float64), t, record=observed, count=False)
        for name, rec in res["records"].items():
            max_abs[name] = max(max_abs.get(name, 0.0), float(np.abs(rec).max()))
        x_max = max(x_max, float(np.abs(x).max()))
        n += x.shape[0]
    return {"max_abs": max_abs, "input_max_abs": x_max, "images": n,
            "diffusion_steps": np.array([t for t, _ in inputs])}


def _source(graph: nir.NIRGraph, name: str) -> str:
    srcs = [s for s, d in graph.edges if d == name]
    if len(srcs) != 1:
        raise QuantizationError(f"node {name!r} has {len(srcs)} inputs; the quantiser expects convs with one input")
    return srcs[0]


def _f32(a, what: str) -> np.ndarray:
    """Stored arrays are float32: the integers and power-of-two multiples of 8-bit mantissas are exact there."""
    a = np.asarray(a, np.float64)
    b = a.astype(np.float32)
    if not np.array_equal(b.astype(np.float64), a):
        raise QuantizationError(f"{what}: a quantised value is not exact in float32")
    return b


def quantize_graph(graph: nir.NIRGraph, metadata: dict, calibration: dict, spec: QuantSpec | None = None,
                   input_bits: int = 16) -> tuple[nir.NIRGraph, dict]:
    """The fixed-point graph of a float export (module docstring). ``calibration`` from :func:`calibrate`.
    Returns ``(graph, metadata)`` with ``metadata["quant"]`` describing the format; raises
    :class:`QuantizationError` when a value cannot be represented."""
    spec = spec or QuantSpec()
    if metadata.get("quant"):
        raise QuantizationError("the graph is already quantised")
    nodes = dict(graph.nodes)
    edges = [tuple(e) for e in graph.edges]
    offsets = _reset_offsets(nodes, edges, metadata)
    scale_tables = {k: np.asarray(v, np.float64).reshape(-1) for k, v in metadata.get("scale_tables", {}).items()}
    bias_tables = {k: np.asarray(v, np.float64) for k, v in metadata.get("bias_tables", {}).items()}
    convs = [n for n, node in nodes.items() if isinstance(node, nir.Conv2d)]

    # exponents: input, TSM scales, weights
    e_in = choose_exponent(np.array([HEADROOM * calibration["input_max_abs"]]), input_bits)
    tsm_exp = {name: choose_exponent(p, spec.weight_bits, spec.exp_min, spec.exp_max) for name, p in scale_tables.items()}
    w_exp = {c: choose_exponent(np.asarray(nodes[c].weight, np.float64), spec.weight_bits, spec.exp_min, spec.exp_max)
             for c in convs}

    def source_kind(c):
        """(what conv c reads: "spikes" | "input" | "stream", extra exponent of a TSM scale or None); an
        up-sampling node passes its input's kind through (it copies values)."""
        src, extra = _source(graph, c), None
        if src in scale_tables:
            extra, src = tsm_exp[src], _source(graph, src)
        while upsample_factor(nodes[src]) is not None:
            src = _source(graph, src)
        node = nodes[src]
        return ("spikes" if isinstance(node, nir.IF) else "input" if isinstance(node, nir.Input) else "stream"), extra

    kinds = {c: source_kind(c) for c in convs}
    binary = {c for c in convs if kinds[c] == ("spikes", None)}
    spiking = [c for c in convs if kinds[c][0] == "spikes"]  # with TSM the spikes are graded (payload p[k])
    if not spiking:
        raise QuantizationError("no conv reads spikes; cannot choose the state unit")
    e_state = min(w_exp[c] for c in spiking)
    n_steps = int(meta_value(metadata, "num_steps"))
    # largest value to hold: the calibrated maxima, an IF membrane integrating up to num_steps inputs, the threshold
    bound = max([n_steps * v for v in calibration["max_abs"].values()] + [float(meta_value(metadata, "v_threshold"))])
    need = math.ceil(math.log2(HEADROOM * bound)) + 1  # bits above the unit, sign excluded
    e_state = max(e_state, need - (spec.state_bits - 1))
    rerounded = {c: e_state - w_exp[c] for c in binary if w_exp[c] < e_state}
    lost = {c: v for c, v in rerounded.items() if v >= spec.weight_bits - 1}
    if lost:
        c = max(lost, key=lost.get)
        raise QuantizationError(f"values up to {bound:.4g} do not fit a {spec.state_bits}-bit state at the grid of "
                                f"{c!r}: it would lose {lost[c]} of its {spec.weight_bits} weight "
                                "bits; widen the state or check the calibration data")
    for c in rerounded:
        w_exp[c] = e_state

    def to_units(b):
        return bias_units(b, e_state)

    round_nodes = {}
    for c in convs:
        node = nodes[c]
        src_kind, extra = kinds[c]
        u_in = {"spikes": 0, "input": e_in, "stream": e_state}[src_kind] + (extra or 0)
        m, _ = quantize_weight(np.asarray(node.weight, np.float64), w_exp[c], spec.weight_bits)
        shift = w_exp[c] + u_in - e_state
        if c not in binary:
            round_nodes[c] = 1
        nodes[c] = nir.Conv2d(input_shape=node.input_shape, weight=_f32(m.astype(np.float64) * 2.0 ** shift, c),
                              stride=node.stride, padding=node.padding, dilation=node.dilation, groups=node.groups,
                              bias=_f32(to_units(node.bias), c))
    for name, p in scale_tables.items():
        pq = np.round(p * 2.0 ** -tsm_exp[name]) + 0.0
        scale_tables[name] = pq
        nodes[name] = nir.Scale(scale=_f32(np.full(np.shape(nodes[name].scale), pq[0]), name))
    bias_tables = {k: _f32(to_units(v), k) for k, v in bias_tables.items()}
    vmax = spec.state_max
    for name, node in list(nodes.items()):
        if isinstance(node, nir.IF):
            th = threshold_units(node.v_threshold, e_state)
            if th.max() > vmax or th.min() < 1:
                raise QuantizationError(f"node {name!r}: threshold is {th.max():g} units of 2**{e_state}, outside "
                                        f"1..{vmax}")
            nodes[name] = nir.IF(r=_f32(node.r, name), v_threshold=_f32(th, name), v_reset=_f32(node.v_reset, name))
        elif isinstance(node, nir.LI):
            nodes[name] = nir.LI(tau=np.asarray(node.tau, np.float32), r=np.asarray(node.r, np.float32),
                                 v_leak=_f32(node.v_leak, name))
        elif isinstance(node, nir.I):
            nodes[name] = nir.I(r=_f32(node.r, name))
        elif name in offsets:  # payload of a spike, in state units
            nodes[name] = nir.Scale(scale=_f32(to_units(node.scale), name))
        elif isinstance(node, nir.Scale) and name not in scale_tables:
            nodes[name] = nir.Scale(scale=_f32(node.scale, name))
        elif isinstance(node, (nir.Scale, nir.Conv2d, nir.Input, nir.Output)) or upsample_factor(node) is not None:
            continue
        else:
            raise QuantizationError(f"node {name!r} ({type(node).__name__}) has no fixed-point form here")
    for name, table in bias_tables.items():
        if np.abs(table).max(initial=0) > vmax:
            raise QuantizationError(f"node {name!r}: a bias does not fit {spec.state_bits}-bit state")

    md = dict(metadata)
    md["format"] = "neurosdm NIR export, fixed point"
    md["quantized"] = f"int{spec.weight_bits}"
    md["bias_tables"] = bias_tables
    md["scale_tables"] = scale_tables
    md["quant"] = {
        "weight_bits": spec.weight_bits, "state_bits": spec.state_bits, "input_bits": int(input_bits),
        "decay_bits": spec.decay_bits, "rounding": "nearest-even",
        "state_exponent": int(e_state), "input_exponent": int(e_in), "output_exponent": int(e_state),
        "weight_exponents": {c: int(w_exp[c]) for c in convs},
        "tsm_exponents": {k: int(v) for k, v in tsm_exp.items()},
        "round_nodes": round_nodes,
        "rerounded_bits": {c: int(v) for c, v in rerounded.items()},
        "reset_offsets": {name: src for name, src in offsets.items()},
        "units_rule": UNITS_RULE,
        "calibration": {"images": int(calibration["images"]),
                        "diffusion_steps": np.asarray(calibration["diffusion_steps"]),
                        "input_max_abs": float(calibration["input_max_abs"]),
                        "max_abs_bound": float(bound), "headroom": HEADROOM},
    }
    out = nir.NIRGraph(nodes=nodes, edges=edges, metadata=md)
    return out, md


def _reset_offsets(nodes: dict, edges: list, metadata: dict) -> dict[str, str]:
    """Rewrite (in place) every IF node with ``v_reset != 0`` into the fixed-point form of the module docstring
    (``v_reset = 0`` and a recurrent ``<if>.reset_offset`` Scale node of ``v_reset``); returns ``{offset node: IF
    node}``. Only with reset by subtraction (a hard reset to a non-zero value has no fixed-point form here)."""
    shifted = [n for n, node in nodes.items() if isinstance(node, nir.IF) and np.any(np.asarray(node.v_reset) != 0)]
    if not shifted:
        return {}
    if as_str(metadata.get("reset", "zero")) != "subtract":
        raise QuantizationError(f"node {shifted[0]!r}: a non-zero v_reset needs reset by subtraction in fixed point")
    out = {}
    for name in shifted:
        node = nodes[name]
        loop = f"{name}.reset_offset"
        nodes[name] = nir.IF(r=node.r, v_threshold=node.v_threshold, v_reset=np.zeros_like(node.v_reset))
        nodes[loop] = nir.Scale(scale=np.asarray(node.v_reset, np.float64))
        edges += [(name, loop), (loop, name)]
        out[loop] = name
    return out
