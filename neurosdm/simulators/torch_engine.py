"""Clocked torch engine: a :class:`~neurosdm.graph.program.Program` run densely and batched with torch ops.

The step loop is :mod:`neurosdm.simulators.loop`'s; :class:`TorchBackend` holds its kernels: every layer is
computed for the whole batch at every spiking step (``F.conv2d``, the neuron step of :mod:`neurosdm.dynamics` on
tensors), on CPU or CUDA; the weights are moved to the device once. Counts are computed densely and exactly on the
device (``sum(fanout[x != 0])``) with one host transfer per call.

float64 (default) is the verification mode: float graphs agree with the reference to rounding (the bias is added
after the convolution sum, as the reference does), integer graphs bit for bit (their convolutions are exact in
float64, so ``dtype`` must be float64; convs in ``round_nodes`` round half to even). float32 (float graphs only) is
the fast mode; on CUDA it runs convolutions in IEEE float32, TF32 off (``allow_tf32``), so it stays within float32
rounding of the reference (up to spike flips where a membrane lies within that rounding of its threshold).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from neurosdm.dynamics import fixed_point_step, neuron_update
from neurosdm.errors import ConfigError
from neurosdm.graph.program import Layer, Program
from neurosdm.simulators.backend import Engine

__all__ = ["TorchEngine", "TorchBackend"]


def _scalar_or_tensor(a, t):
    """A Python float where every element is the same (cheaper, and the same arithmetic), else a tensor."""
    a = np.asarray(a, np.float64)
    if a.size and np.all(a == a.reshape(-1)[0]):
        return float(a.reshape(-1)[0])
    return t(a)


class _Prepared:
    """One layer's device tensors."""

    def __init__(self, layer: Layer, be: "TorchBackend"):
        t = be.tensor
        if layer.fanout is not None:
            self.fanout = torch.as_tensor(layer.fanout, device=be.device)
        if layer.kind in ("conv", "gconv", "pool"):
            if layer.kind == "pool":
                c = layer.in_shape[0]
                self.weight, self.groups, self.dilation = (t(np.ones((c, 1, *layer.kernel))), 1.0), c, (1, 1)
            else:
                self.weight, self.groups, self.dilation = be.stored(layer), int(layer.groups), \
                    tuple(layer.dilation)
                self.bias = t(layer.bias)
            self.conv1d = layer.kind == "gconv" and int(layer.nd) == 1
            self.stride = tuple(int(s) for s in layer.stride)
            (pt, pb), (pl, pr) = layer.padding
            if pt == pb and pl == pr:
                self.pad, self.conv_padding = None, (int(pt), int(pl))
            else:
                self.pad, self.conv_padding = (int(pl), int(pr), int(pt), int(pb)), (0, 0)
        elif layer.kind == "affine":
            self.weight, self.bias = be.stored(layer), t(layer.bias)
        elif layer.kind == "threshold":
            self.threshold = t(layer.threshold)
        elif layer.kind == "delay":
            steps = np.asarray(layer.delay, np.int64)
            self.index = torch.as_tensor(steps.copy(), device=be.device)
            self.late_index = torch.as_tensor(steps - 1, device=be.device)
        elif layer.kind == "scale":
            self.scale = _scalar_or_tensor(layer.scale, t)
        elif layer.neuron is not None:
            self.neuron = layer.neuron.map(lambda a: _scalar_or_tensor(a, t))
        elif layer.threshold_int is not None:
            thr = layer.threshold_int
            self.threshold_int = torch.as_tensor(thr, device=be.device) if isinstance(thr, np.ndarray) else thr


