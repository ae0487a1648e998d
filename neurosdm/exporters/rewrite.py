"""Exact rewrites of an exported NIR graph for readers with a smaller node vocabulary.

``inline_junctions(graph, metadata)`` removes the identity ``nir.Scale`` summing junctions (``<blk>.sum``, scale =
ones) that :func:`neurosdm.exporters.nir.to_nir_graph` writes at the end of every residual block: no peer reader
tried in ``docs/peer-readers.md`` (spikingjelly, Norse, snnTorch) maps ``nir.Scale``.

Rule. A junction J is a Scale node whose scale is 1 at every element and which is not named in
``metadata["scale_tables"]`` (a TSM ``<conv>.tsm`` node holds the scale of spiking step 0 only and is not an
identity at other steps, even where the stored value happens to be 1). Every edge ``J -> C`` out of a removed
junction becomes the edges ``f -> C``, one for every feeder ``f`` of J (transitively: a feeder that is itself a
removed junction, e.g. the identity shortcut ``<prev blk>.sum -> <blk>.sum``, contributes its own feeders); the
edges into J and J itself are dropped.

Why it is exact. NIR sums every edge into a node, so ``C`` receives ``sum_f f``, which is what J delivered
(``1 * sum_f f``); J has no state, so the value is the same at every step. A TSM Scale fed by J still sums its
inputs before scaling (``p (a + b)`` from the edges ``a -> tsm``, ``b -> tsm``). In floating point the sums are
evaluated in a reader-dependent order, as they already were at J: in float64 the reference interpreter agrees to
rounding (``tests/test_rewrite.py``).

Exceptions (the junction is kept, unchanged):

- an Output node that would get more than one edge. NIR would still sum them, but readers that build a torch module
  return the incoming tensors of an Output separately (spikingjelly 2.0 returns a tuple, one tensor per edge), so
  the junction in front of the Output stays (named as before, feeding all its consumers) and the graph's output
  stays one tensor. ``output_junction`` chooses its form: ``"scale"`` (default: the identity Scale as exported),
  ``"conv"`` (a 1x1 ``nir.Conv2d`` with identity weights and zero bias: exact, ``C**2`` weights, readable by
  every peer that maps Conv2d) or ``"none"`` (no junction: the Output gets the fan-in, as NIR allows);
- a junction without feeders (its consumers would lose the zeros NIR gives a node without input edges: nothing
  to rewire), or one whose removal would create an edge that is already there (two equal edges cannot express
  ``2 f``). :func:`neurosdm.exporters.nir.to_nir_graph` writes neither.

Cost: edges are duplicated, one per (feeder, consumer) pair instead of one per feeder plus one per consumer. The
shipped export (``neurosdm/assets/tiny_fashion.pt``, head "sdm", 62 nodes, 77 edges, 8 junctions) becomes 55
nodes and 82 edges (7 junctions removed, ``up4.sum`` kept before the Output), or 54 nodes and 81 edges with
``output_junction="none"`` (the Output then has 3 edges). No array is duplicated (edges carry no weights).

The returned graph is new (the input is not mutated); node order and names are those of the input minus the
removed junctions; edges keep their order, each rewired edge replaced in place by its expansion. It carries a
copy of the metadata in which ``node_packing`` and ``bias_tables`` entries of removed nodes are dropped and
``junctions`` records the rewrite.

Peer forms (:func:`for_peer`, ``neurosdm export ... --peer NAME``): the rewrites that make one peer framework's own
NIR reader compute what neurosdm's float engine computes, each measured in ``docs/peer-readers.md``
(``scripts/peer_readers.py``). Every peer gets the junction-free form above (``output_junction="conv"``: none of the
three maps ``nir.Scale``); then, per peer:

- ``"spikingjelly"``: nothing else. Its reader must be called with ``dt = metadata["dt"]`` (1): with its default
  ``dt = 1e-4`` it refuses ``IF.r = 1`` (``r`` must equal ``1 / dt``).
- ``"norse"``: (a) :func:`strict_thresholds` (Norse fires on ``v - v_th > 0``); (b) :func:`fold_input_gain` (its
  ``IAFCell`` and ``LIFBoxCell`` ignore ``r``: ``v <- v + dt / tau (v_leak - v + x)``); (c)
  :func:`topological_edges` (its executor, ``nirtorch.load``'s GraphExecutor, runs the nodes in depth-first
  pre-order following the edge list; with the edges in topological order every fork whose other branches are
  direct edges into the join runs right; a fork with a node on two branches cannot be ordered that way, see the
  doc). Call ``norse.torch.from_nir(graph, dt=metadata["dt"])`` (its default ``dt`` is 0.001).
- ``"snntorch"``: (a) :func:`strict_thresholds` (``Leaky`` fires on ``mem - threshold > 0``); (b)
  :func:`if_as_lif` (its reader turns ``nir.IF`` into ``Leaky(beta=0.9, reset_mechanism="subtract",
  init_hidden=False)``, a leaky neuron whose ``(spk, mem)`` tuple then reaches the next node; ``nir.LIF`` becomes
  ``Leaky(beta=1 - dt / tau, reset_mechanism="zero", init_hidden=True)`` with ``dt = 1e-4`` fixed in the reader:
  written as a LIF whose ``1 - dt / tau`` rounds to 1 in float32, an IF is an exact integrator there), with the
  graph's time unit changed to ``dt = 1e-4`` so that every LIF/LI keeps its per-step decay.

Nothing can make a peer read ``nir.LI`` (the readout of a head="spiking" export): none of the three maps it
(spikingjelly and snnTorch raise, Norse drops the node without a word).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import nir
import numpy as np

from neurosdm.errors import ConfigError
from neurosdm.graph.dialect import as_str, meta_value, upsample_factor
from neurosdm.io import atomic_buffer

__all__ = ["inline_junctions", "is_identity_scale", "OUTPUT_JUNCTION_CHOICES", "for_peer", "PEER_CHOICES",
           "strict_thresholds", "fold_input_gain", "topological_edges", "if_as_lif", "SNNTORCH_DT_S", "write_for_peer"]

PEER_CHOICES = ("spikingjelly", "norse", "snntorch")

# snntorch 1.0.0, snntorch/import_nir.py, _nir_to_snntorch_module: the LIF branch sets ``dt = 1e-4`` (not a parameter)
SNNTORCH_DT_S = 1e-4
# IF written as a LIF for snnTorch: tau = IF_AS_LIF_TAU_STEPS * dt, so that snnTorch's beta = 1 - dt / tau = 1 - 2**-40
# rounds to exactly 1.0 in float32 (anything above 2**25 steps does) and r = tau / dt gives an input gain of 1
IF_AS_LIF_TAU_STEPS = 2.0 ** 40

OUTPUT_JUNCTION_CHOICES = ("scale", "conv", "none")

JUNCTIONS_RULE = ("identity Scale junctions inlined (neurosdm.exporters.rewrite.inline_junctions): every edge J -> C "
                  "out of a removed junction J became f -> C for every feeder f of J; exact since NIR sums the edges "
                  "into a node")


def is_identity_scale(node) -> bool:
    """A ``nir.Scale`` whose scale is exactly 1 at every element."""
    return isinstance(node, nir.Scale) and bool(np.all(np.asarray(node.scale) == 1))


def _identity_conv(scale_node: nir.Scale) -> nir.Conv2d:
    scale = np.asarray(scale_node.scale)
    if scale.ndim != 3:
        raise ConfigError(f"output_junction='conv' needs a (C, H, W) junction, got shape {scale.shape}")
    c, h, w = scale.shape
    return nir.Conv2d(input_shape=(int(h), int(w)), weight=np.eye(c, dtype=scale.dtype)[:, :, None, None],
                      stride=1, padding=0, dilation=1, groups=1, bias=np.zeros(c, scale.dtype))


def _rewire(edges: list[tuple[str, str]], removed: set[str]) -> list[tuple[str, str]]:
    feeders: dict[str, list[str]] = {}
    for src, dst in edges:
        if dst in removed:
            feeders.setdefault(dst, []).append(src)
    memo: dict[str, list[str]] = {}

    def expand(name: str, path: tuple[str, ...] = ()) -> list[str]:
        if name not in removed:
            return [name]
        if name in path:
            raise ConfigError(f"junctions form a cycle through {name!r}; cannot inline them")
        if name not in memo:
            memo[name] = [f for src in feeders.get(name, []) for f in expand(src, path + (name,))]
        return memo[name]

    out = []
    for src, dst in edges:
        if dst in removed:
            continue
        out.extend((f, dst) for f in expand(src))
    return out


def inline_junctions(graph: nir.NIRGraph, metadata: dict | None = None,
                     output_junction: str = "scale") -> nir.NIRGraph:
    """``graph`` without its identity Scale junctions (see the module docstring for the rule, why it is exact and
    what it costs). ``metadata`` defaults to ``graph.metadata``; the returned graph carries a copy of it.

    output_junction: the form of the junction kept in front of an Output node that would otherwise get several
        edges: ``"scale"`` (the identity Scale as exported), ``"conv"`` (an identity 1x1 Conv2d of the same name)
        or ``"none"`` (no junction; the Output gets the fan-in).
    """
    if output_junction not in OUTPUT_JUNCTION_CHOICES:
        raise ConfigError(f"unknown output_junction {output_junction!r}; expected one of "
                          f"{', '.join(OUTPUT_JUNCTION_CHOICES)}")
    md = dict(graph.metadata if metadata is None else metadata)
    pinned = set(md.get("scale_tables", {}) or {})
    edges = [(str(a), str(b)) for a, b in graph.edges]
    fed = {dst for _, dst in edges}
    removed = {k for k, n in graph.nodes.items() if is_identity_scale(n) and k not in pinned and k in fed}
    outputs = {k for k, n in graph.nodes.items() if isinstance(n, nir.Output)}

    before = Counter(edges)
    kept_for_output: list[str] = []
    while True:
        new = _rewire(edges, removed)
        keep = set()
        # an Output fed by one removed junction that would expand to several edges: keep that junction
        for out in sorted(outputs):
            into = [src for src, dst in edges if dst == out]
            n_new = sum(1 for _, dst in new if dst == out)
            if output_junction != "none" and len(into) == 1 and into[0] in removed and n_new > 1:
                keep.add(into[0])
                kept_for_output.append(into[0])
        # two equal edges cannot express 2 f: keep the removed junctions feeding the node that would get them
        dup_dst = {dst for (src, dst), c in Counter(new).items() if c > max(1, before[(src, dst)])}
        keep |= {src for src, dst in edges if src in removed and dst in dup_dst}
        if not keep:
            break
        removed -= keep

    nodes = {}
    for k, n in graph.nodes.items():
        if k in removed:
            continue
        if k in kept_for_output and output_junction == "conv":
            n = _identity_conv(n)
        nodes[k] = n
    for key in ("node_packing", "bias_tables"):
        if isinstance(md.get(key), dict):
            md[key] = {k: v for k, v in md[key].items() if k not in removed}
    md["junctions"] = "edges"
    md["junctions_rule"] = JUNCTIONS_RULE
    md["junctions_removed"] = ", ".join(k for k in graph.nodes if k in removed)
    md["junctions_kept_for_output"] = ", ".join(f"{k} ({output_junction})" for k in kept_for_output)
    return nir.NIRGraph(nodes=nodes, edges=new, metadata=md)


# ----------------------------------------------------------------------------------------------- peer forms


def _spiking(node) -> bool:
    return isinstance(node, (nir.IF, nir.LIF, nir.CubaLIF))


def _copy(graph: nir.NIRGraph, nodes: dict | None = None, edges=None, md: dict | None = None) -> nir.NIRGraph:
    return nir.NIRGraph(nodes=dict(graph.nodes if nodes is None else nodes),
                        edges=[tuple(e) for e in (graph.edges if edges is None else edges)],
                        metadata=dict(graph.metadata if md is None else md))


def _on_integer_grid(md: dict) -> bool:
    """A fixed-point export (``metadata["quant"]``): every membrane is an integer number of state units."""
    return isinstance(md.get("quant"), dict)


def strict_thresholds(graph: nir.NIRGraph) -> nir.NIRGraph:
    """Thresholds for a reader that fires on ``v > theta`` where neurosdm fires on ``v >= theta``.

    Integer graphs (``metadata["quant"]``: membranes are integers): ``theta' = theta - 1``, and for integer ``v``
    ``v > theta - 1  <=>  v >= theta`` exactly. Float graphs: ``theta' = nextafter_f32(theta, -inf)``, the largest
    float32 below ``theta``; for every float32 ``v``, ``v > theta'  <=>  v >= theta`` (no float32 lies strictly
    between them), so a float32 reader fires exactly where a float32 ``>=`` would. A float64 reader could still see
    a membrane strictly between the two (one float32 ulp); neurosdm's own engines should read the original graph.
    Applies to IF, LIF and CubaLIF nodes; the metadata records ``comparison = ">"``."""
    md = dict(graph.metadata or {})
    if as_str(md.get("comparison", ">=")) == ">":
        return _copy(graph)
    integer = _on_integer_grid(md)
    nodes = {}
    for k, n in graph.nodes.items():
        if _spiking(n):
            th = np.asarray(n.v_threshold)
            if integer:
                if not np.array_equal(th, np.rint(th)):
                    raise ConfigError(f"node {k!r}: a fixed-point graph with a non-integer threshold")
                new = (th - 1).astype(th.dtype)
            else:
                new = np.nextafter(th.astype(np.float32), np.float32(-np.inf)).astype(th.dtype)
            n = _replace(n, v_threshold=new)
        nodes[k] = n
    md["comparison"] = ">"
    md["comparison_rule"] = ("thresholds lowered for readers that fire on v > theta (neurosdm.exporters.rewrite."
                             "strict_thresholds): " + ("theta - 1 on the integer grid" if integer else
                                                       "the next float32 below theta"))
    return _copy(graph, nodes, md=md)


def _replace(node, **fields):
    """A copy of a neuron node with some parameters replaced (the others shared)."""
    names = {nir.IF: ("r", "v_threshold", "v_reset"), nir.LIF: ("tau", "r", "v_leak", "v_threshold", "v_reset"),
             nir.LI: ("tau", "r", "v_leak"),
             nir.CubaLIF: ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold", "v_reset", "w_in")}[type(node)]
    kw = {f: getattr(node, f) for f in names}
    kw.update(fields)
    return type(node)(**kw)


def fold_input_gain(graph: nir.NIRGraph) -> nir.NIRGraph:
    """``r = 1`` in every IF and LIF node, its ``r`` moved into the weights and bias of the nodes feeding it.

    For readers that ignore ``r`` (Norse). A neuron sees ``r * sum_f y_f`` with ``y_f = W_f x + b_f``; with
    ``W_f, b_f`` scaled by ``r`` (per output channel) it sees the same sum with ``r = 1``. Exact when ``r`` is a
    power of two (scaling by it is exact in binary floating point); otherwise within one rounding per weight.
    Needs every feeder to be a Conv2d/Affine/Linear that feeds only neurons of the same ``r``, and ``r`` uniform
    over all axes but the channel axis; raises :class:`ConfigError` otherwise."""
    nodes = dict(graph.nodes)
    edges = [tuple(e) for e in graph.edges]
    todo = {k: np.asarray(n.r) for k, n in graph.nodes.items() if isinstance(n, (nir.IF, nir.LIF))
            and not np.all(np.asarray(n.r) == 1)}
    scale_of: dict[str, np.ndarray] = {}
    for k, r in todo.items():
        per_ch = r.reshape(r.shape[0], -1) if r.ndim > 1 else r.reshape(-1, 1)
        if r.ndim == 0 or not np.all(per_ch == per_ch[:, :1]):
            raise ConfigError(f"node {k!r}: r varies inside a channel; cannot move it into the weights")
        feeders = [a for a, b in edges if b == k]
        for f in feeders:
            fn = graph.nodes[f]
            if not isinstance(fn, (nir.Conv2d, nir.Affine, nir.Linear)):
                raise ConfigError(f"node {k!r}: r = {per_ch[0, 0]:g} cannot be moved into its feeder {f!r} "
                                  f"({type(fn).__name__})")
            s = per_ch[:, 0]
            if f in scale_of and not np.array_equal(scale_of[f], s):
                raise ConfigError(f"node {f!r} feeds neurons with different r; cannot move r into it")
            scale_of[f] = s
        nodes[k] = _replace(graph.nodes[k], r=np.ones_like(r))
    for f, s in scale_of.items():
        if any(not (b in todo) for a, b in edges if a == f):
            raise ConfigError(f"node {f!r} also feeds a node other than the neurons whose r it would carry")
        fn = graph.nodes[f]
        w = np.asarray(fn.weight)
        sw = s.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype)
        if isinstance(fn, nir.Conv2d):
            bias = None if fn.bias is None else np.asarray(fn.bias) * s.astype(np.asarray(fn.bias).dtype)
            nodes[f] = nir.Conv2d(input_shape=fn.input_shape, weight=w * sw, stride=fn.stride, padding=fn.padding,
                                  dilation=fn.dilation, groups=fn.groups, bias=bias)
        elif isinstance(fn, nir.Affine):
            nodes[f] = nir.Affine(weight=w * sw, bias=np.asarray(fn.bias) * s.astype(np.asarray(fn.bias).dtype))
        else:
            nodes[f] = nir.Linear(weight=w * sw)
    md = dict(graph.metadata or {})
    if todo:
        md["input_gain_rule"] = ("r of " + ", ".join(todo) + " moved into the weights and biases of their feeders "
                                 "(neurosdm.exporters.rewrite.fold_input_gain)")
    return _copy(graph, nodes, edges, md)


def _breadth_first_order(names: list[str], edges: list[tuple]) -> list[str]:
    """Kahn's order with a first-in first-out queue (nodes on a cycle last, in the order given). Not the
    evaluation order (:func:`neurosdm.graph.structure.order`): an edge-list order for Norse's executor, which
    runs the shipped export to its Output with this order and stops at a 32-channel node with the depth-first one
    (measured)."""
    indeg = {n: 0 for n in names}
    succ: dict[str, list[str]] = {n: [] for n in names}
    for src, dst in edges:
        succ[src].append(dst)
        indeg[dst] += 1
    ready = [n for n in names if indeg[n] == 0]
    out = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    return out + [n for n in names if n not in set(out)]


def topological_edges(graph: nir.NIRGraph) -> nir.NIRGraph:
    """The same graph with its edge list sorted by (position of the source, position of the destination) in a
    breadth-first topological order of the nodes (NIR edges are a set, so this changes nothing for a reader that
    follows NIR). A reader that executes nodes in depth-first pre-order along the edge list (Norse's
    ``nirtorch.load``) then visits, at every fork, the branch that joins later first."""
    edges = [tuple(e) for e in graph.edges]
    pos = {k: i for i, k in enumerate(_breadth_first_order(list(graph.nodes), edges))}
    return _copy(graph, edges=sorted(edges, key=lambda e: (pos[e[0]], pos[e[1]])))


def if_as_lif(graph: nir.NIRGraph, dt_s: float = SNNTORCH_DT_S) -> nir.NIRGraph:
    """The graph in time unit ``dt_s`` (seconds), every IF written as a LIF that integrates without leak.

    Time: ``metadata["dt"]`` becomes ``dt_s`` and every LIF/LI ``tau`` is multiplied by ``dt_s / dt``, so that
    ``dt / tau`` (the per-step decay) and ``r dt / tau`` (the input gain) are unchanged.
    IF (``v <- v + r dt x``, with neurosdm's ``r = 1, dt = 1``: ``v <- v + x``) becomes
    ``LIF(tau = 2**40 dt_s, r = tau / dt_s * r dt, v_leak = 0)``: Euler ``v <- v + dt/tau (-v + r' x)`` is
    ``v <- (1 - 2**-40) v + r dt x``. In float32, ``1 - 2**-40`` is 1.0 (snnTorch's ``beta``), so a float32 reader
    integrates exactly; a float64 reader sees a leak of ``2**-40`` per step (1e-12). Needs ``v_reset = 0`` (the
    LIF reset of snnTorch's reader is to zero); raises :class:`ConfigError` otherwise."""
    md = dict(graph.metadata or {})
    dt = float(np.asarray(meta_value(md, "dt", 1.0)).reshape(-1)[0])
    k_t = dt_s / dt
    nodes = {}
    for k, n in graph.nodes.items():
        if isinstance(n, nir.IF):
            if np.any(np.asarray(n.v_reset) != 0):
                raise ConfigError(f"node {k!r}: v_reset must be 0 to be written as a LIF with reset to zero")
            r = np.asarray(n.r)
            tau = np.full_like(r, IF_AS_LIF_TAU_STEPS * dt_s)
            n = nir.LIF(tau=tau, r=(IF_AS_LIF_TAU_STEPS * r * dt).astype(r.dtype), v_leak=np.zeros_like(r),
                        v_threshold=n.v_threshold, v_reset=n.v_reset)
        elif isinstance(n, (nir.LIF, nir.LI)):
            n = _replace(n, tau=(np.asarray(n.tau) * k_t).astype(np.asarray(n.tau).dtype))
        elif isinstance(n, nir.CubaLIF):
            n = _replace(n, tau_syn=np.asarray(n.tau_syn) * k_t, tau_mem=np.asarray(n.tau_mem) * k_t)
        nodes[k] = n
    md["dt"] = dt_s
    md["if_as_lif_rule"] = (f"every IF written as LIF(tau = 2**40 dt, r = tau / dt, v_leak = 0), time unit dt = "
                            f"{dt_s:g} (neurosdm.exporters.rewrite.if_as_lif)")
    return _copy(graph, nodes, md=md)


PEER_IMPORT = {
    "spikingjelly": "spikingjelly.activation_based.nir_exchange.import_from_nir(graph, dt=metadata['dt'])",
    "norse": "norse.torch.from_nir(graph, dt=metadata['dt'])",
    "snntorch": "snntorch.import_nir.import_from_nir(graph)",
}


def for_peer(graph: nir.NIRGraph, peer: str, metadata: dict | None = None) -> nir.NIRGraph:
    """The export rewritten for one peer framework's NIR reader (module docstring: what each peer gets and why).
    ``metadata`` defaults to ``graph.metadata``; the result records ``peer`` and ``peer_import`` (how to call
    the reader)."""
    name = str(peer).lower()
    if name not in PEER_CHOICES:
        raise ConfigError(f"unknown peer {peer!r}; expected one of {', '.join(PEER_CHOICES)}")
    ups = sorted(k for k, n in graph.nodes.items() if upsample_factor(n) is not None)
    if ups:
        raise ConfigError(f"the graph holds neurosdm's up-sampling extension node(s) {ups[:3]}, which no peer reader "
                          "knows (they run its placeholder as zeros): export with --upsample polyphase (core NIR)")
    md0 = dict(graph.metadata if metadata is None else metadata)
    pinned = set(md0.get("scale_tables", {}) or {})
    if any(is_identity_scale(n) and k not in pinned for k, n in graph.nodes.items()):
        g = inline_junctions(graph, md0, output_junction="conv")
    else:  # already junction-free (e.g. exported with --junctions edges)
        g = _copy(graph, md=md0)
    if name in ("norse", "snntorch"):
        g = strict_thresholds(g)
    if name == "norse":
        g = topological_edges(fold_input_gain(g))
    if name == "snntorch":
        g = if_as_lif(g)
    md = dict(g.metadata)
    md["peer"] = name
    md["peer_import"] = PEER_IMPORT[name]
    return _copy(g, md=md)


def write_for_peer(path, peer: str, discard_on_error: bool = False):
    """Replace the NIR file at ``path`` by :func:`for_peer` of it (atomically). With ``discard_on_error`` the file
    is removed when the rewrite fails (``neurosdm export --peer`` wrote it a moment before: no output that is not
    what was asked for). Returns ``path``."""
    path = Path(path)
    try:
        graph = for_peer(nir.read(path), peer)
        with atomic_buffer(path) as buffer:  # HDF5 in memory: a full disk is a clean error, not a crash
            nir.write(buffer, graph)
    except BaseException:
        if discard_on_error and path.exists():
            os.unlink(path)
        raise
    return path
