"""Clocked torch engine: a :class:`~neurosdm.simulators.program.Program` run densely and batched with torch ops.

Every layer is computed for the whole batch at every spiking step (``F.conv2d``, element-wise neuron updates), on
CPU or CUDA; the weights are moved to the device once, in ``__init__``. The semantics are those of the reference
interpreter (:func:`neurosdm.simulators.reference.run_graph`), which this engine reproduces:

- per spiking step ``k`` (state starts at 0 at every :meth:`TorchEngine.run`), layers in the program's order; a
  layer's input is the sum of its sources' outputs at this step (in the order of ``Layer.sources``);
- conv: ``conv2d(x, W) + b`` (asymmetric padding by ``F.pad``); Scale: ``x * s``; Input / Output: identity;
  conv biases and TSM scales of diffusion step ``t`` and spiking step ``k`` from ``Program.step_params(t)``;
- float neurons: ``v <- decay v + (1 - decay) v_leak + gain x``; IF compares with ``>=`` (or ``>``,
  ``disc.comparison``) and resets to ``v_reset`` (``disc.reset == "zero"``) or by ``threshold - v_reset``;
- fixed point (``Program.fixed``): the graph is integer-valued, its convs are exact in float64 (so ``dtype`` must
  be float64), convs in ``round_nodes`` round half to even (``torch.round``), neurons run
  :func:`neurosdm.quantize.fixed_point_step_torch` on an int64 state and count their saturations; a non-integer
  neuron input raises :class:`GraphError` (as the reference does).

float64 (default) is the verification mode: float graphs agree with the reference to rounding (the bias is added
after the convolution sum, as the reference does; IF/I updates are the same float operations), integer graphs bit
for bit. float32 (float graphs only) is the fast mode; on CUDA it runs convolutions in IEEE float32, TF32 off
(``allow_tf32``), so it stays within float32 rounding of the reference (up to spike flips where a membrane lies
within that rounding of its threshold).

Counts (:mod:`neurosdm.simulators.stats`) are computed densely and exactly, on the device, with one host transfer
per run. For a conv the number of nonzero synapses that leave input position ``i`` and land inside the output map
is the fan-out ``F[i] = (d/dx_i) sum(conv2d(x, W != 0))`` (computed once per layer), so
``sum(conv2d(x != 0, W != 0)) = sum_i [x_i != 0] F[i]`` (``synops`` / ``graded_ops``) and
``sum(conv2d(1, W != 0)) = B sum_i F[i]`` (``macs``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from neurosdm.errors import ConfigError, GraphError
from neurosdm.quantize import fixed_point_step_torch, state_limit
from neurosdm.simulators.program import Layer, Program

__all__ = ["TorchEngine"]

_NEURONS = ("if", "li", "i")


def _fanout(weight: np.ndarray, in_shape: tuple[int, ...], stride, padding) -> torch.Tensor:
    """``F [Ci, H, W]`` int64: per input position, the nonzero weights connecting it to output positions inside
    the output map (the gradient of ``sum(conv2d(x, W != 0))`` with respect to ``x``; exact in float64)."""
    mask = torch.as_tensor(weight != 0, dtype=torch.float64)
    x = torch.zeros((1, *in_shape), dtype=torch.float64, requires_grad=True)
    (pt, pb), (pl, pr) = padding
    y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), mask, stride=tuple(stride))
    (grad,) = torch.autograd.grad(y.sum(), x)
    return torch.round(grad[0]).to(torch.int64)


class _Compiled:
    """One layer's device tensors and constant counts."""

    def __init__(self, layer: Layer, engine: "TorchEngine"):
        dev, dt = engine.device, engine.dtype
        self.layer = layer
        self.name = layer.name
        self.kind = layer.kind
        self.sources = list(layer.sources)
        self.in_shape = tuple(layer.in_shape)
        self.out_shape = tuple(layer.out_shape)
        self.in_size = int(np.prod(self.in_shape)) if self.in_shape else 1
        self.out_size = int(np.prod(self.out_shape)) if self.out_shape else 1

        def t(a, dtype=dt):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=dev)

        if self.kind == "conv":
            self.weight = t(layer.weight)
            self.bias = t(layer.bias)
            self.stride = tuple(int(s) for s in layer.stride)
            (pt, pb), (pl, pr) = layer.padding
            if pt == pb and pl == pr:
                self.pad, self.conv_padding = None, (int(pt), int(pl))
            else:
                self.pad, self.conv_padding = (int(pl), int(pr), int(pt), int(pb)), (0, 0)
            self.rounded = bool(layer.rounded) and engine.fixed is not None
            fan = _fanout(layer.weight, self.in_shape, self.stride, layer.padding)
            self.fanout = fan.to(dev)
            self.fanout_total = int(fan.sum())
            self.op_counter = {"spikes": "synops", "graded": "graded_ops"}.get(layer.input, "macs")
        elif self.kind == "scale":
            self.scale = self._scalar_or_tensor(layer.scale, t)
        elif self.kind in _NEURONS:
            self.spiking = self.kind == "if"
            if engine.fixed is not None:
                if self.spiking:
                    thr = np.asarray(layer.threshold, np.float64)
                    if not np.array_equal(thr, np.rint(thr)):
                        raise GraphError(f"node {self.name!r}: fixed-point mode needs integer thresholds")
                    self.threshold_int = torch.as_tensor(np.rint(thr).astype(np.int64), device=dev)
                    self.reset = "hard" if engine.program.disc.reset == "zero" else "subtract"
                else:  # I / LI: never fire, the output is the state
                    self.threshold_int = state_limit(engine.fixed.state_bits) + 1
                    self.reset = "hard"
                self.decay_q12 = int(layer.decay_q12)
            else:
                decay = np.asarray(layer.decay, np.float64)
                gain = np.asarray(layer.gain, np.float64)
                leak = (1.0 - decay) * np.asarray(layer.v_leak, np.float64)
                # exact shortcuts (1 * x = x, v * 1 = v, v + 0 = v), so IF/I is the reference's v + r dt x
                self.decay = None if np.all(decay == 1.0) else self._scalar_or_tensor(decay, t)
                self.gain = None if np.all(gain == 1.0) else self._scalar_or_tensor(gain, t)
                self.leak = None if np.all(leak == 0.0) else self._scalar_or_tensor(leak, t)
                if self.spiking:
                    self.threshold = t(layer.threshold)
                    self.v_reset = t(layer.v_reset)
                    self.drop = t(np.asarray(layer.threshold) - np.asarray(layer.v_reset))
                    self.ge = engine.program.disc.comparison == ">="
                    self.reset_zero = engine.program.disc.reset == "zero"

    @staticmethod
    def _scalar_or_tensor(a, t):
        a = np.asarray(a, np.float64)
        if a.size and np.all(a == a.reshape(-1)[0]):
            return float(a.reshape(-1)[0])
        return t(a)


class TorchEngine:
    """Dense, batched, clocked engine for an exported graph (module docstring for the semantics and counts).

    program: from :func:`neurosdm.simulators.program.load_program`.
    device:  ``"cpu"``, ``"cuda"``, ... (weights are moved there once).
    dtype:   ``torch.float64`` (default; required for fixed-point graphs) or ``torch.float32`` (float graphs).
    allow_tf32: let cuDNN use TF32 for float32 convolutions on CUDA (faster, ~1e-3 relative error; default off).
    """

    name = "torch"

    def __init__(self, program: Program, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 allow_tf32: bool = False):
        if not isinstance(program, Program):
            raise ConfigError(f"TorchEngine needs a Program (neurosdm.simulators.program.load_program), got "
                              f"{type(program).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.program = program
        self.fixed = program.fixed
        if self.fixed is not None and dtype != torch.float64:
            raise ConfigError(f"this is a fixed-point (quantised) graph: run it with dtype=torch.float64, not {dtype}; "
                              "its integer convolutions are exact in float64 (integers below 2**53) but not in "
                              "float32 (24-bit mantissa: the 24-bit neuron states and the sums of 8-bit weights "
                              "times them would be rounded), and it must match the reference bit for bit")
        if len(program.inputs) != 1:
            raise GraphError(f"TorchEngine runs graphs with one Input node, this one has {sorted(program.inputs)}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.allow_tf32 = bool(allow_tf32)
        self.input_name = program.inputs[0]
        self.input_shape = tuple(program.by_name[self.input_name].in_shape)
        self.layers = [_Compiled(layer, self) for layer in program.layers]
        self._step_cache: tuple[int, list] | None = None

    # ------------------------------------------------------------------------------------------------ params

    def _params(self, t: int) -> list[dict[str, object]]:
        """Per spiking step (or one entry for all), ``{layer: bias tensor | scale float/tensor}`` on the device."""
        if self._step_cache is not None and self._step_cache[0] == int(t):
            return self._step_cache[1]
        out = []
        for p in self.program.step_params(t):
            d: dict[str, object] = {}
            for name, over in p.items():
                if "bias" in over:
                    d[name] = torch.as_tensor(np.asarray(over["bias"], np.float64), dtype=self.dtype,
                                              device=self.device)
                elif "scale" in over:
                    d[name] = _Compiled._scalar_or_tensor(
                        over["scale"], lambda a: torch.as_tensor(a, dtype=self.dtype, device=self.device))
            out.append(d)
        self._step_cache = (int(t), out)
        return out

    # ------------------------------------------------------------------------------------------------ layers

    def _conv(self, c: _Compiled, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if c.pad is not None:
            x = F.pad(x, c.pad)
        if self.dtype == torch.float32 and self.fixed is None:
            return F.conv2d(x, c.weight, bias, stride=c.stride, padding=c.conv_padding)
        # float64: the sum first, then the bias (the reference's order)
        y = F.conv2d(x, c.weight, None, stride=c.stride, padding=c.conv_padding) + bias.view(-1, 1, 1)
        return torch.round(y) if c.rounded else y

    def _neuron_float(self, c: _Compiled, x: torch.Tensor, v: torch.Tensor):
        drive = x if c.gain is None else c.gain * x
        if c.decay is not None:
            v = c.decay * v
        if c.leak is not None:
            v = v + c.leak
        v = v + drive
        if not c.spiking:
            return v, v, None
        s = v >= c.threshold if c.ge else v > c.threshold
        if c.reset_zero:
            v = torch.where(s, c.v_reset, v)
        else:
            v = v - c.drop * s
        return s.to(self.dtype), v, s

    # ------------------------------------------------------------------------------------------------ run

    def run(self, x, t: int, record: bool = False, count: bool = True) -> dict:
        """One network call: ``program.num_steps`` spiking steps from a zero state.

        x: numpy array or tensor ``[B, *input_shape]``, the (already encoded) input of the Input layer, the same
           at every spiking step; t: diffusion step (selects ``program.step_params(t)``); record: also return every
           layer's output; count: compute the counters (``counts`` is empty otherwise).

        Returns ``{"outputs": {output layer: float64 numpy [K, B, *shape]}, "counts": {layer: {counter: int64
        numpy [K]}}, "records": {layer: float64 numpy [K, B, *shape]}}`` (records empty unless ``record``; a
        layer appears in counts when its kind has counters).
        """
        if self.device.type == "cuda":
            old = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32
            try:
                with torch.no_grad():
                    return self._run(x, t, record, count)
            finally:
                torch.backends.cudnn.allow_tf32 = old
        with torch.no_grad():
            return self._run(x, t, record, count)

    def _run(self, x, t: int, record: bool, count: bool) -> dict:
        xt = torch.as_tensor(x).to(device=self.device, dtype=self.dtype)
        if xt.ndim != 1 + len(self.input_shape) or tuple(xt.shape[1:]) != self.input_shape:
            raise GraphError(f"input for Input node {self.input_name!r} has shape {tuple(xt.shape)}; expected "
                             f"[batch, *{self.input_shape}]")
        B = int(xt.shape[0])
        K = self.program.num_steps
        params = self._params(t)
        fixed = self.fixed
        state: dict[str, torch.Tensor] = {}
        for c in self.layers:
            if c.kind in _NEURONS:
                shape = (B, *c.in_shape)
                state[c.name] = torch.zeros(shape, dtype=torch.int64 if fixed is not None else self.dtype,
                                            device=self.device)
        wanted = set(self.program.outputs) | ({c.name for c in self.layers} if record else set())
        traces: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
        counts: dict[str, dict[str, list]] = {}
        not_integer: dict[str, list[torch.Tensor]] = {}

        def add(layer, counter, value):
            counts.setdefault(layer, {}).setdefault(counter, []).append(value)

        for k in range(K):
            p = params[min(k, len(params) - 1)]
            out: dict[str, torch.Tensor] = {}
            for c in self.layers:
                if c.name == self.input_name:  # (a nested graph's Input node is an identity, below)
                    y = xt
                    out[c.name] = y
                    if c.name in traces:
                        traces[c.name].append(y)
                    continue
                if c.sources:
                    xin = out[c.sources[0]]
                    for src in c.sources[1:]:
                        xin = xin + out[src]
                else:
                    xin = torch.zeros((B, *c.in_shape), dtype=self.dtype, device=self.device)
                if count and len(c.sources) > 1:
                    add(c.name, "fanin_adds", (len(c.sources) - 1) * c.in_size * B)
                if c.kind == "conv":
                    y = self._conv(c, xin, p.get(c.name, c.bias))
                    if count:
                        add(c.name, "events_in", torch.count_nonzero(xin))
                        if c.op_counter == "macs":
                            add(c.name, "macs", B * c.fanout_total)
                        else:  # sum(conv2d(x != 0, W != 0)) = sum_i [x_i != 0] fanout_i
                            add(c.name, c.op_counter, torch.where(xin != 0, c.fanout, 0).sum())
                elif c.kind == "scale":
                    y = xin * p.get(c.name, c.scale)
                    if count:
                        add(c.name, "events_in", torch.count_nonzero(xin))
                elif c.kind in _NEURONS:
                    if fixed is not None:
                        not_integer.setdefault(c.name, []).append((xin != torch.round(xin)).any())
                        s, v, sat = fixed_point_step_torch(state[c.name], xin, c.threshold_int, c.decay_q12,
                                                           c.reset, fixed.state_bits)
                        state[c.name] = v
                        y = s.to(self.dtype) if c.spiking else v.to(self.dtype)
                    else:
                        y, state[c.name], s = self._neuron_float(c, xin, state[c.name])
                    if count:
                        add(c.name, "neuron_updates", B * c.in_size)
                        add(c.name, "active_neurons", torch.count_nonzero(xin))
                        if c.spiking:
                            add(c.name, "spikes_out", s.sum())
                        if fixed is not None:
                            add(c.name, "saturations", sat.sum())
                else:  # Output, or the Input / Output node of a nested graph: identity
                    y = xin
                out[c.name] = y
                if c.name in traces:
                    traces[c.name].append(y)

        for name, flags in not_integer.items():
            if bool(torch.stack(flags).any()):
                raise GraphError(f"node {name!r}: fixed-point mode got a non-integer input")

        def stack(name):
            return torch.stack(traces[name]).to(device="cpu", dtype=torch.float64).numpy()

        # one transfer for all the counts held on the device; the constant ones are Python ints
        tensors = [v for cs in counts.values() for vals in cs.values() for v in vals if isinstance(v, torch.Tensor)]
        host = iter(torch.stack(tensors).cpu().numpy().tolist()) if tensors else iter(())
        result_counts = {}
        for layer, cs in counts.items():
            result_counts[layer] = {}
            for counter, vals in cs.items():
                result_counts[layer][counter] = np.array(
                    [next(host) if isinstance(v, torch.Tensor) else v for v in vals], np.int64)
        return {
            "outputs": {name: stack(name) for name in self.program.outputs},
            "counts": result_counts,
            "records": {c.name: stack(c.name) for c in self.layers} if record else {},
        }
