"""The float NIR export reproduces the torch SpikingUNet (eval mode) in the reference interpreter."""

import nir
import numpy as np
import pytest
import torch
from conftest import tiny_model

from neurosdm.errors import ConfigError
from neurosdm.exporters.nir import to_nir_graph
from neurosdm.graph.dialect import graph_at
from neurosdm.graph.host import eps_from_outputs, host_head
from neurosdm.graph.inspect import graph_size
from neurosdm.models import SpikingUNet
from neurosdm.simulators.reference import run_graph

CORE = (nir.Input, nir.Output, nir.Conv2d, nir.Scale, nir.IF, nir.LI)
STEPS = (0, 17, 49)
ATOL = 1e-5


def _torch_eps(model, x, t):
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), t)).double().numpy()


def _graph_eps(graph, metadata, x, record=False, t=None):
    """eps of the graph; with ``t``, the parameters of diffusion step t at every spiking step (its tables)."""
    res = run_graph(graph, x.double().numpy()[None], num_steps=int(metadata["num_steps"]), record=record, t=t)
    return eps_from_outputs(res["outputs"]["output"], metadata), res["records"]


CASES = [("spiking", (1, 2), 8, 4, 3, False), ("sdm", (1, 2), 8, 4, 3, False), ("spiking", (1, 2, 2), 8, 4, 3, False),
         ("sdm", (1, 2, 2), 8, 4, 3, False), ("spiking", (1, 2, 2), 16, 8, 4, False), ("sdm", (1, 2, 2), 16, 8, 2, False),
         ("spiking", (1, 2), 8, 4, 3, True), ("sdm", (1, 2), 8, 4, 4, True), ("spiking", (1, 2, 2), 16, 8, 4, True),
         ("sdm", (1, 2, 2), 8, 4, 2, True)]


@pytest.mark.parametrize("form", ["polyphase", "extension"])
@pytest.mark.parametrize("head,ch_mult,size,ch,num_steps,tsm", CASES)
def test_export_matches_torch(head, ch_mult, size, ch, num_steps, tsm, form):
    """Both up-sampling forms (core-NIR polyphase, the up-sampling extension node) reproduce the model."""
    model = tiny_model(head, ch_mult, image_size=size, ch=ch, num_steps=num_steps, tsm=tsm)
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(1))
    graph, md = to_nir_graph(model, upsample=form)
    assert md["diffusion_step"] == 0 and graph.metadata is md and md["upsample"] == form
    assert md["packed_levels"] == (len(ch_mult) - 1 if form == "polyphase" else 0)
    refs = {}
    for t in STEPS:
        eps, records = _graph_eps(graph, md, x, record=(t == STEPS[0]), t=t)
        refs[t] = _torch_eps(model, x, t)
        assert eps.shape == refs[t].shape
        err = np.abs(eps - refs[t]).max()
        assert err < ATOL, (head, ch_mult, t, err)
        if records:  # the IF neurons neither all stay silent nor all fire: the comparison is not trivial
            rates = [records[n].mean() for n, node in graph.nodes.items() if isinstance(node, nir.IF)]
            assert 0.05 < np.mean(rates) < 0.95
            assert np.mean([r > 0 for r in rates]) > 0.6
    # the diffusion step matters, and the graph as returned holds step 0
    assert np.abs(refs[0] - refs[49]).max() > 100 * ATOL
    if tsm:  # the per-step tables matter: the graph's own (step 0) parameters at every step are wrong
        assert md["scale_tables"] and all(np.ptp(v) > 0.5 for v in md["scale_tables"].values())
        assert np.abs(_graph_eps(graph, md, x)[0] - refs[0]).max() > 100 * ATOL
    else:
        assert not md["scale_tables"] and all(v.shape[1] == 1 for v in md["bias_tables"].values())
        eps0, _ = _graph_eps(graph, md, x)
        assert np.abs(eps0 - refs[0]).max() < ATOL


@pytest.mark.parametrize("head", ["spiking", "sdm"])
def test_default_step_and_bias_tables(head):
    model = tiny_model(head)
    graph, md = to_nir_graph(model, diffusion_step=17)
    assert md["diffusion_step"] == 17
    for name, table in md["bias_tables"].items():
        assert table.shape == (50, 1, graph.nodes[name].weight.shape[0])
        np.testing.assert_allclose(graph.nodes[name].bias, table[17, 0], rtol=1e-6, atol=1e-7)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    eps, _ = _graph_eps(graph, md, x)
    assert np.abs(eps - _torch_eps(model, x, 17)).max() < ATOL
    assert "table[t if A > 1 else 0, k if K > 1 else 0]" in md["bias_table_rule"]
    with pytest.raises(ConfigError):
        to_nir_graph(model, diffusion_step=50)


@pytest.mark.parametrize("head,ch_mult,tsm", [("spiking", (1, 2), False), ("sdm", (1, 2, 2), False),
                                              ("spiking", (1, 2), True)])
