"""The up-sampling extension node (neurosdm.graph.dialect.UPSAMPLE_RULE) and deep UNets through the whole path:
by hand on every backend, in a type-checked file, and 3- and 4-level UNets exported exactly (float: the torch model
within 1e-5; int8: the event and torch engines bit for bit), TSM or not, both heads, public checkpoint layouts."""

import re

import nir
import numpy as np
import pytest
import torch

from conftest import invoke, tiny_model
from neurosdm.config import DiffusionConfig, ModelConfig
from neurosdm.exporters.fixed_point import calibrate, calibration_inputs, quantize_graph
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.graph.dialect import quantize_input, upsample_factor, upsample_node
from neurosdm.graph.inspect import graph_size, inspect_nir
from neurosdm.graph.program import load_program
from neurosdm.models import SpikingUNet
from neurosdm.simulators.event import EventEngine
from neurosdm.simulators.reference import run_graph, run_reference
from neurosdm.simulators.torch_engine import TorchEngine

ATOL = 1e-5


def _chain(shape=(2, 4, 6)):
    c, h, w = shape
    return nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array(shape)}), "up": upsample_node(shape),
                               "output": nir.Output(output_type={"output": np.array([c, 2 * h, 2 * w])})},
                        edges=[("input", "up"), ("up", "output")], metadata={})


def test_upsample_by_hand_on_every_backend(tmp_path):
    nir.write(tmp_path / "up.nir", _chain())
    graph = nir.read(tmp_path / "up.nir")  # type-checked
    assert upsample_factor(graph.nodes["up"]) == (2, 2) and upsample_factor(graph.nodes["output"]) is None
    x = np.arange(2 * 2 * 4 * 6, dtype=np.float64).reshape(1, 2, 2, 4, 6)  # [T, B, C, H, W]
    want = x[0].repeat(2, axis=2).repeat(2, axis=3)
    assert want[1, 1, 5, 7] == x[0, 1, 1, 2, 3]  # y[c, 2i+a, 2j+b] = x[c, i, j]
    np.testing.assert_array_equal(run_graph(graph, x)["outputs"]["output"][0], want)
    program = load_program(tmp_path / "up.nir")
    assert [layer.kind for layer in program.layers] == ["input", "upsample", "output"]
    for engine in (EventEngine(program), TorchEngine(program)):
        res = engine.run(x[0])
        np.testing.assert_array_equal(res["outputs"]["output"][0], want)
        assert "up" not in res["counts"]  # routing: the consumer counts the copies
    rows, _ = inspect_nir(tmp_path / "up.nir")
    assert [r["type"] for r in rows if r["name"] == "up"] == ["Upsample x2x2 (neurosdm)"]


def test_upsample_node_refuses_what_it_cannot_type():
    from neurosdm.errors import GraphError

    with pytest.raises(GraphError, match="same parity"):
        upsample_node((2, 5, 4))
    bad = upsample_node((2, 4, 4))
    bad.metadata["scale_factor"] = np.array([0, 2])
    with pytest.raises(GraphError, match="two positive integers"):
        upsample_factor(bad)


# ------------------------------------------------------------------------------------------ deep UNets, exact

DEEP = [("spiking", (1, 1, 1, 1), False), ("sdm", (1, 1, 1, 1), True), ("sdm", (1, 1, 2, 2, 2), False),
        ("spiking", (1, 1, 2, 2, 2), True)]


def _deep(head, ch_mult, tsm):
    return tiny_model(head, ch_mult, image_size=16, ch=4, num_steps=2, tsm=tsm)


def _conv_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


@pytest.mark.parametrize("head,ch_mult,tsm", DEEP)
def test_deep_unet_float_export_matches_torch(head, ch_mult, tsm):
    model = _deep(head, ch_mult, tsm)
    graph, md = to_nir_graph(model)  # auto: more than one up-sampling level -> the extension node
    levels = len(ch_mult) - 1
    ups = [n for n, node in graph.nodes.items() if upsample_factor(node)]
    assert md["upsample"] == "extension" and md["packed_levels"] == 0 and len(ups) == levels
    # the graph's convs hold the model's own conv weights, no more (the sdm head's two convs run on the host; an
    # up-sampling node's placeholder, C x C zeros, is not a conv of the graph)
    host = model.tail_conv.weight.numel() + model.T_output_layer.weight.numel() if head == "sdm" else 0
    assert graph_size(graph)["conv_weights"] + host == _conv_weights(model)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for t in (0, 37):
        eps, _ = run_reference(graph, md, x.double().numpy(), t)
        with torch.no_grad():
            ref = model(x, torch.full((2,), t)).double().numpy()
        assert np.abs(eps - ref).max() < ATOL, (t, np.abs(eps - ref).max())


