"""Lava's own simulator (lava-nc, lava-dl's netx) run on neurosdm's data, for the bit-exactness cross-checks
(docs/lava.md; ``make lava``, ``scripts/lava_compare.py``, tests/test_lava.py).

These functions run inside the separate Python 3.10 environment that Lava needs (``scripts/lava_env.sh``), where
neither torch nor nir are installed: this module imports numpy and the error types only, and Lava inside the
functions (an optional dependency). neurosdm's side of the comparison, in Lava's units, is
:func:`neurosdm.loihi.run_in_lava_units`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurosdm.errors import ConfigError

__all__ = ["lava_lif_run", "netx_run"]


def lava_lif_run(a: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    """Lava's bit-accurate LIF on ``a [T, B, C, H, W]`` (int): ``(spikes bool [T, ...], v int64 [T, ...])``,
    ``v`` read after every step. ``params``: anything with ``du, dv, vth, bias_mant [B, C], bias_exp``
    (a :class:`neurosdm.loihi.LoihiParams`)."""
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi1SimCfg
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source
    from lava.proc.lif.process import LIF

    T = a.shape[0]
    shape = a.shape[1:]
    bias = np.broadcast_to(np.asarray(params.bias_mant)[..., None, None], shape).astype(np.int32)  # [B, C] -> all
    src = Source(data=np.moveaxis(a.astype(np.int32), 0, -1))
    lif = LIF(shape=shape, du=params.du, dv=params.dv, vth=params.vth, bias_mant=bias, bias_exp=params.bias_exp)
    sink = Sink(shape=shape, buffer=T)
    src.s_out.connect(lif.a_in)
    lif.s_out.connect(sink.a_in)
    cfg = Loihi1SimCfg(select_tag="fixed_pt")
    vs = []
    try:
        for _ in range(T):
            lif.run(condition=RunSteps(num_steps=1), run_cfg=cfg)
            vs.append(np.asarray(lif.v.get()).astype(np.int64))
        s = np.moveaxis(np.asarray(sink.data.get()), -1, 0).astype(bool)
    finally:
        lif.stop()
    return s, np.stack(vs)


def netx_run(net_file: Path, spikes: np.ndarray, num_steps: int, reset: bool = True) -> list[np.ndarray]:
    """Run the netx file on input spikes ``[T, B, C, H, W]`` (images back to back); returns per layer the spikes
    ``[T, B, C, H, W]`` aligned with neurosdm's steps (layer ``l`` shifted back by ``l`` steps). ``reset=False``
    (the negative control) runs without netx's staggered reset."""
    from lava.lib.dl import netx
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi1SimCfg
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source

    T, B = spikes.shape[:2]
    if T != num_steps:
        raise ConfigError(f"input has {T} steps, the export {num_steps}")
    net = netx.hdf5.Network(net_config=str(net_file), reset_interval=num_steps if reset else None,
                            reset_offset=1 if reset else 0)
    L = len(net.layers)
    total = B * T + L
    seq = np.zeros((B * T + L, *spikes.shape[2:]), np.int32)
    seq[:B * T] = spikes.transpose(1, 0, 2, 3, 4).reshape(B * T, *spikes.shape[2:])
    data = seq.transpose(3, 2, 1, 0)  # [W, H, C, time]: netx's (x, y, z) order, time last
    src = Source(data=data)
    src.s_out.connect(net.inp)
    sinks = []
    for layer in net.layers:
        sink = Sink(shape=layer.out.shape, buffer=total)
        layer.out.connect(sink.a_in)
        sinks.append(sink)
    try:
        net.run(condition=RunSteps(num_steps=total), run_cfg=Loihi1SimCfg(select_tag="fixed_pt"))
        outs = [np.asarray(s.data.get()) for s in sinks]  # [W, H, C, total]
    finally:
        net.stop()
    aligned = []
    for l, o in enumerate(outs, start=1):
        o = o.transpose(3, 2, 1, 0)[l:l + B * T]  # [B*T, C, H, W]; Lava step l+1.. is neurosdm's step 1..
        aligned.append(o.reshape(B, T, *o.shape[1:]).transpose(1, 0, 2, 3, 4).astype(bool))
    return aligned
