"""Configuration dataclasses. Checkpoints store them, so every later command rebuilds the model alone.

Naming: ``num_steps`` is the number of spiking time steps per network call (T_snn in the papers);
``num_diffusion_steps`` is the length of the diffusion schedule; ``t`` is a diffusion step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field

from neurosdm.errors import ConfigError

#: hard bounds of sizes (a file or an option beyond them is refused before anything is allocated); memory is
#: bounded separately by :func:`check_memory`
LIMITS = {"img_ch": 64, "image_size": 4096, "ch": 1 << 16, "ch_mult": 64, "levels": 12, "num_res_blocks": 64,
          "num_steps": 4096, "num_diffusion_steps": 1_000_000, "num_images": 10_000_000, "batch_size": 1 << 20}
MEMORY_ENV = "NEUROSDM_MEMORY_LIMIT_GB"


def memory_limit_bytes() -> int:
    """The memory a command may plan to use: ``$NEUROSDM_MEMORY_LIMIT_GB`` if set, else 80% of the memory
    available now (``MemAvailable`` of /proc/meminfo; physical memory where that is unknown)."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ConfigError(f"{MEMORY_ENV} must be a number of gigabytes, got {env!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{MEMORY_ENV} must be a positive number of gigabytes, got {env!r}")
        return int(value * 1e9)
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return int(0.8 * kb * 1024)
    except (OSError, StopIteration, ValueError, IndexError):
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_memory(what: str, nbytes: float) -> None:
    """:class:`ConfigError` when ``what`` would need more than :func:`memory_limit_bytes` (checked before
    allocating it)."""
    limit = memory_limit_bytes()
    if nbytes > limit:
        raise ConfigError(f"{what} needs about {nbytes / 1e9:.3g} GB, more than the {limit / 1e9:.3g} GB this "
                          f"machine can give (set {MEMORY_ENV} to raise the limit)")


def check_count(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """The one rule for integer options and sizes: an integer in ``lo..hi`` (``hi``: :data:`LIMITS` of ``name``
    when not given)."""
    hi = LIMITS.get(name.lstrip("-").replace("-", "_"), hi) if hi is None else hi
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be in {lo}..{hi}, got {value}" if hi is not None else
                          f"{name} must be at least {lo}, got {value}")
    return int(value)


def check_positive(name: str, value) -> float:
    """The one rule for real-valued options that must be positive and finite (learning rate, threshold scale)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_real(name: str, value, lo: float, hi: float) -> float:
    """The one rule for real-valued options with a range: a finite number in ``[lo, hi]`` (DDIM's eta)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


_KINDS = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}


def check_fields(obj) -> None:
    """Type check of a config dataclass as read from a checkpoint (any value may have been edited): ints are
    integers (not bools), floats finite numbers, bools bools, strings strings; numbers become Python numbers."""
    section = type(obj).__name__
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type).replace(" | None", "")
        optional = "None" in str(f.type)
        if value is None and optional:
            continue
        if kind in _KINDS:
            ok = isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))
            if kind == "float" and ok and not math.isfinite(value):
                ok = False
            if not ok:
                expected = {"float": "a finite number", "int": "an integer", "bool": "true or false",
                            "str": "a string"}[kind]
                raise ConfigError(f"config {section}.{f.name} must be {expected}, got {value!r}")
            setattr(obj, f.name, {"int": int, "float": float}.get(kind, lambda v: v)(value))
        elif kind.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or len(value) > LIMITS["levels"] or \
                    not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"config {section}.{f.name} must be a list of at most {LIMITS['levels']} integers, "
                                  f"got {value!r}")
        elif kind == "dict":
            if not isinstance(value, dict) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in value.values()):
                raise ConfigError(f"config {section}.{f.name} must be a table of finite numbers, got {value!r}")
    for name, hi in LIMITS.items():
        if name in {f.name for f in dataclasses.fields(obj)} and name not in ("ch_mult",):
            check_count(f"config {section}.{name}", getattr(obj, name), 1, hi)


SCHEDULE_SYNTAX = ("a comma-separated list of rules 't<A:K' (diffusion steps t below A run K spiking steps; A "
                   "increasing) ending in a bare default K, e.g. 't<300:4,t<700:3,2'; or one K")


