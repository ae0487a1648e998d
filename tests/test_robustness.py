"""Hostile inputs through the command line (issue 17): crafted checkpoints, NIR files, profiles, arrays and option
values each give one ``error:`` line and exit status 1 — no traceback, no hang, no memory blow-up, no stray file.

Most cases run the real entry point (:func:`neurosdm.cli.main`) in-process; the ones about the process itself (a
file size limit, a FIFO, an address-space limit) run ``python -m neurosdm`` in a subprocess.
"""

import json
import os
import resource
import subprocess
import sys
import zipfile

import nir
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, tiny_checkpoint
from neurosdm import cli
from neurosdm.exporters.pipeline import export_checkpoint
from neurosdm.io import atomic_path, output_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *args):
    """``neurosdm ARGS`` through :func:`neurosdm.cli.main` in this process: ``(exit status, stdout, stderr)``. An
    exception other than SystemExit propagates (that is a traceback: the test fails)."""
    argv = sys.argv
    sys.argv = ["neurosdm", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_line_error(capsys, *args, needles=()):
    code, out, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), (args, code, out, err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return lines[0]


def no_temporaries(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".neurosdm-probe-",
                                                                                          ".neurosdm-outputs."))]


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    out = {"dir": d}
    for head in ("spiking", "sdm"):
        ckpt = tiny_checkpoint(d / f"{head}.pt", head=head)
        out[head] = ckpt
        out[f"{head}.nir"] = export_checkpoint(ckpt, d / f"{head}.nir")
    out["int8.nir"] = export_checkpoint(out["sdm"], d / "int8.nir", quantize="int8", calibration="builtin",
                                        calibration_images=4)
    return out


def edited_checkpoint(files, tmp_path, edit, head="spiking"):
    obj = torch.load(files[head], weights_only=True)
    edit(obj)
    path = tmp_path / "edited.pt"
    torch.save(obj, path)
    return path


def edited_graph(source, tmp_path, edit, name="edited.nir"):
    graph = nir.read(source)
    edit(graph)
    path = tmp_path / name
    nir.write(path, graph)
    return path