def test_write_read_round_trip(tmp_path, head, ch_mult, tsm):
    model = tiny_model(head, ch_mult, tsm=tsm)
    graph, md = to_nir_graph(model, upsample="polyphase")
    path = tmp_path / "model.nir"
    nir.write(path, graph)
    back = nir.read(path)  # type-checks every edge and accepts only known node types
    assert set(back.nodes) == set(graph.nodes)
    assert {tuple(e) for e in back.edges} == {tuple(e) for e in graph.edges}
    assert all(type(n) in CORE for n in back.nodes.values())
    bmd = back.metadata
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in (0, 49):
        ref = _torch_eps(model, x, t)
        eps_mem, _ = _graph_eps(graph, md, x, t=t)
        eps_file, _ = _graph_eps(back, bmd, x, t=t)  # metadata as read back
        np.testing.assert_array_equal(eps_file, eps_mem)
        assert np.abs(eps_file - ref).max() < ATOL


def test_graph_contents():
    model = tiny_model("spiking", (1, 2))
    graph, md = to_nir_graph(model)
    assert all(type(n) in CORE for n in graph.nodes.values())
    ifs = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert ifs
    for n in ifs:  # full per-neuron arrays, threshold guidance applied
        for p in (n.r, n.v_threshold, n.v_reset):
            assert np.ndim(p) == 3
        np.testing.assert_allclose(n.v_threshold, 0.97, rtol=1e-6)
        assert np.all(n.r == 1) and np.all(n.v_reset == 0)
    li = graph.nodes["tail.readout"]
    assert isinstance(li, nir.LI)
    np.testing.assert_allclose(li.tau, 5.0, rtol=1e-6)
    np.testing.assert_allclose(li.r, 5.0, rtol=1e-6)
    assert np.all(li.v_leak == 0)
    # junctions are identity Scale nodes (without TSM there are no other Scale nodes)
    for name, n in graph.nodes.items():
        if isinstance(n, nir.Scale):
            assert name.endswith(".sum") and np.all(n.scale == 1)
    tsm_graph, tsm_md = to_nir_graph(tiny_model("spiking", (1, 2), tsm=True))
    convs = [n for n, node in tsm_graph.nodes.items() if isinstance(node, nir.Conv2d)]
    assert sorted(tsm_md["scale_tables"]) == sorted(f"{c}.tsm" for c in convs)  # one TSM scale per conv input
    for c in convs:
        assert (f"{c}.tsm", c) in tsm_graph.edges
        if not c.endswith("_skip"):  # a skip part has no bias: no table
            assert tsm_md["bias_tables"][c].shape[1] == 3
    for key in ("dt", "reset", "comparison", "num_steps", "tsm", "scale_tables", "quantized", "threshold", "threshold_scale", "head", "packed_levels",
                "neurosdm_version", "diffusion", "node_packing", "readout"):
        assert key in md
    assert md["dt"] == 1.0 and md["reset"] == "zero" and md["comparison"] == ">=" and md["readout"] == "last_step"
    assert md["diffusion"]["betas"].shape == (50,)
    assert md["node_packing"]["tail.readout"] == 1 and md["node_packing"]["down0.sum"] == 0

    def no_none(d):
        for v in d.values():
            assert v is not None
            if isinstance(v, dict):
                no_none(v)
    no_none(md)


def test_host_head_matches_torch_head():
    """host_head alone, on a random analog stream, against the torch head (SDM)."""
    model = tiny_model("sdm", (1, 2))
    _, md = to_nir_graph(model)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 2, 4, 8, 8))  # [num_steps, B, C, H, W] unpacked at full resolution
    from neurosdm.lowering import space_to_depth
    from neurosdm.models.spiking_unet import per_step
    from neurosdm.neurons import leaky_readout

    with torch.no_grad():
        z = torch.from_numpy(h).float()
        z = model.tail_conv(torch.nn.functional.silu(model.tail_bn(z)))
        w = model.T_output_layer.weight[..., 0]
        z = torch.nn.functional.silu(model.last_bn(per_step(
            lambda a: torch.nn.functional.conv2d(a, w, model.T_output_layer.bias, padding=1), z))) + z
        ref = leaky_readout(z, model.cfg.readout_decay).double().numpy()
    out = host_head(space_to_depth(h, levels=1), md)
    assert np.abs(out - ref).max() < ATOL


def test_size_report():
    model = tiny_model("spiking", (1, 2))
    size = graph_size(to_nir_graph(model)[0])
    assert size["nodes"] > 0 and size["conv_nonzero"] <= size["conv_weights"]


def test_deep_up_path_in_polyphase_form_is_refused_with_the_reason():
    """The paper's CIFAR-10 model (3 up-sampling levels) would store 6.9e9 polyphase weights: that form is refused
    up front (the default form of such a model is the up-sampling extension node: tests/test_upsample.py)."""
    from neurosdm.config import preset
    from neurosdm.exporters.packing import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="3 up-sampling levels.*6,902,291,840.*--upsample extension"):
        to_nir_graph(SpikingUNet(preset("paper-cifar10").model), upsample="polyphase")