def parse_steps_schedule(spec: str, num_diffusion_steps: int, max_steps: int | None = None
                         ) -> tuple[tuple[int, int], ...]:
    """The spiking-steps schedule ``num_steps(t)`` from its text (:data:`SCHEDULE_SYNTAX`): segments ``((A_1, K_1),
    ..., (N, K_default))`` with ``A`` increasing in ``1..N-1`` and the last segment ending at ``N =
    num_diffusion_steps``; diffusion step ``t`` runs the ``K`` of the first segment with ``t < A``
    (:func:`schedule_steps`). ``max_steps``: the largest ``K`` allowed (a TSM model's trained steps), else
    ``LIMITS["num_steps"]``."""
    hi = max_steps or LIMITS["num_steps"]
    parts = [p.strip() for p in str(spec).split(",")]
    segments: list[tuple[int, int]] = []

    def steps(text: str) -> int:
        try:
            k = int(text)
        except ValueError:
            raise ConfigError(f"steps schedule {spec!r}: {text!r} is not a number of spiking steps; "
                              f"{SCHEDULE_SYNTAX}") from None
        if not 1 <= k <= hi:
            raise ConfigError(f"steps schedule {spec!r}: spiking steps must be in 1..{hi}, got {k}"
                              + (" (a TSM model has one scale per trained step)" if max_steps else ""))
        return k

    for i, part in enumerate(parts):
        if i == len(parts) - 1:
            segments.append((int(num_diffusion_steps), steps(part)))
            break
        cond, sep, k = part.partition(":")
        cond = cond.replace(" ", "")
        if not sep or not cond.startswith("t<"):
            raise ConfigError(f"steps schedule {spec!r}: rule {part!r} is not 't<A:K'; {SCHEDULE_SYNTAX}")
        try:
            a = int(cond[2:])
        except ValueError:
            raise ConfigError(f"steps schedule {spec!r}: {cond[2:]!r} is not a diffusion step") from None
        lo = segments[-1][0] + 1 if segments else 1
        if not lo <= a <= num_diffusion_steps - 1:
            raise ConfigError(f"steps schedule {spec!r}: bound t<{a} must be in {lo}..{num_diffusion_steps - 1} "
                              f"(increasing, inside the {num_diffusion_steps}-step schedule)")
        segments.append((a, steps(k)))
    return tuple(segments)


def schedule_steps(segments, t: int) -> int:
    """``num_steps(t)`` of a parsed schedule (:func:`parse_steps_schedule`): the ``K`` of the first segment whose
    bound exceeds ``t``."""
    for bound, k in segments:
        if t < bound:
            return int(k)
    raise ConfigError(f"diffusion step {t} lies outside the steps schedule {list(segments)}")


def format_steps_schedule(segments) -> str:
    """The text of a parsed schedule (the inverse of :func:`parse_steps_schedule`)."""
    return ",".join([f"t<{a}:{k}" for a, k in segments[:-1]] + [str(segments[-1][1])])


@dataclass
class ModelConfig:
    """The spiking UNet (SDDPM ``Spk_UNet`` / SDM ``Spk_UNet_TSM`` architecture)."""

    img_ch: int = 1
    image_size: int = 28
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    num_steps: int = 4  # spiking time steps per network call (T_snn)
    num_diffusion_steps: int = 1000  # rows of the sinusoidal time-embedding table
    tsm: bool = False  # temporal-wise spiking mechanism: a learnable scale per spiking step on every conv
    threshold: float = 1.0  # trained firing threshold of every IF neuron
    threshold_scale: float = 1.0  # threshold guidance: inference threshold = threshold * threshold_scale
    head: str = "sdm"  # "sdm": the papers' analog Swish head; "spiking": IF -> conv -> leaky-integrator readout
    readout_decay: float = 0.8  # membrane output: out = sum_t readout_decay**(num_steps-1-t) * h[t]
    surrogate: str = "atan"  # "atan" (alpha 2, as the public code) or "rect"
    surrogate_alpha: float = 2.0
    dropout: float = 0.0  # accepted for layout compatibility; never applied (as in the public code)
    # ANN-to-SNN conversion (neurosdm.convert, docs/convert.md). activation "qcfs": the ANN (every IF replaced by a
    # QCFS activation with a learnable clip, qcfs_bits bits, one step: num_steps 1). A converted SNN has
    # activation "if", reset "subtract", v_init 0.5, readout "mean" and one threshold per IF layer in thresholds.
    activation: str = "if"  # "if": spiking neurons; "qcfs": quantised clip-floor-shift ANN activation
    qcfs_bits: int = 2  # QCFS levels L = 2**qcfs_bits - 1 (the converted SNN runs L spiking steps)
    qcfs_clip_init: float = 2.0  # initial learnable clip of every QCFS layer
    reset: str = "hard"  # IF reset: "hard" (to 0, the papers') or "subtract" (by the threshold)
    v_init: float = 0.0  # initial membrane of every IF neuron, as a fraction of its threshold
    thresholds: dict = field(default_factory=dict)  # per-layer thresholds {neuron module name: threshold}
    readout: str = "leaky"  # "leaky": sum_t readout_decay**(num_steps-1-t) h[t]; "mean": the time average (below)
    # sampling: spiking steps per network call as a function of the diffusion step (parse_steps_schedule); "" runs
    # num_steps at every call. Like threshold_scale an inference setting: training always runs num_steps
    steps_schedule: str = ""

    def __post_init__(self):
        check_fields(self)
        if self.steps_schedule:
            parse_steps_schedule(self.steps_schedule, self.num_diffusion_steps, self.num_steps if self.tsm else None)
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.thresholds = {str(k): float(v) for k, v in dict(self.thresholds).items()}
        if self.activation not in ("if", "qcfs"):
            raise ConfigError(f"activation must be 'if' or 'qcfs', got {self.activation!r}")
        if self.activation == "qcfs":
            if not 1 <= self.qcfs_bits <= 8:
                raise ConfigError(f"qcfs_bits must be in 1..8, got {self.qcfs_bits}")
            if self.num_steps != 1:
                raise ConfigError(f"a QCFS ANN runs one step (num_steps 1), got num_steps {self.num_steps}")
            if self.tsm:
                raise ConfigError("TSM scales spiking steps; a QCFS ANN has one step: turn TSM off")
            if not self.qcfs_clip_init > 0:
                raise ConfigError(f"qcfs_clip_init must be positive, got {self.qcfs_clip_init}")
        if self.reset not in ("hard", "subtract"):
            raise ConfigError(f"reset must be 'hard' or 'subtract', got {self.reset!r}")
        if not 0.0 <= self.v_init < 1.0:
            raise ConfigError(f"v_init must be in [0, 1) (a fraction of the threshold), got {self.v_init}")
        if any(not v > 0 for v in self.thresholds.values()):
            raise ConfigError(f"thresholds must be positive, got {self.thresholds}")
        if self.readout not in ("leaky", "mean"):
            raise ConfigError(f"readout must be 'leaky' or 'mean', got {self.readout!r}")
        if self.readout == "mean" and self.tsm:
            raise ConfigError("readout 'mean' (converted SNNs) is not implemented with TSM")
        if self.head not in ("sdm", "spiking"):
            raise ConfigError(f"head must be 'sdm' or 'spiking', got {self.head!r}")
        if self.surrogate not in ("atan", "rect"):
            raise ConfigError(f"surrogate must be 'atan' or 'rect', got {self.surrogate!r}")
        if self.ch <= 0 or self.ch % 2:
            raise ConfigError(f"ch must be a positive even number, got {self.ch}")
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if not self.ch_mult or any(not 1 <= m <= LIMITS["ch_mult"] for m in self.ch_mult):
            raise ConfigError(f"ch_mult must be a non-empty list of positive integers, got {list(self.ch_mult)}")
        if self.image_size % (2 ** (len(self.ch_mult) - 1)):
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by 2**(len(ch_mult)-1) = {2 ** (len(self.ch_mult) - 1)}"
            )


@dataclass
class DiffusionConfig:
    """Forward process q(x_t | x_0) (Ho et al. 2020)."""

    num_diffusion_steps: int = 1000
    schedule: str = "linear"  # "linear" (beta_start..beta_end) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        check_fields(self)
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.num_diffusion_steps < 1:
            raise ConfigError("num_diffusion_steps must be >= 1")