def foreign_graph(tmp_path, neuron=None, weight=None, name="g.nir"):
    """Input(3) -> Affine -> neuron -> Output, written to ``tmp_path/name``; and an input file ``x.npy``."""
    neuron = neuron or nir.LIF(tau=np.full(2, 2.0), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.ones(2),
                               v_reset=np.zeros(2))
    w = np.ones((2, 3)) if weight is None else weight
    graph = nir.NIRGraph(nodes={"input": nir.Input(np.array([3])), "fc": nir.Affine(w, np.zeros(2)),
                                "lif": neuron, "output": nir.Output(np.array([2]))},
                         edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")])
    nir.write(tmp_path / name, graph)
    np.save(tmp_path / "x.npy", np.ones((4, 1, 3)))
    return tmp_path / name


def simulate_args(source, tmp_path, *extra):
    return ("simulate", source, "--num-images", 1, "--steps", 1, "--out", tmp_path / "sim", *extra)


# ---------------------------------------------------------------------------------------------- checkpoints


def _set(path, value):
    def edit(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


CHECKPOINT_CASES = {
    "model is a list": (_set(["model"], [1]), "'model' must be a non-empty state dict"),
    "model is a string": (_set(["model"], "weights"), "'model' must be a non-empty state dict"),
    "model is None": (_set(["model"], None), "'model'"),
    "config is a tensor": (_set(["config"], torch.zeros(3)), "config must be a table"),
    "config.model is a list": (_set(["config", "model"], [1, 2]), "config must be a table"),
    "1-D conv weight": (_set(["ema", "conv.weight"], torch.zeros(3)), "'conv.weight' has shape [3]"),
    "0-D conv weight": (_set(["ema", "conv.weight"], torch.tensor(1.0)), "'conv.weight' has shape []"),
    "wrong shape": (_set(["ema", "conv.weight"], torch.zeros(5, 1, 3, 3)), "needs [4, 1, 3, 3]"),
    "weight is a string": (_set(["ema", "conv.weight"], "x"), "must be a tensor"),
    "step is a string": (_set(["step"], "abc"), "'step' must be a non-negative integer"),
    "thresholds not numbers": (_set(["config", "model", "thresholds"], {"a": "x"}), "thresholds"),
    "image_size 0": (_set(["config", "model", "image_size"], 0), "image_size must be in 1..4096"),
    "image_size negative": (_set(["config", "model", "image_size"], -8), "image_size"),
    "image_size 1e5": (_set(["config", "model", "image_size"], 100000), "image_size"),
    "ch 1e6": (_set(["config", "model", "ch"], 1000000), "ch must be in"),
    "ch 4096": (_set(["config", "model", "ch"], 4096), "GB"),
    "ch a string": (_set(["config", "model", "ch"], "32"), "must be an integer"),
    "num_steps 1e6": (_set(["config", "model", "num_steps"], 1000000), "num_steps"),
    "num_diffusion_steps 1e9": (_set(["config", "diffusion", "num_diffusion_steps"], 10 ** 9),
                                "num_diffusion_steps"),
    "model num_diffusion_steps 1e9": (_set(["config", "model", "num_diffusion_steps"], 10 ** 9),
                                      "num_diffusion_steps"),
    "lr nan": (_set(["config", "train", "lr"], float("nan")), "lr"),
    "threshold inf": (_set(["config", "model", "threshold"], float("inf")), "threshold"),
    "unknown key": (_set(["config", "model", "colour"], 1), "does not fit"),
}


def _poison(value):
    def edit(obj):
        w = obj["ema"]["conv.weight"].clone()
        w.view(-1)[0] = value
        obj["ema"]["conv.weight"] = w
    return edit


CHECKPOINT_CASES.update({
    "NaN weight": (_poison(float("nan")), "NaN or infinite"),
    "Inf weight": (_poison(float("inf")), "NaN or infinite"),
    "complex weights": (lambda o: o["ema"].__setitem__("conv.weight", o["ema"]["conv.weight"].to(torch.complex64)),
                        "complex"),
})


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_contents(files, tmp_path, capsys, case):
    edit, needle = CHECKPOINT_CASES[case]
    path = edited_checkpoint(files, tmp_path, edit)
    one_line_error(capsys, "export", path, "--to", "nir", "-o", tmp_path / "out.nir", needles=(needle,))
    assert not (tmp_path / "out.nir").exists() and not no_temporaries(tmp_path)


def test_bad_checkpoint_for_sample_and_info(files, tmp_path, capsys):
    path = edited_checkpoint(files, tmp_path, _set(["config", "model", "image_size"], 0))
    one_line_error(capsys, "info", path, needles=("image_size",))
    one_line_error(capsys, "sample", path, "--out", tmp_path / "s", "--num-images", 1, "--steps", 1,
                   needles=("image_size",))
    assert not (tmp_path / "s").exists()


def test_sdm_layout_with_tensors_of_the_wrong_rank(files, tmp_path, capsys):
    sd = torch.load(files["spiking"], weights_only=True)["ema"]
    sd["conv.weight"] = torch.zeros(4)
    torch.save({"net_model": sd}, tmp_path / "sdm.pt")
    one_line_error(capsys, "info", tmp_path / "sdm.pt", needles=("unexpected ranks",))
    torch.save({"net_model": "x"}, tmp_path / "sdm2.pt")
    one_line_error(capsys, "info", tmp_path / "sdm2.pt", needles=("net_model",))


def test_flipped_byte_fails_the_zip_crc(files, tmp_path, capsys):
    data = bytearray(files["spiking"].read_bytes())
    with zipfile.ZipFile(files["spiking"]) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    n, m = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + n + m + 2] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    one_line_error(capsys, "info", tmp_path / "flip.pt", needles=("CRC",))


def test_directory_named_like_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt.pt").mkdir()
    one_line_error(capsys, "info", tmp_path / "ckpt.pt", needles=("directory",))
    (tmp_path / "run" / "ckpt.pt").mkdir(parents=True)
    one_line_error(capsys, "info", tmp_path / "run", needles=("directory",))


def test_fifos_never_block(files, tmp_path):
    """A FIFO as a checkpoint, a NIR file, a profile, a Gamma table or an input: refused without opening it."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    nir_fifo = tmp_path / "pipe.nir"
    os.mkfifo(nir_fifo)
    npy_fifo = tmp_path / "pipe.npy"
    os.mkfifo(npy_fifo)
    json_fifo = tmp_path / "stats.json"
    os.mkfifo(json_fifo)
    graph = foreign_graph(tmp_path)
    code = f"""
import sys
from neurosdm import cli
for args in {[["info", str(fifo)], ["simulate", str(nir_fifo), "--out", str(tmp_path / "o")],
              ["inspect", str(nir_fifo)], ["energy", str(files["spiking.nir"]), "--profile", str(fifo) + ".toml"],
              ["sample", str(files["spiking"]), "--gamma", str(fifo), "--out", str(tmp_path / "o")],
              ["simulate", str(graph), "--input", str(npy_fifo), "--out", str(tmp_path / "o")],
              ["energy", str(json_fifo)]]!r}:
    sys.argv = ["neurosdm", *args]
    try:
        cli.main()
    except SystemExit as e:
        print("exit", e.code)
"""
    os.mkfifo(str(fifo) + ".toml")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.stdout.split() == ["exit", "1"] * 7, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 7 and all(line.startswith("error:") and "FIFO" in line for line in lines), p.stderr


# ------------------------------------------------------------------------------------------------- NIR files


def _quant(edit):
    def f(graph):
        q = dict(graph.metadata["quant"])
        edit(q)
        graph.metadata["quant"] = q
    return f


NIR_CASES = {
    "quant deleted": ("int8.nir", lambda g: g.metadata.pop("quant"), "quant"),
    "quant a string": ("int8.nir", lambda g: g.metadata.__setitem__("quant", "int8"), "quant"),
    "state_bits missing": ("int8.nir", _quant(lambda q: q.pop("state_bits")), "state_bits"),
    "state_bits 0": ("int8.nir", _quant(lambda q: q.__setitem__("state_bits", 0)), "state_bits"),
    "state_bits 100": ("int8.nir", _quant(lambda q: q.__setitem__("state_bits", 100)), "state_bits"),
    "state_bits a string": ("int8.nir", _quant(lambda q: q.__setitem__("state_bits", "24")), "state_bits"),
    "input_bits missing": ("int8.nir", _quant(lambda q: q.pop("input_bits")), "input_bits"),
    "output_exponent missing": ("int8.nir", _quant(lambda q: q.pop("output_exponent")), "output_exponent"),
    "round_nodes a number": ("int8.nir", _quant(lambda q: q.__setitem__("round_nodes", 3)), "round_nodes"),
    "num_steps 1e6": ("spiking.nir", lambda g: g.metadata.__setitem__("num_steps", 1000000), "num_steps"),
    "num_steps 0": ("spiking.nir", lambda g: g.metadata.__setitem__("num_steps", 0), "num_steps"),
    "bias table of the wrong length": (
        "spiking.nir", lambda g: g.metadata["bias_tables"].__setitem__(
            next(iter(g.metadata["bias_tables"])), np.zeros((20, 1, 3))), "bias_tables"),
    "bias table of a missing node": (
        "spiking.nir", lambda g: g.metadata["bias_tables"].__setitem__("nowhere", np.zeros((20, 1, 3))),
        "nowhere"),
    "host_head missing": ("sdm.nir", lambda g: g.metadata.pop("host_head"), "host_head"),
    "NaN weight": ("spiking.nir", lambda g: next(n for n in g.nodes.values() if isinstance(n, nir.Conv2d))
                   .weight.reshape(-1).__setitem__(0, np.nan), "NaN"),
}


@pytest.mark.parametrize("key", ["state_bits", "weight_bits", "weight_exponents", "state_exponent"])
def test_inspect_of_a_damaged_quant_table(files, tmp_path, capsys, key):
    path = edited_graph(files["int8.nir"], tmp_path, _quant(lambda q: q.pop(key)))
    one_line_error(capsys, "inspect", path, needles=(key,))


@pytest.mark.parametrize("case", sorted(NIR_CASES))
def test_bad_denoiser_exports(files, tmp_path, capsys, case):
    source, edit, needle = NIR_CASES[case]
    path = edited_graph(files[source], tmp_path, edit)
    one_line_error(capsys, *simulate_args(path, tmp_path), needles=(needle,))
    assert not (tmp_path / "sim").exists() or not any((tmp_path / "sim").iterdir())
    assert not no_temporaries(tmp_path)


def _lif(**kw):
    p = dict(tau=np.full(2, 2.0), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.ones(2), v_reset=np.zeros(2))
    p.update({k: np.full(2, v) for k, v in kw.items()})
    return nir.LIF(**p)


FOREIGN_CASES = {
    "tau 0": (dict(neuron=_lif(tau=0.0)), "tau must be positive"),
    "tau negative": (dict(neuron=_lif(tau=-1.0)), "tau must be positive"),
    "tau NaN": (dict(neuron=_lif(tau=np.nan)), "NaN"),
    "tau Inf": (dict(neuron=_lif(tau=np.inf)), "NaN or infinite"),
    "v_threshold 0": (dict(neuron=_lif(v_threshold=0.0)), "v_threshold must be above v_reset"),
    "v_threshold NaN": (dict(neuron=_lif(v_threshold=np.nan)), "NaN"),
    "r NaN": (dict(neuron=_lif(r=np.nan)), "NaN"),
    "NaN weights": (dict(weight=np.full((2, 3), np.nan)), "NaN"),
    "complex weights": (dict(weight=np.ones((2, 3)) * (1 + 1j)), "complex"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN_CASES))
def test_bad_foreign_graphs(tmp_path, capsys, case):
    kw, needle = FOREIGN_CASES[case]
    path = foreign_graph(tmp_path, **kw)
    one_line_error(capsys, "simulate", path, "--input", tmp_path / "x.npy", "--out", tmp_path / "o",
                   needles=(needle,))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, 1j])
def test_bad_foreign_inputs(tmp_path, capsys, value):
    path = foreign_graph(tmp_path)
    np.save(tmp_path / "bad.npy", np.full((4, 1, 3), value))
    one_line_error(capsys, "simulate", path, "--input", tmp_path / "bad.npy", "--out", tmp_path / "o",
                   needles=("input",))


def test_lazily_declared_huge_affine_is_refused_before_reading(tmp_path, capsys):
    """A small file declaring a 45,000 x 45,000 Affine (an HDF5 dataset never written): refused from its header."""
    import h5py

    path = foreign_graph(tmp_path)
    with h5py.File(path, "r+") as f:
        group = f["node/nodes/fc"]
        del group["weight"]
        group.create_dataset("weight", shape=(45000, 45000), dtype="f8")  # allocated lazily: nothing stored
    assert path.stat().st_size < 1_000_000
    one_line_error(capsys, "inspect", path, needles=("GB",))


def test_huge_declared_conv_input_is_refused(tmp_path, capsys):
    graph = nir.NIRGraph(nodes={"input": nir.Input(np.array([1, 20000, 20000])),
                                "conv": nir.Conv2d(input_shape=np.array([20000, 20000]), weight=np.ones((1, 1, 3, 3)),
                                                   stride=1, padding=1, dilation=1, groups=1, bias=np.zeros(1)),
                                "output": nir.Output(np.array([1, 20000, 20000]))},
                         edges=[("input", "conv"), ("conv", "output")])
    nir.write(tmp_path / "big.nir", graph)
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 1, 2, 2)))
    one_line_error(capsys, "simulate", tmp_path / "big.nir", "--input", tmp_path / "x.npy", "--out", tmp_path / "o",
                   needles=("GB",))


def test_long_flatten_chain_has_no_recursion_limit(tmp_path, capsys):
    """10,000 Flatten nodes in a chain (each a reshape of the last): translated with loops, not recursion."""
    from neurosdm.graph.program import load_program

    n = 10_000
    nodes = {"input": nir.Input(np.array([2]))}
    nodes.update({f"f{i}": nir.Flatten(start_dim=0, end_dim=0, input_type={"input": np.array([2])})
                  for i in range(n)})
    nodes["lif"] = nir.IF(r=np.ones(2), v_threshold=np.ones(2), v_reset=np.zeros(2))
    nodes["fc"] = nir.Affine(np.ones((2, 2)), np.zeros(2))
    nodes["output"] = nir.Output(np.array([2]))
    chain = ["input", "lif"] + [f"f{i}" for i in range(n)] + ["fc", "output"]
    graph = nir.NIRGraph(nodes=nodes, edges=list(zip(chain, chain[1:])), type_check=False)  # nir's own check: 20 s
    program = load_program(graph)
    assert program.by_name["fc"].input == "spikes"  # the spikes are seen through all 10,000 reshapes


def test_graph_that_overflows_is_refused_instead_of_writing_nan_images(files, tmp_path, capsys):
    def huge(graph):
        for node in graph.nodes.values():
            if isinstance(node, nir.Conv2d):
                node.weight = np.full(node.weight.shape, 1e300)  # finite float64, overflows to inf in the run
    path = edited_graph(files["sdm.nir"], tmp_path, huge)
    one_line_error(capsys, *simulate_args(path, tmp_path), needles=("produced NaN",))
    assert not (tmp_path / "sim").exists()


# ---------------------------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("content, needle", [
    (b"\x00\x01\x02\xff\xfe binary", "not a text file"),
    ("name = 'caf\u00e9'".encode("latin-1"), "not a text file"),
    (None, "directory"),
    ("nan", "finite"), ("inf", "finite"), ("parallel_cores", "cores >= 1"),
])
def test_bad_profiles(files, tmp_path, capsys, content, needle):
    path = tmp_path / "p.toml"
    if content is None:
        path.mkdir()
    elif content in (b"nan", b"inf") or content in ("nan", "inf", "parallel_cores"):
        text = (open(os.path.join(ROOT, "neurosdm", "hw_profiles", "loihi2.toml")).read())
        if content == "parallel_cores":
            lines = text.splitlines()
            i = next(i for i, line in enumerate(lines) if line.strip().startswith("[mapping.parallel_cores"))
            j = next(j for j in range(i, len(lines)) if lines[j].strip().startswith("value"))
            lines[j] = "value = 0"
            text = "\n".join(lines)
        else:
            i = text.index("value =", text.index("[energy."))
            text = text[:i] + f"value = {content}\n#" + text[i + len("value ="):]
        path.write_text(text)
    else:
        path.write_bytes(content)
    one_line_error(capsys, "energy", files["spiking.nir"], "--profile", path, "--steps", 1, needles=(needle,))


# ------------------------------------------------------------------------------------------------ options


def test_bad_option_values(files, tmp_path, capsys):
    ckpt, out = files["spiking"], tmp_path / "o"
    gamma = tmp_path / "gamma.npy"
    np.save(gamma, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        (("sample", ckpt, "--device", "bogus", "--out", out), "--device"),
        (("sample", ckpt, "--device", "cuda:7", "--out", out), "cuda"),
        (("simulate", files["spiking.nir"], "--engine", "torch", "--device", "bogus", "--out", out), "--device"),
        (("train", "--device", "bogus", "--out", out), "--device"),
        (("train", "--lr", "nan", "--steps", 1, "--out", out), "lr"),
        (("train", "--batch-size", 0, "--steps", 1, "--out", out), "batch_size"),
        (("train", "--num-steps", 1000000, "--steps", 1, "--out", out), "num_steps"),
        (("sample", ckpt, "--sampler", "analytic-ddim", "--gamma", gamma, "--out", out), "Gamma table"),
        (("sample", ckpt, "--num-images", 0, "--out", out), "--num-images"),
        (("sample", ckpt, "--num-images", 10 ** 9, "--out", out), "--num-images"),
        (("simulate", files["spiking.nir"], "--num-images", 10 ** 9, "--out", out), "--num-images"),
    ]
    for value in ("0", "nan", "-1", "inf"):
        cases.append((("sample", ckpt, "--threshold-scale", value, "--num-images", 1, "--out", out),
                      "--threshold-scale"))
        cases.append((("simulate", files["spiking.nir"], "--threshold-scale", value, "--out", out),
                      "--threshold-scale"))
    for args, needle in cases:
        one_line_error(capsys, *args, needles=(needle,))
    assert not out.exists()


def test_images_beyond_the_memory_limit_are_refused(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEUROSDM_MEMORY_LIMIT_GB", "0.0001")  # 100 kB: 1,000 images of 8x8 need about 770 kB
    one_line_error(capsys, "sample", files["spiking"], "--num-images", 1000, "--out", tmp_path / "s",
                   needles=("NEUROSDM_MEMORY_LIMIT_GB",))
    one_line_error(capsys, *simulate_args(files["spiking.nir"], tmp_path)[:2], "--num-images", 1000, "--out",
                   tmp_path / "s", needles=("NEUROSDM_MEMORY_LIMIT_GB",))
    assert not (tmp_path / "s").exists()


def test_unwritable_outputs_are_refused_before_the_work(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for args in [("sample", files["spiking"], "--num-images", 1, "--steps", 1, "--out", blocker),
                 ("sample", files["spiking"], "--num-images", 1, "--steps", 1, "--out", blocker / "sub"),
                 (*simulate_args(files["spiking.nir"], tmp_path)[:-1], blocker),
                 ("simulate", files["spiking.nir"], "--out", "/proc/neurosdm-out"),
                 ("train", "--steps", 1, "--out", blocker),
                 ("export", files["spiking"], "--to", "nir", "-o", blocker / "m.nir")]:
        one_line_error(capsys, *args)
    assert blocker.read_text() == "x" and not no_temporaries(tmp_path)


def test_export_never_overwrites_its_source(files, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(files["spiking"].read_bytes())
    before = ckpt.read_bytes()
    one_line_error(capsys, "export", ckpt, "--to", "nir", "-o", ckpt, "--force", needles=("input",))
    assert ckpt.read_bytes() == before


# -------------------------------------------------------------------------------------------------- faults


def _limited(limit_bytes):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


@pytest.mark.slow  # three processes (about 15 s)
def test_full_disk_during_writes_is_one_line_and_leaves_nothing(files, tmp_path):
    """A file size limit (as a full disk): export, simulate --save-spikes and sample fail in one line, with no
    crash, no temporary file and no partial set of outputs left."""
    env = dict(os.environ, NEUROSDM_TEST_THREADS="1", NEUROSDM_COMPILE="0")  # inductor caches need disk too
    runs = [
        (["export", files["spiking"], "--to", "nir", "-o", tmp_path / "m.nir"], tmp_path / "m.nir"),
        (["simulate", files["spiking.nir"], "--num-images", 1, "--steps", 1, "--save-spikes", "--out",
          tmp_path / "sim"], tmp_path / "sim"),  # outputs appear together or not at all: no folder
        (["sample", files["spiking"], "--num-images", 1, "--steps", 1, "--out", tmp_path / "smp"], tmp_path / "smp"),
    ]
    for args, product in runs:
        p = subprocess.run([sys.executable, "-m", "neurosdm", *map(str, args)], capture_output=True, text=True,
                           preexec_fn=_limited(300), timeout=300, env=env, cwd=tmp_path)
        assert_one_line_error(p, "cannot write")
        assert not product.exists()
    assert not no_temporaries(tmp_path)


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.npy.{dead}-abcd.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".other.npy.1-abcd.tmp"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    with atomic_path(tmp_path / "out.npy") as tmp:
        tmp.write_bytes(b"done")
    assert not stale.exists() and other.exists() and (tmp_path / "out.npy").read_bytes() == b"done"
    stage = tmp_path / f".neurosdm-outputs.{dead}-abcd"  # a killed run's staged outputs
    stage.mkdir()
    (stage / "images.npy").write_bytes(b"half")
    with output_set(tmp_path) as new_stage:
        (new_stage / "a.txt").write_text("a")
    assert not stage.exists() and (tmp_path / "a.txt").read_text() == "a" and no_temporaries(tmp_path) == [other]


def test_memory_is_bounded_for_refused_inputs(files, tmp_path):
    """Under a 6 GB address-space limit (torch alone reserves a few GB of it), an absurd checkpoint is refused in one line (nothing allocated first)."""
    path = edited_checkpoint(files, tmp_path, _set(["config", "model", "ch"], 4096))

    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    p = subprocess.run([sys.executable, "-m", "neurosdm", "info", str(path)], capture_output=True, text=True,
                       preexec_fn=preexec, timeout=120, env=dict(os.environ, NEUROSDM_MEMORY_LIMIT_GB="2"))
    assert_one_line_error(p, "GB")



@pytest.mark.slow  # waits for a run to be under way (about 12 s)
def test_sigterm_during_a_run_is_one_line_and_leaves_nothing(files, tmp_path):
    import time

    # 4,096 images: far longer than the 10 s before the signal even on an idle machine (512 finished in 10 s)
    p = subprocess.Popen([sys.executable, "-m", "neurosdm", "simulate", str(files["spiking.nir"]), "--num-images",
                          "4096", "--steps", "20", "--save-spikes", "--out", str(tmp_path / "sim")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=dict(os.environ, NEUROSDM_COMPILE="0"))
    time.sleep(10)  # torch imported, the handler installed, the run under way
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["error: interrupted; no partial output was left"], err
    assert not (tmp_path / "sim").exists() and not no_temporaries(tmp_path)


# ------------------------------------------------------------------------------- outputs: the --force rule


def _force_cases(files, t):
    """Each command that writes outputs: its command line writing into ``t``, and the name of one output it would
    write there."""
    return {
        "export": (("export", files["spiking"], "--to", "nir", "-o", t / "x.nir"), "x.nir"),
        "export lava": (("export", files["int8.nir"], "--to", "lava", "-o", t / "x.net"), "x.net"),
        "simulate": (simulate_args(files["spiking.nir"], t)[:-1] + (t,), "images.npy"),
        "simulate layers": (simulate_args(files["spiking.nir"], t)[:-1] + (t,), "layers.txt"),
        "simulate spikes": (simulate_args(files["spiking.nir"], t)[:-1] + (t, "--save-spikes"), "spikes.nird"),
        "sample": (("sample", files["spiking"], "--num-images", 1, "--steps", 1, "--out", t), "samples.png"),
        "energy": (("energy", files["spiking.nir"], "--steps", 1, "--out", t / "e.txt"), "e.txt"),
        "energy csv": (("energy", files["spiking.nir"], "--steps", 1, "--csv", "--out", t / "e.csv"), "e.csv"),
        "compare": (("compare", files["int8.nir"], "--num-images", 1, "--steps", 1, "--out", t), "compare.json"),
        "evaluate": (("evaluate", files["spiking"], "--dataset", "builtin", "--num-images", 2, "--out", t / "r.json"),
                     "r.json"),
        "sweep": (("sweep", files["spiking"], "--dataset", "builtin", "--num-images", 2, "--out", t), "sweep.png"),
        "gamma": (("gamma", files["spiking"], "--dataset", "builtin", "--out", t / "g.npz"), "g.npz"),
        "convert": (("convert", files["spiking"], "--out", t / "snn.pt"), "snn.pt"),
        "train --restart": (("train", "--steps", 1, "--restart", "--out", t), "ckpt.pt"),
    }


FORCE_COMMANDS = ["export", "export lava", "simulate", "simulate layers", "simulate spikes", "sample", "energy",
                  "energy csv", "compare", "evaluate", "sweep", "gamma", "convert", "train --restart"]


@pytest.mark.parametrize("command", FORCE_COMMANDS)
def test_every_command_refuses_an_existing_output_without_force(files, tmp_path, capsys, command):
    """The same rule for every command, checked before the work: an existing output is one line, untouched, and
    nothing else is written."""
    args, name = _force_cases(files, tmp_path)[command]
    (tmp_path / name).write_bytes(b"precious")
    one_line_error(capsys, *args, needles=(f"{name} already exists; use --force",))
    assert (tmp_path / name).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_force_replaces_existing_outputs(files, tmp_path, capsys):
    (tmp_path / "e.json").write_text("old")
    code, _, err = run_cli(capsys, "energy", files["spiking.nir"], "--steps", 1, "--json", "--out",
                           tmp_path / "e.json", "--force")
    assert code in (0, None) and json.loads((tmp_path / "e.json").read_text())["totals"], err
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "images.npy").write_text("old")
    code, _, err = run_cli(capsys, *simulate_args(files["spiking.nir"], tmp_path), "--force")
    assert code in (0, None) and np.load(tmp_path / "sim" / "images.npy").shape[0] == 1, err
    assert not no_temporaries(tmp_path)


def test_outputs_that_are_inputs_are_refused_even_with_force(files, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    code, _, err = run_cli(capsys, *simulate_args(files["spiking.nir"], tmp_path))
    assert code in (0, None), err
    (tmp_path / "sim" / "stats.json").rename(stats)
    before = stats.read_bytes()
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(files["spiking"].read_bytes())
    for args in [("energy", stats, "--graph", files["spiking.nir"], "--out", stats, "--force"),
                 ("energy", stats, "--graph", files["spiking.nir"], "--json", "--out", files["spiking.nir"], "--force"),
                 ("convert", ckpt, "--out", ckpt, "--force"),
                 ("gamma", ckpt, "--dataset", "builtin", "--out", ckpt, "--force"),
                 ("evaluate", ckpt, "--dataset", "builtin", "--out", ckpt, "--force"),
                 ("export", ckpt, "--to", "lava", "-o", ckpt, "--force")]:
        one_line_error(capsys, *args, needles=("is the command's input",))
    assert stats.read_bytes() == before and ckpt.read_bytes() == files["spiking"].read_bytes()


@pytest.mark.parametrize("option", ["energy", "evaluate", "gamma", "convert", "export"])
def test_a_directory_where_a_file_is_expected(files, tmp_path, capsys, option):
    folder = tmp_path / "d"
    folder.mkdir()
    args = {"energy": ("energy", files["spiking.nir"], "--out", folder),
            "evaluate": ("evaluate", files["spiking"], "--dataset", "builtin", "--out", folder),
            "gamma": ("gamma", files["spiking"], "--dataset", "builtin", "--out", folder),
            "convert": ("convert", files["spiking"], "--out", folder),
            "export": ("export", files["spiking"], "--to", "nir", "-o", folder)}[option]
    one_line_error(capsys, *args, needles=("is a directory",))
    assert not any(folder.iterdir())


def test_the_output_is_checked_before_the_input_is_read(tmp_path, capsys):
    """The rule runs first: a missing checkpoint is not even opened when the output would be refused."""
    (tmp_path / "samples.npy").write_text("x")
    one_line_error(capsys, "sample", tmp_path / "missing.pt", "--out", tmp_path, needles=("already exists",))


# ------------------------------------------------------------------------- interrupts inside an HDF5 write


def test_ctrl_c_inside_an_hdf5_write_is_one_line_and_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    """SIGINT delivered inside h5py's object callbacks used to be printed ("Exception ignored in ...") and lost:
    export went on and exited 0. Now it is held until the in-memory file is complete, then ends the command
    (exit 130) before anything is written."""
    import signal
    import weakref

    real_write = nir.write

    def interrupted_write(*args, **kwargs):
        class Probe:
            pass

        weakref.finalize(Probe(), os.kill, os.getpid(), signal.SIGINT)  # the handler runs inside a callback
        return real_write(*args, **kwargs)

    monkeypatch.setattr(nir, "write", interrupted_write)
    code, out, err = run_cli(capsys, "export", files["spiking"], "--to", "nir", "-o", tmp_path / "m.nir")
    assert code == 130 and err.strip() == "error: interrupted; no partial output was left", (code, err)
    assert list(tmp_path.iterdir()) == []


def test_deferred_interrupts_hold_the_signal_until_the_block_ends():
    import signal

    from neurosdm.io import deferred_interrupts

    finished = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            finished = True
    assert finished and signal.getsignal(signal.SIGTERM) is not None


# -------------------------------------------------------------------------------- findings of the fuzz runs


@pytest.mark.parametrize("content, needle", [(b"", "an empty file"), (b"garbage", "garbage")])
def test_an_input_array_that_is_not_npy_is_one_line(tmp_path, capsys, content, needle):
    """An empty .npy raised EOFError inside numpy, which click turned into a bare "Aborted." (fuzz, array)."""
    path = foreign_graph(tmp_path)
    (tmp_path / "bad.npy").write_bytes(content)
    one_line_error(capsys, "simulate", path, "--input", tmp_path / "bad.npy", "--out", tmp_path / "o",
                   needles=("not a NumPy .npy file", needle))
    assert not (tmp_path / "o").exists()


def test_an_npy_header_declaring_more_than_the_file_holds(tmp_path, capsys):
    """A header edited to (400000000, 1, 3) made numpy allocate 9.6 GB (fuzz, array: MemoryError traceback)."""
    path = foreign_graph(tmp_path)
    data = (tmp_path / "x.npy").read_bytes().replace(b"(4, 1, 3)", b"(400000000, 1, 3)", 1)
    (tmp_path / "big.npy").write_bytes(data)
    np.savez(tmp_path / "big.npz", x=np.ones((4, 1, 3)))
    one_line_error(capsys, "simulate", path, "--input", tmp_path / "big.npy", "--out", tmp_path / "o",
                   needles=("declares 9,600,000,000 bytes",))


def test_an_expanded_tensor_is_refused_before_it_is_read(files, tmp_path, capsys):
    """A 10^9-element tensor stored in 4 bytes (torch.expand): the finite-value check allocated 1 GB (fuzz,
    memory: an allocation error traceback under a memory cap)."""
    path = edited_checkpoint(files, tmp_path, _set(["ema", "conv.weight"], torch.zeros(1).expand(100000, 10000)))
    one_line_error(capsys, "info", path, needles=("expanded tensor",))


def test_a_profile_value_beyond_float_range_is_one_line(files, tmp_path, capsys):
    text = (open(os.path.join(ROOT, "neurosdm", "hw_profiles", "loihi2.toml")).read())
    i = text.index("value =", text.index("[energy."))
    (tmp_path / "p.toml").write_text(text[:i] + "value = " + "9" * 400 + "\n#" + text[i + len("value ="):])
    one_line_error(capsys, "energy", files["spiking.nir"], "--profile", tmp_path / "p.toml", "--steps", 1,
                   needles=("finite",))


def test_a_profile_value_that_overflows_the_report_is_one_line(files, tmp_path, capsys):
    """A latency of 1e308 ns is finite, but times the counts it is infinite: the report printed and wrote "inf"
    with exit 0 (fuzz, profile). Now refused in one line, nothing written."""
    text = open(os.path.join(ROOT, "neurosdm", "hw_profiles", "loihi2.toml")).read()
    i = text.index("value =", text.index("[latency.synop]"))
    (tmp_path / "p.toml").write_text(text[:i] + "value = 1e308\n#" + text[i + len("value ="):])
    one_line_error(capsys, "energy", files["spiking.nir"], "--profile", tmp_path / "p.toml", "--steps", 1, "--out",
                   tmp_path / "e.txt", needles=("came out inf",))
    assert not (tmp_path / "e.txt").exists()


def test_a_string_where_a_node_parameter_is_expected(tmp_path, capsys):
    """An HDF5 edit that stores text as an Affine's bias: nir reads it, the translation raised ValueError (fuzz,
    nir_h5). Now the node check names the parameter."""
    import h5py

    path = foreign_graph(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["node/nodes/fc/bias"]
        f["node/nodes/fc/bias"] = "text"
    one_line_error(capsys, "simulate", path, "--input", tmp_path / "x.npy", "--out", tmp_path / "o",
                   needles=("bias must be numbers",))


def test_an_interrupt_lost_in_a_callback_is_raised_again():
    """SIGTERM whose KeyboardInterrupt lands in a callback whose exceptions Python only prints ("Exception ignored
    in ...": weakref or h5py callbacks) used to be lost, the command exiting 0 (fuzz, signal). It is raised again
    10 ms later, in ordinary code, and nothing is printed."""
    import signal
    import time
    import weakref

    from neurosdm.io import cancel_interrupts, interrupts_end_the_command

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    hook = sys.unraisablehook
    printed = []
    sys.unraisablehook = printed.append
    try:
        interrupts_end_the_command()

        class Probe:
            pass

        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            weakref.finalize(Probe(), os.kill, os.getpid(), signal.SIGTERM)  # runs at once, inside the callback
            time.sleep(5)
        assert time.monotonic() - start < 2 and printed == []
    finally:
        cancel_interrupts()
        sys.unraisablehook = hook
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_text_in_the_analog_heads_weights(files, tmp_path, capsys):
    """An HDF5 edit that stores text as host_head's tail_conv_weight: the host head raised ValueError (fuzz,
    nir_h5). Now the export-metadata check names the entry."""
    import h5py

    path = tmp_path / "int8.nir"
    path.write_bytes(files["int8.nir"].read_bytes())
    with h5py.File(path, "r+") as f:
        del f["node/metadata/host_head/tail_conv_weight"]
        f["node/metadata/host_head/tail_conv_weight"] = "text"
    one_line_error(capsys, *simulate_args(path, tmp_path), needles=("host_head['tail_conv_weight']",))


@pytest.mark.parametrize("edit", [(49, 4), (68, None)])  # both raised TokenError
def test_a_damaged_npy_header_is_one_line(tmp_path, capsys, edit):
    """A flipped byte or a zeroed block inside an .npy header: numpy's parser raised tokenize.TokenError (fuzz,
    array)."""
    path = foreign_graph(tmp_path)
    data = bytearray((tmp_path / "x.npy").read_bytes())
    at, bit = edit
    if bit is None:
        data[at:at + 512] = bytes(len(data[at:at + 512]))
    else:
        data[at] ^= bit
    (tmp_path / "bad.npy").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "simulate", path, "--input", tmp_path / "bad.npy", "--out", tmp_path / "o")
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err


@pytest.mark.parametrize("value", ["1e308", "-0.5", "nan", "inf", "1.5"])
def test_eta_outside_zero_to_one_is_one_line(files, tmp_path, capsys, value):
    """--eta 1e308 overflowed in the DDIM step (fuzz, argument: OverflowError traceback); one rule in sample and
    simulate."""
    one_line_error(capsys, "sample", files["spiking"], "--eta", value, "--num-images", 1, "--steps", 3, "--out",
                   tmp_path / "s", needles=("--eta",))
    one_line_error(capsys, *simulate_args(files["spiking.nir"], tmp_path), "--eta", value, needles=("--eta",))
    assert not (tmp_path / "s").exists() and not (tmp_path / "sim").exists()


def test_export_of_huge_images_is_refused_before_the_graph_is_built(files, tmp_path, capsys):
    """image_size 4096 (the largest accepted) with the tiny model: its graph would hold about 300 M neurons; the
    export refuses with the estimate before building anything large (the long fuzz profile's last finding)."""
    path = edited_checkpoint(files, tmp_path, _set(["config", "model", "image_size"], 4096))
    one_line_error(capsys, "export", path, "--to", "nir", "-o", tmp_path / "big.nir", needles=("neurons", "GB"))
    assert not (tmp_path / "big.nir").exists()