@pytest.mark.parametrize("head,ch_mult,tsm", DEEP)
def test_deep_unet_int8_engines_are_bit_identical(head, ch_mult, tsm):
    model = _deep(head, ch_mult, tsm)
    graph, md = to_nir_graph(model, dtype=np.float64)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cal = calibrate(graph, md, calibration_inputs(images, DiffusionConfig(num_diffusion_steps=50), steps=2))
    qg, qmd = quantize_graph(graph, md, cal)
    program = load_program(qg)
    x, _ = quantize_input(np.random.default_rng(2).normal(size=(2, 1, 16, 16)), qmd)
    ev = EventEngine(program).run(x, 21, record=True)
    to = TorchEngine(program).run(x, 21, record=True)
    ref = run_graph(qg, x[None], num_steps=program.num_steps, record=True, t=21)
    for name, rec in ref["records"].items():
        np.testing.assert_array_equal(ev["records"][name], rec, err_msg=name)
        np.testing.assert_array_equal(to["records"][name], rec, err_msg=name)
    assert {k: {c: v.tolist() for c, v in cs.items()} for k, cs in ev["counts"].items()} == \
        {k: {c: v.tolist() for c, v in cs.items()} for k, cs in to["counts"].items()}
    spikes = [ev["records"][layer.name].mean() for layer in program.layers if layer.kind == "if"]
    assert 0.02 < np.mean(spikes) < 0.98  # neither silent nor saturated
    up_consumers = [layer for layer in program.layers
                    if layer.sources and program.by_name[layer.sources[0]].kind == "upsample"]
    assert up_consumers and all(layer.input == "spikes" for layer in up_consumers)  # spikes stay spikes


def _sdm_layout(state: dict) -> dict:
    """A neurosdm state dict in the public SDM TSM layout (``x.tsmconv.weight`` for every conv with ``x.tsmp``)."""
    tsm = {k[:-len(".tsmp")] for k in state if k.endswith(".tsmp")}
    return {(re.sub(r"\.(weight|bias)$", r".tsmconv.\1", k) if k.rsplit(".", 1)[0] in tsm else k): v
            for k, v in state.items()}


@pytest.mark.parametrize("layout", ["sdm", "sddpm"])
def test_public_layout_three_level_checkpoint_exports(tmp_path, layout):
    """A 3-level UNet saved in the public SDM (TSM) / SDDPM layouts exports by default and reproduces the model."""
    torch.manual_seed(0)
    cfg = ModelConfig(img_ch=1, image_size=32, ch=4, ch_mult=(1, 1, 1, 1), num_res_blocks=1, num_steps=4,
                      num_diffusion_steps=1000, tsm=layout == "sdm")  # (the size and steps the reader assumes)
    model = SpikingUNet(cfg).eval()
    state = _sdm_layout(model.state_dict()) if layout == "sdm" else model.state_dict()
    torch.save({"net_model": state, "step": 1}, tmp_path / "public.pt")
    r = invoke("export", tmp_path / "public.pt", "--to", "nir")
    assert r.exit_code == 0, r.output
    graph = nir.read(tmp_path / "public.nir")
    assert graph.metadata["upsample"] == "extension" and int(graph.metadata["tsm"]) == (layout == "sdm")
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x, torch.full((2,), 300)).double().numpy()
    eps, _ = run_reference(graph, graph.metadata, x.double().numpy(), 300)
    assert np.abs(eps - ref).max() < 1e-4
    r = invoke("inspect", tmp_path / "public.nir")
    assert r.exit_code == 0 and "up-sampling: 3 neurosdm extension node(s)" in r.output


def test_upsample_option_forms(tmp_path):
    """--upsample polyphase keeps core NIR (readable by every NIR tool); auto picks it for one level."""
    model = tiny_model("spiking", (1, 2))
    assert to_nir_graph(model)[1]["upsample"] == "polyphase"
    graph, md = to_nir_graph(model, upsample="extension")
    assert md["upsample"] == "extension" and "upsample_rule" in md
    from neurosdm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown --upsample"):
        to_nir_graph(model, upsample="bilinear")