@dataclass
class TrainConfig:
    dataset: str = "builtin"
    data_dir: str | None = None
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 100
    steps: int = 2000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    bf16: bool = False
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 500
    num_workers: int = 0
    # quantisation-aware training: every spiking-path conv runs with fake-quantised (BN-folded) weights, BN
    # statistics frozen (SpikingUNet.set_qat, Trainer); qat_weight_bits: signed weight mantissa width
    qat: bool = False
    qat_weight_bits: int = 8
    # firing-rate regularisation (neurosdm.train.rate_penalty): loss += rate_penalty * mean over IF layers of
    # max(0, rate - rate_target), rate = the layer's spikes per neuron per spiking step in the batch
    rate_penalty: float = 0.0
    rate_target: float = 0.0

    def __post_init__(self):
        check_fields(self)
        check_positive("config TrainConfig.lr", self.lr)
        for name in ("warmup", "steps", "log_every", "sample_every", "ckpt_every", "num_workers"):
            check_count(f"config TrainConfig.{name}", getattr(self, name), 0, None)
        if not 0.0 <= self.ema_decay <= 1.0 or self.grad_clip < 0:
            raise ConfigError(f"config TrainConfig needs ema_decay in [0, 1] and grad_clip >= 0, got "
                              f"{self.ema_decay} and {self.grad_clip}")
        if not 2 <= self.qat_weight_bits <= 24:
            raise ConfigError(f"qat_weight_bits must be in 2..24, got {self.qat_weight_bits}")
        if self.rate_penalty < 0:
            raise ConfigError(f"--rate-penalty must be >= 0, got {self.rate_penalty}")
        if not 0.0 <= self.rate_target < 1.0:
            raise ConfigError(f"--rate-target must be in [0, 1) (spikes per neuron per step), got {self.rate_target}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["ch_mult"] = list(self.model.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict) or not all(isinstance(d.get(k, {}), dict) for k in ("model", "diffusion", "train")):
            found = {k: type(v).__name__ for k, v in d.items()} if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"checkpoint config must be a table with tables 'model', 'diffusion', 'train'; got "
                              f"{found}")
        try:
            return cls(
                model=ModelConfig(**d.get("model", {})),
                diffusion=DiffusionConfig(**d.get("diffusion", {})),
                train=TrainConfig(**d.get("train", {})),
            )
        except TypeError as e:  # unknown or missing keys
            raise ConfigError(f"checkpoint config does not fit this neurosdm version: {e}") from None


# Presets. `tiny` gives garment-like samples after ~10 minutes and recognisable ones in about an hour on
# 2 CPU cores (docs/pretrained.md: the shipped checkpoint is this preset); `small` is meant for Fashion-MNIST
# quality (2.4-4.3 s per step on 2 CPU cores, so a GPU job); `paper-cifar10` is the papers' exact CIFAR-10
# configuration (66,696,413 parameters, TSM off).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        model=dict(img_ch=1, image_size=28, ch=16, ch_mult=(1, 2), num_res_blocks=1, num_steps=4),
        diffusion=dict(num_diffusion_steps=1000),
        train=dict(batch_size=32, lr=1e-3, warmup=100, steps=5000, ema_decay=0.995, ckpt_every=250),
    ),
    "small": dict(
        model=dict(img_ch=1, image_size=28, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, num_steps=4),
        diffusion=dict(num_diffusion_steps=1000),
        train=dict(batch_size=64, lr=5e-4, warmup=500, steps=50000, ema_decay=0.9995, ckpt_every=1000),
    ),
    # the papers' UNet on Fashion-MNIST (1 channel, resized to 32x32 so that 3 down-sampling levels divide it):
    # scripts/gpu_paper_fashion.sh trains it on GPUs (the paper's SDDPM figure: Inception FID 21.38, num_steps 4)
    "paper-fashion": dict(
        model=dict(img_ch=1, image_size=32, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, num_steps=4),
        diffusion=dict(num_diffusion_steps=1000, beta_start=1e-4, beta_end=0.02),
        train=dict(dataset="fashion-mnist", batch_size=128, lr=2e-4, warmup=5000, steps=500000, ema_decay=0.9999,
                   ckpt_every=5000),
    ),
    "paper-cifar10": dict(
        model=dict(img_ch=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, num_steps=4),
        diffusion=dict(num_diffusion_steps=1000, beta_start=1e-4, beta_end=0.02),
        train=dict(dataset="cifar10", batch_size=128, lr=2e-4, warmup=5000, steps=500000, ema_decay=0.9999,
                   ckpt_every=5000),
    ),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return Config(
        model=ModelConfig(**p["model"]),
        diffusion=DiffusionConfig(**p["diffusion"]),
        train=TrainConfig(**p["train"]),
    )