class TorchBackend:
    """Dense torch kernels (interface: :mod:`neurosdm.simulators.backend`)."""

    name = "torch"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 allow_tf32: bool = False):
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.allow_tf32 = bool(allow_tf32)

    def tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=self.dtype, device=self.device)

    def stored(self, layer: Layer) -> tuple[torch.Tensor, float]:
        """A layer's weights on the device as the program stores them (``(mantissas, power-of-two scale)``: int8
        for an int8 graph, one byte each), widened to the engine's dtype layer by layer when used; weights as wide
        as the engine's dtype or wider are converted once here."""
        a = np.ascontiguousarray(layer.weight)
        if a.dtype.kind == "f" and a.dtype.itemsize >= torch.empty((), dtype=self.dtype).element_size():
            return self.tensor(layer.dense_weight()), 1.0
        self.widen_size = max(self.widen_size, a.size)
        return torch.as_tensor(a, device=self.device), float(layer.weight_scale)

    def widen(self, stored: tuple[torch.Tensor, float]) -> torch.Tensor:
        """Stored weights in the engine's dtype (exact: at most 16-bit mantissas, or float32 values, times a power
        of two): as they are, or written into one scratch buffer shared by the layers (one layer's weights at a
        time; no allocation per call, so nothing fragments the heap)."""
        weight, scale = stored
        if weight.dtype == self.dtype and scale == 1.0:
            return weight
        if self.scratch.numel() < weight.numel():
            self.scratch = torch.empty(self.widen_size, dtype=self.dtype, device=self.device)
        w = self.scratch[:weight.numel()].view(weight.shape).copy_(weight)
        return w.mul_(scale) if scale != 1.0 else w

    def prepare(self, program: Program) -> None:
        self.fixed = program.fixed
        self.strict = program.disc.strict
        if self.fixed is not None and self.dtype != torch.float64:
            raise ConfigError(f"this is a fixed-point (quantised) graph: run it with dtype=torch.float64, not "
                              f"{self.dtype}; its integer convolutions are exact in float64 (integers below 2**53) "
                              "but not in float32 (24-bit mantissa: the 24-bit neuron states and the sums of 8-bit "
                              "weights times them would be rounded), and it must match the reference bit for bit")
        self.widen_size, self.scratch = 0, torch.empty(0, dtype=self.dtype, device=self.device)
        self.layers = {layer.name: _Prepared(layer, self) for layer in program.layers}

    @contextlib.contextmanager
    def running(self):
        old = torch.backends.cudnn.allow_tf32
        if self.device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = self.allow_tf32
        try:
            with torch.no_grad():
                yield
        finally:
            torch.backends.cudnn.allow_tf32 = old

    # -------------------------------------------------------------------------------------------- arrays
    def input(self, x) -> torch.Tensor:
        return torch.as_tensor(x).to(device=self.device, dtype=self.dtype)

    def zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def neuron_state(self, layer: Layer, batch: int):
        dtype = torch.int64 if self.fixed is not None else self.dtype
        zeros = torch.zeros((batch, *layer.in_shape), dtype=dtype, device=self.device)
        return (zeros, zeros.clone()) if layer.kind in ("cubali", "cubalif") else zeros

    def reshape(self, x, shape):
        return x.reshape(shape)

    def as_float(self, s):
        return s.to(self.dtype)

    def nnz(self, x):
        return torch.count_nonzero(x)

    def weighted_nnz(self, x, layer: Layer):
        return torch.where(x != 0, self.layers[layer.name].fanout, 0).sum()

    def not_integer(self, x):
        return (x != torch.round(x)).any()

    def params(self, step_params: list) -> list:
        out = []
        for p in step_params:
            d = {}
            for name, over in p.items():
                if "bias" in over:
                    d[name] = {"bias": self.tensor(np.asarray(over["bias"], np.float64))}
                elif "scale" in over:
                    d[name] = {"scale": _scalar_or_tensor(over["scale"], self.tensor)}
            out.append(d)
        return out

    def to_host(self, values: list) -> list:
        """Python ints (and bools) for a list of counts held on the device or on the host: one transfer."""
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        host = iter(torch.stack([v.to(torch.int64) for v in tensors]).cpu().tolist()) if tensors else iter(())
        return [next(host) if isinstance(v, torch.Tensor) else v for v in values]

    def stack(self, trace: list, empty_shape) -> np.ndarray:
        if not trace:
            return np.zeros(empty_shape)
        return torch.stack(trace).to(device="cpu", dtype=torch.float64).numpy()

    # ------------------------------------------------------------------------------------------- kernels
    def _conv(self, c: _Prepared, x, bias, rounded: bool = False):
        """Conv2d / Conv1d (as a height-1 Conv2d) / pool (a grouped conv with a ones kernel, ``bias`` None)."""
        if c.conv1d:
            x = x.unsqueeze(-2)
        if c.pad is not None:
            x = F.pad(x, c.pad)
        kw = dict(stride=c.stride, padding=c.conv_padding, dilation=c.dilation, groups=c.groups)
        w = self.widen(c.weight)
        if bias is not None and self.dtype == torch.float32 and self.fixed is None:
            y = F.conv2d(x, w, bias, **kw)
        else:  # float64: the sum first, then the bias (the reference's order)
            y = F.conv2d(x, w, None, **kw)
            if bias is not None:
                y = y + bias.view(-1, 1, 1)
                if rounded:
                    y = torch.round(y)
        return y.squeeze(-2) if c.conv1d else y

    def conv(self, layer: Layer, x, bias, count: bool = True):
        c = self.layers[layer.name]
        return self._conv(c, x, c.bias if bias is None else bias, layer.rounded and self.fixed is not None), None

    def upsample(self, layer: Layer, x):
        sh, sw = layer.scale_factor
        return x.repeat_interleave(sh, dim=-2).repeat_interleave(sw, dim=-1)

    def pool(self, layer: Layer, x):
        y = self._conv(self.layers[layer.name], x, None)
        return y if layer.pool_scale == 1.0 else y * float(layer.pool_scale)

    def affine(self, layer: Layer, x):
        c = self.layers[layer.name]
        return torch.matmul(self.widen(c.weight), x.unsqueeze(-1)).squeeze(-1) + c.bias

    def scale(self, layer: Layer, x, scale):
        return x * (self.layers[layer.name].scale if scale is None else scale)

    def threshold(self, layer: Layer, x):
        thr = self.layers[layer.name].threshold
        return x > thr if self.strict else x >= thr

    def neuron(self, layer: Layer, x, state):
        return neuron_update(self.layers[layer.name].neuron, x, state)

    def fixed_neuron(self, layer: Layer, x, state):
        s, v, sat = fixed_point_step(state, x.to(torch.int64), self.layers[layer.name].threshold_int,
                                     layer.decay_q12, layer.reset, self.fixed.state_bits)
        if layer.kind == "if":
            return s.to(self.dtype), v, s, sat
        return v.to(self.dtype), v, None, sat

    def delay_push(self, history, x):
        """``history[j]`` = the input ``j`` steps ago, ``x`` the newest."""
        return torch.cat([x.unsqueeze(0), history[:-1]]) if history.shape[0] > 1 else x.unsqueeze(0)

    def delay_read(self, history, layer: Layer, late: bool):
        """``y[b, e] = history[index[e], b, e]``."""
        c = self.layers[layer.name]
        index = c.late_index if late else c.index
        idx = index.expand(history.shape[2:]).unsqueeze(0).unsqueeze(0).expand(1, *history.shape[1:])
        return torch.gather(history, 0, idx)[0]


class TorchEngine(Engine):
    """Dense, batched, clocked engine for a program (module docstring).

    device: ``"cpu"``, ``"cuda"``, ... (weights are moved there once). dtype: ``torch.float64`` (default; required
    for fixed-point graphs) or ``torch.float32`` (float graphs). allow_tf32: let cuDNN use TF32 for float32
    convolutions on CUDA (faster, ~1e-3 relative error; default off)."""

    name = "torch"

    def __init__(self, program: Program, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                 allow_tf32: bool = False):
        super().__init__(program, TorchBackend(device, dtype, allow_tf32))

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype
