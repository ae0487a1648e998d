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
from neurosdm.simulators.program import NEURONS, Layer, Program

__all__ = ["TorchEngine"]

_NEURONS = NEURONS
_CONVS = ("conv", "gconv")


def _fanout(weight: np.ndarray, in_shape: tuple[int, ...], stride, padding, dilation=(1, 1),
            groups: int = 1) -> torch.Tensor:
    """``F [Ci, H, W]`` int64: per input position, the nonzero weights connecting it to output positions inside
    the output map (the gradient of ``sum(conv2d(x, W != 0))`` with respect to ``x``; exact in float64).
    ``in_shape`` is ``(Ci, H, W)``, or ``(Ci, W)`` for a Conv1d stored as a height-1 Conv2d (the result then has
    the input's shape too)."""
    mask = torch.as_tensor(weight != 0, dtype=torch.float64)
    shape4 = tuple(in_shape) if len(in_shape) == 3 else (in_shape[0], 1, *in_shape[1:])
    x = torch.zeros((1, *shape4), dtype=torch.float64, requires_grad=True)
    (pt, pb), (pl, pr) = padding
    y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), mask, stride=tuple(stride), dilation=tuple(dilation), groups=groups)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return torch.round(grad[0]).to(torch.int64).reshape(in_shape)


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

        self.back = list(layer.back) if layer.back else [False] * len(self.sources)
        self.op_counter = {"spikes": "synops", "graded": "graded_ops"}.get(layer.input, "macs")
        if self.kind in _CONVS or self.kind == "pool":
            if self.kind == "pool":
                weight = np.ones((self.in_shape[0], 1, *layer.kernel))
                groups, dilation = self.in_shape[0], (1, 1)
                self.pool_scale = None if layer.pool_scale == 1.0 else float(layer.pool_scale)
                self.op_counter = "pool_adds"
            else:
                weight, groups, dilation = layer.weight, int(layer.groups), tuple(int(d) for d in layer.dilation)
                self.bias = t(layer.bias)
                self.rounded = bool(layer.rounded) and engine.fixed is not None
            self.weight = t(weight)
            self.groups, self.dilation = groups, dilation
            self.conv1d = self.kind == "gconv" and int(layer.nd) == 1
            self.stride = tuple(int(s) for s in layer.stride)
            (pt, pb), (pl, pr) = layer.padding
            if pt == pb and pl == pr:
                self.pad, self.conv_padding = None, (int(pt), int(pl))
            else:
                self.pad, self.conv_padding = (int(pl), int(pr), int(pt), int(pb)), (0, 0)
            fan = _fanout(weight, self.in_shape, self.stride, layer.padding, dilation, groups)
            self.fanout = fan.to(dev)
            self.fanout_total = int(fan.sum())
        elif self.kind == "affine":
            self.weight = t(layer.weight)
            self.bias = t(layer.bias)
            fan = torch.as_tensor((np.asarray(layer.weight) != 0).sum(axis=-2), dtype=torch.int64)
            self.fanout = fan.to(dev)  # [..., in]: the nonzero weights leaving each input element
            self.fanout_total = int(fan.sum())
        elif self.kind == "threshold":
            self.threshold = t(layer.threshold)
            self.ge = engine.program.disc.comparison == ">="
        elif self.kind == "delay":
            steps = np.asarray(layer.delay, np.int64) - (1 if layer.late else 0)
            self.index = torch.as_tensor(steps, device=dev)  # into the history, see _delay_read
            self.depth = int(np.asarray(layer.delay).max(initial=0)) + 1
            self.late = bool(layer.late)
        elif self.kind == "scale":
            self.scale = self._scalar_or_tensor(layer.scale, t)
        elif self.kind in _NEURONS:
            self.spiking = layer.spiking
            self.cuba = self.kind in ("cubali", "cubalif")
            if self.cuba:
                syn_decay = np.asarray(layer.syn_decay, np.float64)
                self.syn_decay = None if np.all(syn_decay == 1.0) else self._scalar_or_tensor(syn_decay, t)
                self.syn_gain = self._scalar_or_tensor(layer.syn_gain, t)
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

    def _conv(self, c: _Compiled, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Conv2d / Conv1d (as a height-1 Conv2d) / pool (a grouped conv with a ones kernel, ``bias`` None)."""
        if c.conv1d:
            x = x.unsqueeze(-2)
        if c.pad is not None:
            x = F.pad(x, c.pad)
        kw = dict(stride=c.stride, padding=c.conv_padding, dilation=c.dilation, groups=c.groups)
        if bias is not None and self.dtype == torch.float32 and self.fixed is None:
            y = F.conv2d(x, c.weight, bias, **kw)
        else:  # float64: the sum first, then the bias (the reference's order)
            y = F.conv2d(x, c.weight, None, **kw)
            if bias is not None:
                y = y + bias.view(-1, 1, 1)
                if c.rounded:
                    y = torch.round(y)
        return y.squeeze(-2) if c.conv1d else y

    def _neuron_float(self, c: _Compiled, x: torch.Tensor, state):
        if c.cuba:  # the synaptic current first, the membrane sees the updated current (the reference's order)
            i, v = state
            i = (i if c.syn_decay is None else c.syn_decay * i) + c.syn_gain * x
            y, v, s = self._membrane(c, i, v)
            return y, (i, v), s
        return self._membrane(c, x, state)

    def _membrane(self, c: _Compiled, x: torch.Tensor, v: torch.Tensor):
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

    @staticmethod
    def _delay_push(history: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Torch twin of :func:`neurosdm.simulators.reference.delay_push`: ``history[j]`` = the input ``j`` steps
        ago, ``x`` the newest."""
        return torch.cat([x.unsqueeze(0), history[:-1]]) if history.shape[0] > 1 else x.unsqueeze(0)

    @staticmethod
    def _delay_read(history: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Torch twin of :func:`neurosdm.simulators.reference.delay_read`: ``y[b, e] = history[index[e], b, e]``."""
        idx = index.expand(history.shape[2:]).unsqueeze(0).unsqueeze(0).expand(1, *history.shape[1:])
        return torch.gather(history, 0, idx)[0]

    # ------------------------------------------------------------------------------------------------ run

    def run(self, x, t: int = 0, record: bool = False, count: bool = True) -> dict:
        """One network call from a zero state.

        x: numpy array or tensor, the (already encoded) input of the Input layer: ``[B, *input_shape]``, the same
           at each of ``program.num_steps`` spiking steps (the denoiser path), or a time-varying sequence
           ``[T, B, *input_shape]`` (foreign graphs), which runs ``T`` steps; t: diffusion step (selects
           ``program.step_params(t)``); record: also return every layer's output; count: compute the counters
           (``counts`` is empty otherwise).

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
        n = len(self.input_shape)
        if xt.ndim == 1 + n and tuple(xt.shape[1:]) == self.input_shape:
            sequence, K = False, self.program.num_steps
        elif xt.ndim == 2 + n and tuple(xt.shape[2:]) == self.input_shape and xt.shape[0] >= 1:
            sequence, K = True, int(xt.shape[0])
        else:
            raise GraphError(f"input for Input node {self.input_name!r} has shape {tuple(xt.shape)}; expected "
                             f"[batch, *{self.input_shape}] (constant) or [steps, batch, *{self.input_shape}]")
        B = int(xt.shape[1] if sequence else xt.shape[0])
        params = self._params(t)
        fixed = self.fixed
        state: dict[str, object] = {}
        for c in self.layers:
            if c.kind in _NEURONS:
                shape = (B, *c.in_shape)
                zeros = torch.zeros(shape, dtype=torch.int64 if fixed is not None else self.dtype, device=self.device)
                state[c.name] = (zeros, zeros.clone()) if getattr(c, "cuba", False) else zeros
            elif c.kind == "delay":
                state[c.name] = torch.zeros((c.depth, B, *c.in_shape), dtype=self.dtype, device=self.device)
        recurrent = {src for c in self.layers for src, b in zip(c.sources, c.back) if b}
        prev: dict[str, torch.Tensor] = {name: torch.zeros((B, *self.program.by_name[name].out_shape),
                                                           dtype=self.dtype, device=self.device)
                                          for name in recurrent}
        wanted = set(self.program.outputs) | ({c.name for c in self.layers} if record else set())
        traces: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
        counts: dict[str, dict[str, list]] = {}
        not_integer: dict[str, list[torch.Tensor]] = {}

        def add(layer, counter, value):
            counts.setdefault(layer, {}).setdefault(counter, []).append(value)

        def dense_or_events(c, xin):
            """``sum_i [x_i != 0] F[i]`` (spike / graded input) or ``B sum_i F[i]`` (analog input)."""
            if c.op_counter == "macs" or (c.op_counter == "pool_adds" and c.layer.input == "analog"):
                add(c.name, c.op_counter, B * c.fanout_total)
            else:
                add(c.name, c.op_counter, torch.where(xin != 0, c.fanout, 0).sum())

        for k in range(K):
            p = params[min(k, len(params) - 1)]
            out: dict[str, torch.Tensor] = {}
            for c in self.layers:
                if c.name == self.input_name:  # (a nested graph's Input node is an identity, below)
                    y = xt[k] if sequence else xt
                    out[c.name] = y
                    if c.name in traces:
                        traces[c.name].append(y)
                    continue
                if c.kind == "delay" and c.late:  # from its history; its input is stored after the step
                    out[c.name] = y = self._delay_read(state[c.name], c.index)
                    if c.name in traces:
                        traces[c.name].append(y)
                    continue
                if c.sources:
                    vals = [prev[src] if b else out[src] for src, b in zip(c.sources, c.back)]
                    xin = vals[0]
                    for v in vals[1:]:
                        xin = xin + v
                else:
                    xin = torch.zeros((B, *c.in_shape), dtype=self.dtype, device=self.device)
                if count and len(c.sources) > 1:
                    add(c.name, "fanin_adds", (len(c.sources) - 1) * c.in_size * B)
                if c.kind in _CONVS:
                    y = self._conv(c, xin, p.get(c.name, c.bias))
                    if count:
                        add(c.name, "events_in", torch.count_nonzero(xin))
                        dense_or_events(c, xin)
                elif c.kind == "pool":
                    y = self._conv(c, xin, None)
                    if c.pool_scale is not None:
                        y = y * c.pool_scale
                    if count:
                        add(c.name, "events_in", torch.count_nonzero(xin))
                        dense_or_events(c, xin)
                elif c.kind == "affine":
                    y = torch.matmul(c.weight, xin.unsqueeze(-1)).squeeze(-1) + c.bias
                    if count:
                        add(c.name, "events_in", torch.count_nonzero(xin))
                        dense_or_events(c, xin)
                elif c.kind == "flatten":
                    y = xin.reshape(B, *c.out_shape)
                elif c.kind == "delay":  # some element delays by 0 steps: store, then read
                    state[c.name] = self._delay_push(state[c.name], xin)
                    y = self._delay_read(state[c.name], c.index)
                elif c.kind == "threshold":
                    s = xin >= c.threshold if c.ge else xin > c.threshold
                    y = s.to(self.dtype)
                    if count:
                        add(c.name, "neuron_updates", B * c.in_size)
                        add(c.name, "active_neurons", torch.count_nonzero(xin))
                        add(c.name, "spikes_out", s.sum())
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
            for c in self.layers:  # late Delays store this step's input (every source has run)
                if c.kind == "delay" and c.late:
                    xin = torch.zeros((B, *c.in_shape), dtype=self.dtype, device=self.device)
                    for src in c.sources:
                        xin = xin + out[src]
                    state[c.name] = self._delay_push(state[c.name], xin)
            for name in recurrent:
                prev[name] = out[name]

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
