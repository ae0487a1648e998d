import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neurosdm.checkpoint import load_checkpoint, load_model, save_checkpoint
from neurosdm.config import Config, DiffusionConfig, ModelConfig, TrainConfig
from neurosdm.errors import CheckpointError, ConfigError
from neurosdm.train import Trainer, config_with_overrides, ema_update, learning_rate, train

MODEL = dict(img_ch=1, image_size=8, ch=4, ch_mult=(1, 2), num_res_blocks=1, num_steps=2, num_diffusion_steps=20)


def tiny_config(**train) -> Config:
    return Config(ModelConfig(**MODEL), DiffusionConfig(num_diffusion_steps=20),
                  TrainConfig(**{"batch_size": 4, "steps": 6, "lr": 1e-3, "warmup": 2, "ckpt_every": 0,
                                 "log_every": 1, **train}))


def fake_data(n=32):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_resume_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config()
    full = Trainer(cfg, data=fake_data())
    for _ in range(6):
        full.step()
    half = Trainer(cfg, data=fake_data())
    for _ in range(3):
        half.step()
    half.save(tmp_path / "ckpt.pt")
    resumed = Trainer(cfg, data=fake_data())
    resumed.load_state(tmp_path / "ckpt.pt")
    assert resumed.step_count == 3
    for _ in range(3):
        resumed.step()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_training_reduces_loss():
    cfg = tiny_config(steps=100, lr=5e-3)
    ramp = torch.linspace(-1, 1, 8)
    data = (ramp[None, :] * ramp[:, None]).expand(8, 1, 8, 8).contiguous()  # one learnable image
    tr = Trainer(cfg, data=data)

    def held_out_loss():  # the same noise and diffusion steps before and after training
        with torch.no_grad():
            return sum(float(tr.diffusion.loss(tr.model, data, torch.Generator().manual_seed(s))) for s in range(8))

    before = held_out_loss()
    for _ in range(100):
        tr.step()
    assert held_out_loss() < 0.7 * before


def test_ema_update_and_warmup():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    tc = TrainConfig(lr=1.0, warmup=4)
    assert [learning_rate(k, tc) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_bf16_autocast_step_runs():
    tr = Trainer(tiny_config(bf16=True), data=fake_data())
    loss = tr.step()
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


def test_train_writes_checkpoint_log_and_samples(tmp_path):
    cfg = config_with_overrides(tiny_config(), **{"train.dataset": "builtin"})
    cfg.model.image_size = 8  # builtin images are resized to the model's size
    path = train(cfg, tmp_path, resume=False, num_sample_images=4)
    assert (tmp_path / "samples.png").exists() and (tmp_path / "samples.npy").exists()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6
    model, conf = load_model(path)
    assert conf == cfg and load_checkpoint(path).step == 6
    # running again resumes at step 6 == steps: nothing more to do, same weights
    before = load_checkpoint(path).model_state
    train(cfg, tmp_path, resume=True, num_sample_images=0)
    after = load_checkpoint(path).model_state
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tsm_finetune_init_inherits_weights(tmp_path):
    tr = Trainer(tiny_config(), data=fake_data())
    tr.step()
    tr.save(tmp_path / "base.pt")
    tsm_cfg = tiny_config()
    tsm_cfg.model.tsm = True
    ft = Trainer(tsm_cfg, data=fake_data())
    ft.load_state(tmp_path / "base.pt", weights_only_init=True)
    assert ft.step_count == 0
    sd = ft.model.state_dict()
    assert torch.equal(sd["conv.weight"], tr.model.state_dict()["conv.weight"])
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in sd.items() if k.endswith("tsmp"))


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset images"):
        Trainer(tiny_config(), data=torch.zeros(4, 3, 8, 8))


def test_corrupt_and_foreign_checkpoints(tmp_path):
    tr = Trainer(tiny_config(), data=fake_data())
    save_checkpoint(tmp_path / "good.pt", tr.config, tr.model)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|truncated or corrupt"):
        load_model(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"found keys \[weights\]"):
        load_model(tmp_path / "foreign.pt")
    torch.save({"net_model": {}, "obj": torch.nn.Linear(1, 1)}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks keep identical weights and rank 0 writes the checkpoint."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from neurosdm.config import Config, DiffusionConfig, ModelConfig, TrainConfig
        from neurosdm.train import Trainer, distributed
        cfg = Config(ModelConfig(**{MODEL!r}), DiffusionConfig(num_diffusion_steps=20),
                     TrainConfig(batch_size=4, steps=3, warmup=1))
        data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with distributed("cpu"):
            tr = Trainer(cfg, data=data)
            assert tr.world == 2
            for _ in range(3):
                tr.step()
            flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1])
            tr.save("{tmp_path / 'ckpt.pt'}")
            print("rank", tr.rank, "ok")
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(NEUROSDM_COMPILE="0", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[:4000]  # the workers' own messages come first
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout
    assert load_checkpoint(tmp_path / "ckpt.pt").step == 3


def test_recalibrate_batchnorm_restores_statistics():
    cfg = tiny_config()
    tr = Trainer(cfg, data=fake_data())
    for _ in range(3):
        tr.step()
    model = tr.model
    bn = model.bn
    model.train()
    expected = None

    def grab(mod, inp, out):  # the statistics of the stem BN's input in one big batch: the stem conv's output
        nonlocal expected  # (the model adds the conv's bias and TSM scale in the fused BatchNorm)
        x = out + mod.bias.view(1, 1, -1, 1, 1)
        p = mod.scale()
        x = x if p is None else x * p
        expected = x.mean(dim=(0, 1, 3, 4))

    with torch.no_grad():
        bn.running_mean.fill_(100.0)
        from neurosdm.train import recalibrate_batchnorm
        recalibrate_batchnorm(model, tr.data, tr.diffusion, num_batches=1, batch_size=len(tr.data), seed=3)
    assert bn.momentum == 0.1 and bn.running_mean.abs().max() < 10
    h = model.conv.register_forward_hook(grab)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(tr.data, torch.randint(0, 20, (len(tr.data),), generator=g))
    h.remove()
    # the stem sees the image through the first conv only: its mean does not depend much on t or noise
    assert torch.allclose(bn.running_mean, expected, atol=0.2)


def test_ema_decay_warmup():
    from neurosdm.train import ema_decay
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(10_000, 0.999) == 0.999
