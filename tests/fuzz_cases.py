"""Generators of hostile command lines for the fuzz suite (issue 17), shared by ``tests/test_fuzz_cli.py`` (the short,
property-based profile: hypothesis draws the choices) and ``scripts/fuzz_long.py`` (the long profile: a seeded
``random.Random`` draws them). A plain helper module, not a test module.

A generator ``gen_<category>(pick, fx, work)`` writes the files of one case into the empty folder ``work`` (from the
base files ``fx`` of :func:`make_fixtures`) and returns a :class:`Case`: the command line, the outputs it may write,
and how it must run (in this process, or in a child process under a memory cap, a file size limit, a signal or a
timeout). :func:`judge` reads what happened and names every failure: a traceback, a message that is not one
``error:`` line, a crash, a hang, a memory blow-up, a stray or half-written file, a NaN in an output.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nir
import numpy as np
import torch

from conftest import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("checkpoint", "checkpoint_bytes", "nir", "nir_h5", "profile", "array", "argument", "output",
              "signal", "full_disk", "memory", "hang")
CHILD_CATEGORIES = ("checkpoint_bytes", "nir_h5", "signal", "full_disk", "memory", "hang")  # never in-process
RSS_LIMIT = 2 << 30  # resident memory above this for a refused input is a memory blow-up
ENV = {"NEUROSDM_COMPILE": "0", "NEUROSDM_MEMORY_LIMIT_GB": "2"}  # the fuzz runs' environment

NUMBERS = [None, True, 0, -1, 1, 2, 3, 2 ** 31, 2 ** 63, 10 ** 9, -10 ** 9, 0.0, -0.5, 0.5, 1e300, -1e300,
           float("nan"), float("inf"), -float("inf"), 1e-320]
OTHERS = ["", "x", "24", [], [1, 2], [[1]], {}, {"a": 1}, {"a": "x"}, (1,)]
BIG = [4096, 4097, 2048, 65536, 10 ** 6, 10 ** 9]  # sizes in range or just beyond: only in child processes
INTS = ["0", "-1", "1", "2", "abc", "1e3", "nan", "", "99999999999999999999", str(10 ** 9), "4097", "3"]
FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e308", "abc", "1", "0.5", "1e-320", ""]
WORDS = ["", "bogus", "ddim", "ddpm", "dpm-solver", "analytic-ddim", "cuda", "cuda:0", "cuda:99", "cpu", "mps",
         "event", "torch", "euler", "exp", "zero", "subtract", ">=", ">", "loihi2", "truenorth", "x" * 300]


class Pick:
    """The choices of a generator, drawn by hypothesis (``data``: ``st.data()``'s object) or by ``random.Random``
    (``rng``)."""

    def __init__(self, rng=None, data=None):
        self.rng, self.data = rng, data

    def choice(self, seq):
        seq = list(seq)
        if self.data is not None:
            from hypothesis import strategies as st

            return seq[self.data.draw(st.integers(0, len(seq) - 1))]
        return seq[self.rng.randrange(len(seq))]

    def integer(self, lo: int, hi: int) -> int:
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.integers(lo, hi))
        return self.rng.randint(lo, hi)

    def chance(self, percent: int) -> bool:
        return self.integer(0, 99) < percent


@dataclass
class Case:
    category: str
    argv: list
    outputs: list = field(default_factory=list)  # may appear only complete (exit 0) or not at all / unchanged
    child: bool = False  # run in a child process (memory cap, file size limit, signal, timeout)
    fsize: int | None = None  # RLIMIT_FSIZE in bytes
    signal: tuple | None = None  # (signal number, seconds after the start)
    timeout: float = 120.0
    refused: bool = False  # an input that must be refused: the RSS bound applies
    note: str = ""
    before: dict = field(default_factory=dict)  # outputs that existed before: their bytes


@dataclass
class Outcome:
    code: int | None  # exit status; None: killed by a signal or timed out
    stdout: str
    stderr: str
    escaped: str = ""  # an exception that left cli.main (a traceback)
    killed_by: int | None = None  # the signal that ended a child we did not signal
    timed_out: bool = False
    max_rss: int = 0  # bytes (child processes)


# ---------------------------------------------------------------------------------------------- base files


def make_fixtures(folder: Path) -> dict:
    """The base files every case starts from: two tiny checkpoints, their float exports, an int8 export, a foreign
    graph with its input, a stats.json of a simulation and the loihi2 profile's text."""
    from neurosdm import cli
    from neurosdm.exporters.pipeline import export_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fx = {"dir": folder}
    for head in ("spiking", "sdm"):
        fx[f"{head}.pt"] = tiny_checkpoint(folder / f"{head}.pt", head=head)
        fx[f"{head}.nir"] = export_checkpoint(fx[f"{head}.pt"], folder / f"{head}.nir")
    fx["int8.nir"] = export_checkpoint(fx["sdm.pt"], folder / "int8.nir", quantize="int8", calibration="builtin",
                                       calibration_images=4)
    lif = nir.LIF(tau=np.full(2, 2.0), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.ones(2), v_reset=np.zeros(2))
    graph = nir.NIRGraph(nodes={"input": nir.Input(np.array([3])), "fc": nir.Affine(np.ones((2, 3)), np.zeros(2)),
                                "lif": lif, "output": nir.Output(np.array([2]))},
                         edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")])
    nir.write(folder / "foreign.nir", graph)
    fx["foreign.nir"] = folder / "foreign.nir"
    np.save(folder / "x.npy", np.ones((4, 1, 3), dtype=np.float32))
    fx["x.npy"] = folder / "x.npy"
    code, _, err, escaped = run_in_process(["simulate", fx["spiking.nir"], "--num-images", 1, "--steps", 1, "--out",
                                            folder / "sim"])
    assert code == 0, (err, escaped)
    fx["stats.json"] = folder / "sim" / "stats.json"
    fx["profile"] = (ROOT / "neurosdm" / "hw_profiles" / "loihi2.toml").read_text()
    return fx


# ----------------------------------------------------------------------------------------------- mutations


def hostile_tensor(pick: Pick, t: torch.Tensor):
    kind = pick.choice(["1-D", "0-D", "shape+1", "NaN", "Inf", "complex", "int", "half", "bool", "empty",
                        "expanded", "huge value", "string", "list"])
    if kind == "1-D":
        return t.reshape(-1)[:1].clone()
    if kind == "0-D":
        return torch.tensor(1.0)
    if kind == "shape+1":
        return torch.zeros(*[s + 1 for s in t.shape]) if t.dim() else torch.zeros(2)
    if kind in ("NaN", "Inf", "huge value"):
        w = t.clone().float()
        if w.numel():
            w.view(-1)[pick.integer(0, w.numel() - 1)] = {"NaN": math.nan, "Inf": -math.inf, "huge value": 3e38}[kind]
        return w
    if kind == "complex":
        return t.to(torch.complex64)
    if kind == "int":
        return t.to(torch.int64)
    if kind == "half":
        return t.to(torch.float16)
    if kind == "bool":
        return t.to(torch.bool)
    if kind == "empty":
        return torch.zeros(0)
    if kind == "expanded":  # 10^9 elements declared, 4 bytes stored
        return torch.zeros(1).expand(100000, 10000)
    return "weights" if kind == "string" else [1.0, 2.0]


def checkpoint_paths(obj: dict) -> list[tuple]:
    paths = [(k,) for k in obj]
    config = obj.get("config")
    for section in ("model", "diffusion", "train"):
        if isinstance(config, dict) and isinstance(config.get(section), dict):
            paths += [("config", section, k) for k in config[section]] + [("config", section)]
    for sd in ("ema", "model"):
        if isinstance(obj.get(sd), dict):
            keys = list(obj[sd])
            paths += [(sd, k) for k in keys[:6] + keys[-4:] + [k for k in keys if k.endswith("running_var")][:2]]
    return paths


def mutate_checkpoint(pick: Pick, obj: dict, values: list) -> str:
    notes = []
    for _ in range(pick.integer(1, 3)):
        path = pick.choice(checkpoint_paths(obj))
        parent = obj
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        old = parent[path[-1]]
        if pick.chance(15):
            del parent[path[-1]]
            notes.append(f"del {'.'.join(path)}")
            continue
        new = hostile_tensor(pick, old) if isinstance(old, torch.Tensor) else pick.choice(values)
        parent[path[-1]] = new
        notes.append(f"{'.'.join(path)}={_short(new)}")
    return "; ".join(notes)


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}:{value.dtype}"
    return repr(value)[:40]


def mutate_bytes(pick: Pick, data: bytes) -> tuple[bytes, str]:
    kind = pick.choice(["flip", "flip", "truncate", "empty", "garbage", "prefix", "zero block"])
    data = bytearray(data)
    if kind == "flip":
        i = pick.integer(0, len(data) - 1)
        data[i] ^= 1 << pick.integer(0, 7)
        return bytes(data), f"flip byte {i}"
    if kind == "truncate":
        n = pick.integer(0, len(data) - 1)
        return bytes(data[:n]), f"truncate to {n}"
    if kind == "empty":
        return b"", "empty"
    if kind == "garbage":
        return bytes(pick.integer(0, 255) for _ in range(pick.integer(1, 64))), "garbage"
    if kind == "prefix":
        return b"\x00garbage" + bytes(data), "prefix"
    i = pick.integer(0, len(data) - 1)
    data[i:i + 512] = bytes(len(data[i:i + 512]))
    return bytes(data), f"zero 512 bytes at {i}"


def hostile_array(pick: Pick, a: np.ndarray) -> np.ndarray:
    kind = pick.choice(["NaN", "Inf", "zero", "negative", "wrong shape", "flat", "complex", "empty", "scalar", "int",
                        "huge", "bool", "extra dim"])
    a = np.asarray(a)
    if kind in ("NaN", "Inf", "huge") and a.size:
        b = a.astype(np.float64).copy()
        b.reshape(-1)[pick.integer(0, b.size - 1)] = {"NaN": np.nan, "Inf": np.inf, "huge": 1e300}[kind]
        return b
    return {"zero": lambda: np.zeros_like(a), "negative": lambda: -np.abs(a) - 1.0,
            "wrong shape": lambda: np.zeros([s + 1 for s in a.shape] or [2]), "flat": lambda: a.reshape(-1),
            "complex": lambda: a.astype(np.complex128) * (1 + 1j), "empty": lambda: np.zeros((0,)),
            "scalar": lambda: np.array(1.0), "int": lambda: a.astype(np.int64), "bool": lambda: a.astype(bool),
            "extra dim": lambda: a[None]}.get(kind, lambda: a * np.nan)()


def mutate_graph(pick: Pick, graph: nir.NIRGraph, values: list) -> str:
    notes = []
    for _ in range(pick.integer(1, 3)):
        kind = pick.choice(["metadata", "metadata", "param", "param", "param", "drop node", "drop edge",
                            "dangling edge", "swap node"])
        if kind == "metadata" and graph.metadata:
            key = pick.choice(sorted(graph.metadata))
            if pick.chance(20):
                graph.metadata.pop(key)
                notes.append(f"del metadata {key}")
            else:
                old = graph.metadata[key]
                graph.metadata[key] = hostile_array(pick, old) if isinstance(old, np.ndarray) else pick.choice(values)
                notes.append(f"metadata {key}={_short(graph.metadata[key])}")
        elif kind == "param":
            name = pick.choice(sorted(graph.nodes))
            node = graph.nodes[name]
            arrays = [k for k, v in vars(node).items() if isinstance(v, np.ndarray)]
            if arrays:
                attr = pick.choice(sorted(arrays))
                setattr(node, attr, hostile_array(pick, getattr(node, attr)))
                notes.append(f"{name}.{attr}")
        elif kind == "drop node":
            name = pick.choice(sorted(graph.nodes))
            graph.nodes.pop(name)
            notes.append(f"drop node {name}")
        elif kind == "drop edge" and graph.edges:
            edge = pick.choice(graph.edges)
            graph.edges = [e for e in graph.edges if e != edge]
            notes.append(f"drop edge {edge}")
        elif kind == "dangling edge":
            graph.edges = list(graph.edges) + [(pick.choice(sorted(graph.nodes)), "nowhere")]
            notes.append("dangling edge")
        elif kind == "swap node":
            name = pick.choice(sorted(graph.nodes))
            graph.nodes[name] = pick.choice([nir.Output(np.array([3])), nir.Input(np.array([1, 8, 8])),
                                             nir.Flatten(start_dim=0, end_dim=-1, input_type={"input": np.array([2])}),
                                             nir.Delay(np.ones(2)), nir.Threshold(np.ones(2))])
            notes.append(f"swap node {name}")
    return "; ".join(notes)


# ------------------------------------------------------------------------------------------------ commands


def _checkpoint_command(pick: Pick, path: Path, work: Path) -> tuple[list, list]:
    kind = pick.choice(["info", "export", "export", "sample"])
    if kind == "info":
        return ["info", path], []
    if kind == "export":
        return ["export", path, "--to", "nir", "-o", work / "out.nir"], [work / "out.nir"]
    return ["sample", path, "--num-images", 1, "--steps", 1, "--out", work / "s"], [work / "s"]


def _graph_command(pick: Pick, path: Path, foreign: bool, work: Path, fx: dict) -> tuple[list, list]:
    kind = pick.choice(["simulate", "simulate", "inspect", "energy"])
    if kind == "inspect":
        return ["inspect", path], []
    if foreign:
        extra = ["--input", fx["x.npy"]]
        if kind == "energy":
            return ["energy", path, *extra, "--json"], []
        return ["simulate", path, *extra, "--out", work / "sim"], [work / "sim"]
    if kind == "energy":
        return ["energy", path, "--steps", 1, "--num-images", 1], []
    engine = pick.choice(["event", "torch"])
    return ["simulate", path, "--num-images", 1, "--steps", 1, "--engine", engine, "--out", work / "sim"], \
        [work / "sim"]


# ---------------------------------------------------------------------------------------------- generators


def gen_checkpoint(pick: Pick, fx: dict, work: Path) -> Case:
    obj = torch.load(fx[pick.choice(["spiking.pt", "sdm.pt"])], weights_only=True)
    note = mutate_checkpoint(pick, obj, NUMBERS + OTHERS)
    path = work / "ckpt.pt"
    torch.save(obj, path)
    argv, outputs = _checkpoint_command(pick, path, work)
    return Case("checkpoint", argv, outputs, note=note)


def gen_checkpoint_bytes(pick: Pick, fx: dict, work: Path) -> Case:
    data, note = mutate_bytes(pick, fx[pick.choice(["spiking.pt", "sdm.pt"])].read_bytes())
    (work / "ckpt.pt").write_bytes(data)
    argv, outputs = _checkpoint_command(pick, work / "ckpt.pt", work)
    return Case("checkpoint_bytes", argv, outputs, child=True, note=note)


def gen_nir(pick: Pick, fx: dict, work: Path) -> Case:
    source = pick.choice(["spiking.nir", "sdm.nir", "int8.nir", "foreign.nir"])
    graph = nir.read(fx[source])
    note = mutate_graph(pick, graph, NUMBERS + OTHERS)
    path = work / "g.nir"
    try:
        nir.write(path, graph)
    except Exception as e:  # nir cannot write it: the file holds what could be written
        note += f" (nir.write failed: {type(e).__name__})"
        if not path.exists():
            shutil.copy(fx[source], path)
    argv, outputs = _graph_command(pick, path, source == "foreign.nir", work, fx)
    return Case("nir", argv, outputs, note=f"{source}: {note}")


def gen_nir_h5(pick: Pick, fx: dict, work: Path) -> Case:
    """Edits below nir's reader: datasets declared huge (stored lazily), retyped, removed; node types renamed;
    bytes flipped."""
    source = pick.choice(["spiking.nir", "int8.nir", "foreign.nir"])
    path = work / "g.nir"
    shutil.copy(fx[source], path)
    if pick.chance(25):
        data, note = mutate_bytes(pick, path.read_bytes())
        path.write_bytes(data)
    else:
        with h5py.File(path, "r+") as f:
            datasets = []
            f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
            name = pick.choice(sorted(datasets))
            kind = pick.choice(["huge", "huge", "string", "delete", "type", "scalar"])
            parent, leaf = name.rsplit("/", 1) if "/" in name else ("", name)
            group = f[parent] if parent else f
            if kind == "type" and "type" in group:
                del group["type"]
                group["type"] = pick.choice(["Bogus", "", "Conv2d", "Affine"])
            else:
                del group[leaf]
                if kind == "huge":
                    group.create_dataset(leaf, shape=(pick.choice([50000, 10 ** 6]), 50000), dtype="f8")
                elif kind == "string":
                    group[leaf] = "text"
                elif kind == "scalar":
                    group[leaf] = np.float64(np.nan)
            note = f"{kind} {name}"
    argv, outputs = _graph_command(pick, path, source == "foreign.nir", work, fx)
    return Case("nir_h5", argv, outputs, child=True, note=f"{source}: {note}")


def gen_profile(pick: Pick, fx: dict, work: Path) -> Case:
    lines = fx["profile"].splitlines()
    path = work / "p.toml"
    kind = pick.choice(["value", "value", "value", "delete line", "garbage line", "truncate", "bytes", "latin-1",
                        "directory", "empty", "unknown key"])
    note = kind
    if kind == "value":
        idx = [i for i, line in enumerate(lines) if line.strip().startswith("value")]
        for _ in range(pick.integer(1, 3)):
            i = pick.choice(idx)
            lines[i] = "value = " + pick.choice(["nan", "inf", "-inf", "-1", "0", "1e308", '"x"', "[]", "{}", "true",
                                                 "1e-320", "-0.0", "0x10", "[1, 2]", "9" * 400])
            note += f" line {i}: {lines[i][:30]}"
    elif kind == "delete line":
        lines.pop(pick.integer(0, len(lines) - 1))
    elif kind == "garbage line":
        lines.insert(pick.integer(0, len(lines)), pick.choice(["[[[", "x = ", "= 1", "[energy]", "value = 1",
                                                               "cores = -3", "name = 5"]))
    elif kind == "unknown key":
        lines.insert(pick.integer(0, len(lines)), "colour = 1")
    text = "\n".join(lines)
    if kind == "truncate":
        text = text[:pick.integer(0, len(text))]
    if kind == "directory":
        path.mkdir()
    elif kind == "bytes":
        path.write_bytes(bytes(pick.integer(0, 255) for _ in range(pick.integer(1, 200))))
    elif kind == "latin-1":
        path.write_bytes(text.replace("Loihi", "L\u00f6ihi").encode("latin-1", "replace"))
    elif kind == "empty":
        path.write_text("")
    else:
        path.write_text(text)
    role = pick.choice(["--profile", "--profile", "--baseline", "--host"])
    argv = ["energy", fx["stats.json"], "--graph", fx["spiking.nir"], role, path]
    if pick.chance(30):
        argv.append(pick.choice(["--json", "--csv"]))
    return Case("profile", argv, note=f"{role} {note}")


def gen_array(pick: Pick, fx: dict, work: Path) -> Case:
    good = np.ones((4, 1, 3), dtype=np.float32)
    kind = pick.choice(["npy", "npy", "npy", "npz", "bytes", "header", "object", "strings", "directory", "gamma"])
    path = work / ("in.npz" if kind in ("npz", "gamma") else "in.npy")
    note = kind
    if kind == "npy":
        a = pick.choice([good, good[:, 0], good[0, 0], good.reshape(-1), good[None], np.zeros((0, 1, 3)),
                         np.ones((4, 2, 3)), np.ones((4, 1, 4)), np.ones((4000, 1, 3)), np.array(1.0)])
        a = hostile_array(pick, a) if pick.chance(60) else a
        a = a.astype(pick.choice([np.float32, np.float64, np.float16, np.int8, np.int64, bool, np.complex64,
                                  a.dtype]))
        np.save(path, a)
        note = f"npy {a.shape} {a.dtype}"
    elif kind == "npz":
        keys = pick.choice([["x"], ["input"], ["a", "b"], [], ["arr_0"]])
        np.savez(path, **{k: hostile_array(pick, good) for k in keys})
        note = f"npz keys {keys}"
    elif kind == "bytes":
        np.save(path, good)
        data, note = mutate_bytes(pick, path.read_bytes())
        path.write_bytes(data)
    elif kind == "header":  # a header that declares far more than the file holds
        np.save(path, good)
        data = path.read_bytes().replace(b"(4, 1, 3)", pick.choice([b"(400000000, 1, 3)", b"(4, 100000, 100000)",
                                                                      b"(-4, 1, 3)", b"(4, 1, 3, 0)"]), 1)
        path.write_bytes(data)
    elif kind == "object":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "strings":
        np.save(path, np.array([["a", "b", "c"]] * 4))
    elif kind == "directory":
        path.mkdir()
    if kind == "gamma":
        names = pick.choice([["timesteps", "gamma"], ["timesteps"], ["gamma"], ["t", "g"]])
        arrays = {"timesteps": pick.choice([np.arange(1), np.arange(50), np.array([-1]), np.array([1.5]),
                                           np.array([10 ** 12])]),
                  "gamma": hostile_array(pick, np.ones(pick.choice([1, 50])))}
        np.savez(path, **{n: arrays.get(n, np.ones(1)) for n in names})
        argv = ["sample", fx["spiking.pt"], "--sampler", pick.choice(["analytic-ddim", "analytic-ddpm"]), "--steps", 1,
                "--num-images", 1, "--gamma", path, "--out", work / "s"]
        return Case("array", argv, [work / "s"], note=f"gamma {names}")
    engine = pick.choice(["torch", "event", None])
    argv = ["simulate", fx["foreign.nir"], "--input", path, "--out", work / "sim"]
    if engine:
        argv += ["--engine", engine]
    return Case("array", argv, [work / "sim"], note=note)


ARGUMENT_OPTIONS = {
    "sample": {"--num-images": INTS, "--steps": INTS, "--sampler": WORDS, "--eta": FLOATS, "--order": INTS,
               "--seed": INTS, "--threshold-scale": FLOATS, "--batch-size": INTS, "--device": WORDS,
               "--gamma": ["missing.npz", "", "."]},
    "simulate": {"--num-images": INTS, "--steps": INTS, "--sampler": WORDS, "--engine": WORDS, "--batch-size": INTS,
                 "--threshold-scale": FLOATS, "--eta": FLOATS, "--order": INTS, "--device": WORDS,
                 "--dt": FLOATS, "--method": WORDS, "--reset": WORDS, "--comparison": WORDS, "--input": ["missing",
                                                                                                         "."]},
    "energy": {"--profile": WORDS, "--baseline": WORDS, "--host": WORDS, "--steps": INTS, "--num-images": INTS,
               "--seed": INTS, "--graph": ["missing.nir", "."], "--dt": FLOATS},
    "export": {"--to": ["nir", "lava", "bogus", ""], "--quantize": ["none", "int8", "int4", ""],
               "--calibration-images": ["0", "-1", "abc", "nan", "99999999999999999999", str(10 ** 9)],
               "--junctions": ["scale", "edges", "x"], "--upsample": ["auto", "extension", "polyphase", "x"],
               "--peer": ["norse", "bogus", ""], "--calibration": ["bogus", "", "folder"]},
    "train": {"--steps": ["0", "-1", "abc", "nan"], "--lr": FLOATS, "--batch-size": ["0", "-1", "abc", "nan"],
              "--num-steps": ["0", "-1", "4097", str(10 ** 6), "abc"], "--device": WORDS,
              "--preset": ["bogus", "", "x" * 300], "--dataset": ["bogus", ""], "--head": ["bogus", ""],
              "--qat-bits": ["0", "-1", "99"], "--ann-bits": ["0", "-1", "99"]},
}


def gen_argument(pick: Pick, fx: dict, work: Path) -> Case:
    """Option values of every kind (numbers out of range or not numbers, unknown names, missing files); for train,
    values that must be refused (a valid set would start a training run)."""
    command = pick.choice(sorted(ARGUMENT_OPTIONS))
    options = ARGUMENT_OPTIONS[command]
    base = {"sample": ["sample", fx["spiking.pt"], "--num-images", 1, "--steps", 1, "--out", work / "o"],
            "simulate": ["simulate", fx["spiking.nir"], "--num-images", 1, "--steps", 1, "--out", work / "o"],
            "energy": ["energy", fx["spiking.nir"], "--steps", 1, "--num-images", 1],
            "export": ["export", fx["spiking.pt"], "--to", "nir", "-o", work / "o.nir"],
            "train": ["train", "--steps", 1, "--sample-images", 0, "--out", work / "o"]}[command]
    chosen = []
    for _ in range(pick.integer(1, 3)):
        option = pick.choice(sorted(options))
        value = pick.choice(options[option])
        chosen += [option, work / value if option in ("--gamma", "--input", "--graph") and value else value]
    if command == "train" and not chosen:
        chosen = ["--lr", "nan"]
    outputs = [p for p in (work / "o", work / "o.nir") if p in base]
    return Case("argument", base + chosen, outputs, note=" ".join(map(str, chosen)))


def gen_output(pick: Pick, fx: dict, work: Path) -> Case:
    """Output locations: an existing file (without --force), the command's own input, a directory where a file is
    expected, a path under a file, an unwritable folder."""
    src, stats = work / "src.pt", work / "stats.json"
    shutil.copy(fx["spiking.pt"], src)
    shutil.copy(fx["stats.json"], stats)
    kind = pick.choice(["existing", "source", "directory", "under a file", "read-only"])
    target = work / "target"
    if kind == "existing":
        target.write_bytes(b"precious")
    elif kind == "directory":
        target.mkdir()
    elif kind == "under a file":
        (work / "afile").write_text("x")
        target = work / "afile" / "out"
    elif kind == "read-only":
        ro = work / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        target = ro / "out"
    command = pick.choice(["export", "energy", "energy-json", "evaluate", "gamma", "convert"])
    if kind == "source":
        target = {"export": src, "gamma": src, "convert": src, "evaluate": src}.get(command, stats)
    argv = {"export": ["export", src, "--to", "nir", "-o", target],
            "energy": ["energy", stats, "--graph", fx["spiking.nir"], "--out", target],
            "energy-json": ["energy", stats, "--json", "--out", target],
            "evaluate": ["evaluate", src, "--dataset", "builtin", "--num-images", 2, "--ref-images", 2, "--steps", 1,
                         "--out", target],
            "gamma": ["gamma", src, "--dataset", "builtin", "--steps", 1, "--num-samples", 1, "--out", target],
            "convert": ["convert", src, "--out", target]}[command]
    case = Case("output", argv, [target], note=f"{command}: {kind}")
    if kind in ("existing", "source"):
        case.before[str(target)] = Path(target).read_bytes()
    return case


def gen_signal(pick: Pick, fx: dict, work: Path) -> Case:
    argv, outputs = pick.choice([
        (["export", fx["spiking.pt"], "--to", "nir", "-o", work / "m.nir"], [work / "m.nir"]),
        (["export", fx["sdm.pt"], "--to", "nir", "--quantize", "int8", "--calibration", "builtin",
          "--calibration-images", 4, "-o", work / "m.nir"], [work / "m.nir"]),
        (["simulate", fx["spiking.nir"], "--num-images", 64, "--steps", 4, "--save-spikes", "--out", work / "sim"],
         [work / "sim"]),
        (["sample", fx["spiking.pt"], "--num-images", 256, "--steps", 10, "--out", work / "s"], [work / "s"]),
        (["energy", fx["spiking.nir"], "--steps", 2, "--json", "--out", work / "e.json"], [work / "e.json"]),
    ])
    signum = pick.choice([signal.SIGINT, signal.SIGTERM])
    delay = pick.integer(0, 30) / 10
    return Case("signal", argv, outputs, child=True, signal=(int(signum), delay), note=f"signal {signum} at {delay} s")


def gen_full_disk(pick: Pick, fx: dict, work: Path) -> Case:
    argv, outputs = pick.choice([
        (["export", fx["spiking.pt"], "--to", "nir", "-o", work / "m.nir"], [work / "m.nir"]),
        (["simulate", fx["spiking.nir"], "--num-images", 1, "--steps", 1, "--save-spikes", "--out", work / "sim"],
         [work / "sim"]),
        (["simulate", fx["foreign.nir"], "--input", fx["x.npy"], "--save-spikes", "--out", work / "sim"],
         [work / "sim"]),
        (["sample", fx["spiking.pt"], "--num-images", 1, "--steps", 1, "--out", work / "s"], [work / "s"]),
        (["energy", fx["stats.json"], "--json", "--out", work / "e.json"], [work / "e.json"]),
        (["energy", fx["stats.json"], "--out", work / "e.txt"], [work / "e.txt"]),
        (["export", fx["spiking.pt"], "--to", "nir", "--peer", "norse", "-o", work / "m.nir"], [work / "m.nir"]),
    ])
    size = pick.choice([0, 1, 100, 300, 1000, 4096, 20000, 100000])
    return Case("full_disk", argv, outputs, child=True, fsize=size, note=f"RLIMIT_FSIZE {size}")


def gen_memory(pick: Pick, fx: dict, work: Path) -> Case:
    """Inputs that declare more memory than the limit: each must be refused before it is allocated."""
    kind = pick.choice(["config", "config", "tensor", "nir declared", "conv input", "num-images", "batch"])
    if kind == "config":
        obj = torch.load(fx["spiking.pt"], weights_only=True)
        field_ = pick.choice(["ch", "image_size", "num_steps", "num_diffusion_steps", "img_ch", "num_res_blocks",
                              "ch_mult"])
        section = pick.choice(["model", "diffusion"]) if field_ == "num_diffusion_steps" else "model"
        value = [1] * 12 if field_ == "ch_mult" else pick.choice(BIG)
        obj["config"][section][field_] = value
        if field_ == "image_size" and pick.chance(50):
            obj["config"]["model"]["ch"] = 64
        torch.save(obj, work / "ckpt.pt")
        argv, outputs = _checkpoint_command(pick, work / "ckpt.pt", work)
        note = f"{section}.{field_}={value}"
        refused = field_ == "ch"  # the weights do not fit (the other sizes may, for a command that builds no state)
        return Case("memory", argv, outputs, child=True, refused=refused, note=note)
    if kind == "tensor":
        obj = torch.load(fx["spiking.pt"], weights_only=True)
        obj["ema"]["conv.weight"] = torch.zeros(1).expand(100000, 10000)
        torch.save(obj, work / "ckpt.pt")
        argv, outputs = _checkpoint_command(pick, work / "ckpt.pt", work)
        return Case("memory", argv, outputs, child=True, refused=True, note="expanded 10^9-element tensor")
    if kind == "nir declared":
        path = work / "g.nir"
        shutil.copy(fx[pick.choice(["foreign.nir", "spiking.nir"])], path)
        with h5py.File(path, "r+") as f:
            weights = []
            f.visititems(lambda name, obj: weights.append(name) if name.endswith("/weight") else None)
            name = pick.choice(sorted(weights))
            parent, leaf = name.rsplit("/", 1)
            del f[parent][leaf]
            f[parent].create_dataset(leaf, shape=(45000, 45000), dtype="f8")
        argv, outputs = _graph_command(pick, path, "foreign" in str(path), work, fx)
        return Case("memory", argv, outputs, child=True, refused=True, note=f"declared 45000^2 {name}")
    if kind == "conv input":
        n = pick.choice([20000, 50000])
        graph = nir.NIRGraph(nodes={"input": nir.Input(np.array([1, n, n])),
                                    "conv": nir.Conv2d(input_shape=np.array([n, n]), weight=np.ones((1, 1, 3, 3)),
                                                       stride=1, padding=1, dilation=1, groups=1, bias=np.zeros(1)),
                                    "output": nir.Output(np.array([1, n, n]))},
                             edges=[("input", "conv"), ("conv", "output")])
        nir.write(work / "big.nir", graph)
        np.save(work / "x.npy", np.zeros((1, 1, 1, 2, 2)))
        argv = pick.choice([["simulate", work / "big.nir", "--input", work / "x.npy", "--out", work / "sim"],
                            ["energy", work / "big.nir", "--input", work / "x.npy"]])
        return Case("memory", argv, [work / "sim"], child=True, refused=True, note=f"conv input {n}^2")
    if kind == "num-images":
        n = pick.choice([10 ** 7, 10 ** 7 + 1, 10 ** 8])  # beyond the memory limit (2 GB) or the count limit
        argv = pick.choice([["sample", fx["spiking.pt"], "--num-images", n, "--steps", 1, "--out", work / "s"],
                            ["simulate", fx["spiking.nir"], "--num-images", n, "--steps", 1, "--out", work / "s"]])
        return Case("memory", argv, [work / "s"], child=True, refused=True, note=f"--num-images {n}")
    n = pick.choice([10 ** 6, 10 ** 7])
    argv = ["sample", fx["spiking.pt"], "--num-images", 64, "--batch-size", n, "--steps", 1, "--out", work / "s"]
    return Case("memory", argv, [work / "s"], child=True, note=f"--batch-size {n}")


def gen_hang(pick: Pick, fx: dict, work: Path) -> Case:
    """Inputs that would block or run unbounded: FIFOs, sizes at the limits of the option ranges."""
    kind = pick.choice(["fifo", "fifo", "nir num_steps", "steps", "num_diffusion_steps"])
    if kind == "fifo":
        fifo = work / pick.choice(["ckpt.pt", "g.nir", "x.npy", "p.toml", "stats.json", "gamma.npz"])
        os.mkfifo(fifo)
        argv = {"ckpt.pt": ["info", fifo], "g.nir": ["simulate", fifo, "--out", work / "o"],
                "x.npy": ["simulate", fx["foreign.nir"], "--input", fifo, "--out", work / "o"],
                "p.toml": ["energy", fx["stats.json"], "--profile", fifo],
                "stats.json": ["energy", fifo],
                "gamma.npz": ["sample", fx["spiking.pt"], "--sampler", "analytic-ddim", "--gamma", fifo, "--out",
                              work / "o"]}[fifo.name]
        return Case("hang", argv, [work / "o"], child=True, refused=True, timeout=60, note=f"FIFO {fifo.name}")
    if kind == "nir num_steps":
        graph = nir.read(fx["spiking.nir"])
        graph.metadata["num_steps"] = pick.choice([10 ** 6, 10 ** 5, 4097, 2 ** 40])
        nir.write(work / "g.nir", graph)
        return Case("hang", ["simulate", work / "g.nir", "--num-images", 1, "--steps", 1, "--out", work / "o"],
                    [work / "o"], child=True, refused=True, timeout=60,
                    note=f"metadata num_steps {graph.metadata['num_steps']}")
    if kind == "steps":
        n = pick.choice([10 ** 6, 10 ** 9, 4097])
        argv = pick.choice([["sample", fx["spiking.pt"], "--steps", n, "--num-images", 1, "--out", work / "o"],
                            ["simulate", fx["spiking.nir"], "--steps", n, "--num-images", 1, "--out", work / "o"],
                            ["energy", fx["spiking.nir"], "--steps", n]])
        return Case("hang", argv, [work / "o"], child=True, refused=True, timeout=60, note=f"--steps {n}")
    obj = torch.load(fx["spiking.pt"], weights_only=True)
    n = pick.choice([10 ** 6, 10 ** 7, 10 ** 9])
    obj["config"]["diffusion"]["num_diffusion_steps"] = obj["config"]["model"]["num_diffusion_steps"] = n
    torch.save(obj, work / "ckpt.pt")
    return Case("hang", ["sample", work / "ckpt.pt", "--num-images", 1, "--steps", 1, "--sampler", "ddpm", "--out",
                         work / "o"], [work / "o"], child=True, timeout=60, note=f"num_diffusion_steps {n}")


GENERATORS = {name: globals()[f"gen_{name}"] for name in CATEGORIES}


# ------------------------------------------------------------------------------------------------- running


def run_in_process(argv) -> tuple[int | None, str, str, str]:
    """``neurosdm ARGV`` through :func:`neurosdm.cli.main` in this process, stdout and stderr captured:
    ``(exit status, stdout, stderr, escaped)``; ``escaped`` is the traceback of an exception that left main."""
    from neurosdm import cli

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["neurosdm", *map(str, argv)]
    code, escaped = None, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback is what we count
        escaped = traceback.format_exc()
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue(), escaped


CHILD_CODE = """
import os, resource, sys, signal
sys.path.insert(0, {tests!r})
from fuzz_cases import run_in_process
import neurosdm.cli, neurosdm.jobs, neurosdm.exporters.pipeline, neurosdm.graph.inspect  # before a signal
limits = {limits!r}
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
print("READY", flush=True)
code, out, err, escaped = run_in_process({argv!r})
sys.stdout.write(out); sys.stderr.write(err + escaped)
sys.stdout.flush(); sys.stderr.flush()
os._exit(99 if escaped else (code if code is not None else 98))
"""


def child_limits(case: Case, address_space: int | None = None) -> dict:
    limits = {}
    if case.fsize is not None:
        limits["RLIMIT_FSIZE"] = case.fsize
    if address_space:
        limits["RLIMIT_AS"] = address_space
    return limits


def run_subprocess(case: Case, cwd: Path, address_space: int = 12 << 30) -> Outcome:
    """A case in a fresh ``python`` (a memory cap, a file size limit, a signal after a delay, a timeout); its peak
    resident memory from ``wait4``. For the short profile: the long one forks (:mod:`scripts.fuzz_long`)."""
    import subprocess
    import time

    code = CHILD_CODE.format(tests=str(ROOT / "tests"), limits=child_limits(case, address_space),
                             argv=[str(a) for a in case.argv])
    env = dict(os.environ, **ENV)
    p = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    signalled = timed_out = False
    ready = p.stdout.readline()  # the imports done: the delay starts now
    if case.signal and ready:  # at least 0.1 s: the child still runs this harness's own lines right after READY
        time.sleep(max(case.signal[1], 0.1))
        if p.poll() is None:
            p.send_signal(case.signal[0])
            signalled = True
    try:
        out, err = p.communicate(timeout=max(1.0, case.timeout - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        timed_out = True
    code = p.returncode
    if signalled and code == -case.signal[0]:
        code = 128 + case.signal[0]  # ended by the signal itself before neurosdm handled it: as a shell shows it
    killed = -code if code is not None and code < 0 and not timed_out else None
    return Outcome(code if code is not None and code >= 0 else None, out, err,
                   escaped=err if code == 99 else "", killed_by=killed, timed_out=timed_out)


# -------------------------------------------------------------------------------------------------- judging

STRAY = re.compile(r"(\.tmp$|^\.neurosdm-probe-|^\.neurosdm-outputs\.)")
NAN_WORD = re.compile(r"(?<![\w.-])-?(nan|inf|infinity)(?![\w-])", re.IGNORECASE)


def stray_files(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob("*") if STRAY.search(p.name))


def non_finite_in(path: Path) -> str:
    """Where ``path`` (a file, or every file under a folder) holds NaN or an infinity, else ''."""
    if path.is_dir():
        return next((f for f in map(non_finite_in, sorted(path.iterdir())) if f), "")
    try:
        if path.suffix == ".npy":
            a = np.load(path)
            return str(path) if a.dtype.kind in "fc" and not np.isfinite(a).all() else ""
        if path.suffix == ".npz":
            with np.load(path) as z:
                return next((f"{path}:{k}" for k in z.files if z[k].dtype.kind in "fc" and
                             not np.isfinite(z[k]).all()), "")
        if path.suffix == ".json":
            bad = []
            json.loads(path.read_text(), parse_constant=lambda c: bad.append(c))
            return f"{path}: {bad[0]}" if bad else ""
        if path.suffix in (".nir", ".nird"):
            found = []
            with h5py.File(path, "r") as f:
                f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and o.dtype.kind in "fc"
                             and o.size and not np.isfinite(o[()]).all() else None)
            return f"{path}:{found[0]}" if found else ""
        if path.suffix in (".txt", ".csv"):
            m = NAN_WORD.search(path.read_text())
            return f"{path}: {m.group(0)}" if m else ""
    except Exception as e:  # an output that cannot be read back is as bad
        return f"{path}: unreadable ({type(e).__name__})"
    return ""


def judge(case: Case, outcome: Outcome, work: Path) -> list[str]:
    """Every failure of one run: ``traceback``, ``message`` (not one ``error:`` line), ``crash``, ``hang``,
    ``memory``, ``stray`` (a temporary left, or an output after a failure, or a pre-existing output changed),
    ``nan`` (NaN/Inf in an output or the printed report)."""
    found = []
    if outcome.timed_out:
        return ["hang"]
    if outcome.killed_by is not None:
        return [f"crash (signal {outcome.killed_by})"]
    if outcome.escaped or "Traceback (most recent call last)" in outcome.stderr + outcome.stdout:
        found.append("traceback")
    if outcome.max_rss > RSS_LIMIT and (case.refused or outcome.code != 0):
        found.append("memory")
    code = outcome.code
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if code in (1, 130):  # one error line, the last; before it only the command's own progress lines (energy
        # --json says what it simulates on stderr), no warning, no "Exception ignored"
        errors = [line for line in lines if line.startswith("error:")]
        if len(errors) != 1 or lines[-1] != errors[0] or any(
                "Warning" in line or "Exception" in line or "Aborted" in line for line in lines):
            found.append("message")
        if code == 130 and not case.signal:
            found.append("message")
    elif case.signal and code == 128 + case.signal[0]:
        pass  # the signal's own default action (it came before neurosdm's handler): nothing may be left
    elif code == 2:
        if "Usage:" not in outcome.stderr:  # typer's usage error (an unknown choice, not a number)
            found.append("message")
    elif code != 0 and not found:
        found.append(f"message (exit {code})")
    if stray_files(work):
        found.append("stray")
    if code != 0:
        for out in case.outputs:
            out = Path(out)
            if str(out) in case.before:
                if not out.is_file() or out.read_bytes() != case.before[str(out)]:
                    found.append("stray")
            elif out.exists() and (out.is_file() or any(out.iterdir())):
                # an interrupt after the output was committed (renamed into place) leaves it whole
                ended_by_signal = code == 130 or (case.signal and code == 128 + case.signal[0])
                if not ended_by_signal or non_finite_in(out):
                    found.append("stray")
    else:
        if case.refused and not case.signal:
            found.append("accepted")
        bad = next((b for b in map(non_finite_in, [Path(o) for o in case.outputs if Path(o).exists()]) if b), "")
        if bad or NAN_WORD.search(outcome.stdout):
            found.append("nan")
    return sorted(set(found))
