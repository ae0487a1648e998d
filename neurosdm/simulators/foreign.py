"""Foreign graphs: a NIR graph that is not a neurosdm denoiser export (no ``image_shape`` / ``diffusion``
metadata) runs once on a time-varying input ``[T, B, *input_shape]`` read from a file; its RunStats hold that one
call (``timesteps [0]``, ``num_steps = T``, ``images = B``, no host work), layers named by their NIR node names.
"""

from __future__ import annotations

from pathlib import Path

import nir
import numpy as np

from neurosdm.errors import ConfigError
from neurosdm.graph.dialect import Discretisation
from neurosdm.graph.program import SPIKING, Program, load_program, read_graph
from neurosdm.io import atomic_buffer, atomic_path, regular_file
from neurosdm.simulators.run import is_denoiser_export, make_engine
from neurosdm.simulators.stats import RunStats

__all__ = ["FOREIGN_DEFAULTS", "foreign_discretisation", "load_any", "describe_discretisation", "load_foreign_input",
           "simulate_foreign", "save_foreign_outputs", "save_foreign_spikes_nird"]

#: the discretisation a foreign graph gets when neither an option nor its metadata says otherwise
FOREIGN_DEFAULTS = {"dt": 1.0, "method": "euler", "reset": "zero", "comparison": ">="}
_META_KEYS = {"dt": "dt", "method": "discretisation", "reset": "reset", "comparison": "comparison"}


def foreign_discretisation(metadata: dict | None, dt: float | None = None, method: str | None = None,
                           reset: str | None = None, comparison: str | None = None):
    """The :class:`~neurosdm.graph.dialect.Discretisation` of a foreign graph and where each field came
    from: options (not None) win over the graph's metadata (``dt``, ``discretisation``, ``reset``,
    ``comparison``), which wins over :data:`FOREIGN_DEFAULTS`. Returns ``(disc, {field: "option" | "metadata" |
    "default"})``."""
    md = dict(metadata or {})
    options = {"dt": dt, "method": method, "reset": reset, "comparison": comparison}
    overrides = {k: v for k, v in options.items() if v is not None}
    disc = Discretisation.from_metadata(md, **overrides)
    origin = {k: "option" if k in overrides else "metadata" if _META_KEYS[k] in md else "default"
              for k in FOREIGN_DEFAULTS}
    return disc, origin


def load_any(path, dt: float | None = None, method: str | None = None, reset: str | None = None,
             comparison: str | None = None):
    """Read a NIR file once: ``(program, None)`` for a neurosdm denoiser export (its own discretisation; the
    options must be None), ``(program, origin)`` for a foreign graph (:func:`foreign_discretisation`)."""
    graph = read_graph(path)
    if is_denoiser_export(graph.metadata or {}):
        given = [f"--{k}" for k, v in (("dt", dt), ("method", method), ("reset", reset), ("comparison", comparison))
                 if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for foreign graphs; a neurosdm denoiser export carries its "
                              "own discretisation")
        return load_program(graph), None
    disc, origin = foreign_discretisation(graph.metadata, dt, method, reset, comparison)
    return load_program(graph, disc=disc), origin


def describe_discretisation(program: Program, origin: dict) -> str:
    """One line: the discretisation of a foreign graph and where each value came from."""
    d = program.disc
    vals = {"dt": f"{d.dt:g}", "method": d.method, "reset": d.reset, "comparison": d.comparison}
    return "discretisation: " + ", ".join(f"{k} {v} ({origin[k]})" for k, v in vals.items()) + \
        f"; defaults: dt {FOREIGN_DEFAULTS['dt']:g}, {FOREIGN_DEFAULTS['method']}, reset " \
        f"{FOREIGN_DEFAULTS['reset']}, comparison {FOREIGN_DEFAULTS['comparison']}"


def _input_layer(program: Program):
    if len(program.inputs) != 1:
        raise ConfigError(f"a foreign graph needs exactly one Input node, this one has {sorted(program.inputs)}")
    return program.by_name[program.inputs[0]]


def load_foreign_input(path, program: Program) -> np.ndarray:
    """The input of a foreign graph's Input node as float64 ``[T, B, *input_shape]`` from

    - ``.npy``: ``[T, B, *shape]``, or ``[T, *shape]`` (one sample: B = 1);
    - ``.npz``: the same, its only array or the one named after the Input node, ``input`` or ``x``;
    - anything else: NIR data (``nir.read_data``): the node named after the Input node (or the file's only
      node), its only observable, a ``TimeGriddedData [samples, T, neurons]`` (``EventData`` is gridded with the
      graph's dt), neurons reshaped to the input shape.

    Raises a one-line :class:`ConfigError` that names the expected shape."""
    path = Path(path)
    inp = _input_layer(program)
    shape = tuple(int(v) for v in inp.in_shape)
    want = (f"expected [T, B, {', '.join(map(str, shape))}] or [T, {', '.join(map(str, shape))}] (one sample) "
            f"for Input node {inp.name!r} of shape {shape}")
    if not path.exists():
        raise ConfigError(f"input file not found: {path} ({want})")
    regular_file(path, "input file", ConfigError)  # a FIFO would block: never opened
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConfigError(f"cannot read {path} as {suffix}: {e}") from None
        if suffix == ".npz":
            keys = list(loaded.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in (inp.name, "input", "x") if k in keys), None)
            if key is None:
                raise ConfigError(f"{path} holds arrays {keys}; name the input array {inp.name!r}, 'input' or 'x' "
                                  f"or keep only one ({want})")
            arr = loaded[key]
        else:
            arr = loaded
        arr = np.asarray(arr)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or arr.dtype.kind == "c":
            raise ConfigError(f"input {path} has dtype {arr.dtype}, not real numbers ({want})")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ConfigError(f"input {path} holds NaN or infinite values")
        if arr.ndim == 2 + len(shape) and tuple(arr.shape[2:]) == shape and arr.shape[0] >= 1 and arr.shape[1] >= 1:
            return arr
        if arr.ndim == 1 + len(shape) and tuple(arr.shape[1:]) == shape and arr.shape[0] >= 1:
            return arr[:, None]
        raise ConfigError(f"input {path.name} has shape {tuple(arr.shape)}; {want}")
    try:
        data = nir.read_data(str(path))
    except Exception as e:  # h5py / nir raise many types for a file that is not NIR data
        raise ConfigError(f"cannot read {path} as .npy, .npz or NIR data (nir.read_data): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    nodes = data.nodes
    name = inp.name if inp.name in nodes else (next(iter(nodes)) if len(nodes) == 1 else None)
    if name is None:
        raise ConfigError(f"NIR data {path.name} has nodes {sorted(nodes)}; none is the Input node {inp.name!r}")
    node = nodes[name]
    if not isinstance(node, nir.NIRNodeData) or len(node.observables) != 1:
        obs = sorted(getattr(node, "observables", {}) or {})
        raise ConfigError(f"NIR data {path.name}: node {name!r} must hold exactly one observable, it has {obs}")
    obs = next(iter(node.observables.values()))
    if isinstance(obs, nir.EventData):
        obs = obs.to_time_gridded(float(program.disc.dt))
    arr = np.asarray(obs.data, np.float64)  # [samples, T, neurons]
    if not np.isfinite(arr).all():
        raise ConfigError(f"NIR data {path.name} node {name!r} holds NaN or infinite values")
    if arr.ndim != 3 or arr.shape[2] != int(np.prod(shape)) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"NIR data {path.name} node {name!r} has shape {tuple(arr.shape)}; expected [samples, T, "
                          f"{int(np.prod(shape))}] (neurons = the Input node {inp.name!r}'s shape {shape})")
    return arr.transpose(1, 0, 2).reshape(arr.shape[1], arr.shape[0], *shape)


def simulate_foreign(program: Program, x, engine: str = "torch", device: str = "cpu", record: bool = False):
    """Run a foreign graph once on ``x [T, B, *input_shape]`` from a zero state. Returns ``(result, RunStats)``:
    the engine's result (``outputs``, ``counts``, ``records``) and its counts as one call (``timesteps [0]``,
    ``num_steps T``, ``images B``, no host work). Both engines run every kind and give the same counts."""
    x = np.asarray(x, np.float64)
    inp = _input_layer(program)
    n = len(inp.in_shape)
    if x.ndim != 2 + n or tuple(x.shape[2:]) != tuple(inp.in_shape):
        raise ConfigError(f"input has shape {tuple(x.shape)}; expected [T, B, *{tuple(inp.in_shape)}] for Input node "
                          f"{inp.name!r}")
    eng = make_engine(engine, program, device=device)
    res = eng.run(x, 0, record=record)
    T, B = int(x.shape[0]), int(x.shape[1])
    kinds = {layer.name: layer.kind for layer in program.layers}
    stats = RunStats(T, images=B, layer_kinds=kinds)
    stats.add_call(0, res["counts"], {}, kinds)
    d = program.disc
    stats.meta.update(engine=engine, graph="foreign", input_node=inp.name, time_steps=T, batch=B,
                      dt=float(d.dt), method=d.method, reset=d.reset, comparison=d.comparison)
    return res, stats


def save_foreign_outputs(result: dict, path) -> None:
    """Every Output node's ``[T, B, ...]`` float64 array of an engine result, as ``.npz`` keyed by node name."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{name: np.asarray(v) for name, v in result["outputs"].items()})


def save_foreign_spikes_nird(result: dict, program: Program, path) -> list[str]:
    """The outputs of every spiking layer (``SPIKING`` kinds: IF, LIF, CubaLIF, Threshold) of a recorded engine
    result as NIR data: per layer (its NIR node name) a ``TimeGriddedData`` of bools ``[B, T, neurons]``, dt from
    the discretisation. Returns the layer names written."""
    nodes = {}
    for layer in program.layers:
        if layer.kind not in SPIKING:
            continue
        rec = np.asarray(result["records"][layer.name])  # [T, B, ...]
        data = rec.reshape(rec.shape[0], rec.shape[1], -1).transpose(1, 0, 2) > 0
        nodes[layer.name] = nir.NIRNodeData({"spikes": nir.TimeGriddedData(data, float(program.disc.dt))})
    with atomic_buffer(path) as buffer:  # HDF5 in memory: a full disk is a clean error, not a crash
        nir.write_data(buffer, nir.NIRGraphData(nodes))
    return list(nodes)
