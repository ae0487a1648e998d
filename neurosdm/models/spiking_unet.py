"""The spiking UNet denoiser of SDDPM (Cao et al., WACV 2024) and SDM (Cao et al., 2024).

Architecture (reference/sdm.md), all tensors time-first ``[num_steps, B, C, H, W]``:

- input: the noisy float image x_t repeated over the ``num_steps`` spiking steps (direct encoding; the stem conv
  sees analog input)
- stem: conv3x3 -> BN -> IF -> conv3x3 -> BN
- ResBlock ("pre-spike"): ``h = BN1(conv1(IF1(x))) + temb_proj(temb); h = BN2(conv2(IF2(h))) + shortcut(x)``;
  shortcut is identity or a 1x1 conv on the float x. Blocks exchange floats; spikes exist only in front of convs.
- down: IF -> conv3x3 stride 2 -> BN;  up: IF -> nearest x2 -> conv3x3 -> BN;  skips concatenate floats
- time embedding (non-spiking): sinusoidal table -> Linear(ch, 4ch) -> Swish -> Linear(4ch, 4ch); per block
  ``temb_proj = Swish -> Linear(4ch, out_ch)``, identical at every spiking step
- head "sdm" (analog, the papers'): ``h = tail_conv(Swish(tail_bn(h)))``;
  ``h = Swish(last_bn(conv3d_(3,3,1)(h))) + h`` (the Conv3d is a per-step 2-D conv);
  ``eps = sum_t 0.8**(num_steps-1-t) h[t]`` (membrane output)
- head "spiking" (everything on chip): ``h = tail_conv(IF(tail_bn(h)))``; ``eps = sum_t 0.8**(num_steps-1-t) h[t]``
  (a leaky-integrator readout neuron)
- TSM: every conv's output (bias included) is multiplied by a learnable per-step scale ``p[t]`` before BN.
- readout "mean" (converted SNNs, :mod:`neurosdm.convert`): the rate readout. Spiking head:
  ``eps = (1/num_steps) sum_t h[t]``; "sdm" head: the head runs once on the time-averaged stream,
  ``eps = head(mean_t h[t])`` (the head is non-linear: averaging its per-step outputs would not converge to the ANN,
  whose head sees the rate; docs/convert.md has the measurement).
- ANN (``activation="qcfs"``): every IF is a :class:`~neurosdm.neurons.QCFS` activation, one step.
- per-layer thresholds (``cfg.thresholds``, neuron module name -> threshold), reset and initial membrane
  (``cfg.reset``, ``cfg.v_init``) of the IF neurons come from the config.
- QAT (:meth:`SpikingUNet.set_qat`): every conv of the spiking path runs with fake-quantised weights, for a conv
  followed by a BatchNorm the quantised BN-folded weight (as the exporter folds and rounds it), see :class:`Conv`.

Module names follow the public code so that its state dicts load with only the TSM key rename
(``<conv>.tsmconv.weight`` -> ``<conv>.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from neurosdm.config import ModelConfig
from neurosdm.errors import ConfigError
from neurosdm.models.tsm_norm import tsm_batchnorm
from neurosdm.neurons import QCFS, SpikingNeurons, leaky_readout
from neurosdm.quantize import fake_quant


def sinusoidal_table(num_diffusion_steps: int, dim: int) -> torch.Tensor:
    """Transformer position table ``[N, dim]``, interleaved: column 2i = sin(t w_i), 2i+1 = cos(t w_i),
    ``w_i = 10000**(-2i/dim)``."""
    freqs = torch.exp(-torch.arange(0, dim, 2) / dim * math.log(10000))
    angles = torch.arange(num_diffusion_steps).float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_diffusion_steps, dim)


def per_step(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 4-D op to a time-first 5-D tensor by folding time into the batch (a view for the layouts the model
    uses, so a channels-last tensor stays channels-last)."""
    y = fn(x.flatten(0, 1))
    return y.reshape(x.shape[0], x.shape[1], *y.shape[1:])


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x [num_steps, B, C, H, W]`` stored channels-last (memory order num_steps, B, H, W, C), the layout of every
    activation of the model: the CPU convolutions (oneDNN) run 1.2-1.5x faster in float32 and 2-4x in bfloat16
    than on channels-first tensors, and folding time into the batch keeps it (:func:`per_step`)."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


class _CatChannels(torch.autograd.Function):
    """``torch.cat([a, b], dim=2)`` of channels-last ``[num_steps, B, C, H, W]`` tensors whose gradients come back
    dense: autograd's own backward hands each input a channel slice of the gradient (strided at every pixel),
    and BatchNorm's backward on such a slice is 5-15x slower than on a dense tensor, more than the copy costs."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.split = a.shape[2]
        y = torch.cat([a.flatten(0, 1), b.flatten(0, 1)], dim=1)
        return y.reshape(a.shape[0], a.shape[1], *y.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        return (channels_last(grad[:, :, :ctx.split]), channels_last(grad[:, :, ctx.split:]))


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=2)`` for ``[num_steps, B, C, H, W]`` tensors, keeping the channels-last layout (a
    5-D cat would fall back to channels-first: torch reads channels-last 5-D tensors as ``N C D H W``), with dense
    gradients (:class:`_CatChannels`)."""
    return _CatChannels.apply(a, b)


class Conv(nn.Conv2d):
    """Conv2d over ``[num_steps, B, C, H, W]``; with TSM, the output of step t is scaled by ``tsmp[t]``.

    Quantisation-aware training: ``qat`` is None (float) or ``(bits, bn)``, set by :meth:`SpikingUNet.set_qat`
    (a plain attribute: no parameter, buffer or submodule, so the state dict is the same either way). The conv
    then uses :meth:`effective_weight`:

    - ``bn`` None (no BatchNorm after the conv): ``W_eff = fake_quant(W, None, bits)``;
    - ``bn`` the eval-mode BatchNorm after it, ``s = gamma / sqrt(running_var + eps)``:
      ``W_eff = fake_quant(W * s, None, bits) / s``, so that the BN afterwards applies exactly the quantised
      folded weight ``fake_quant(W * s)`` (up to one float rounding). ``W * s`` and the division are computed in
      float64, as :func:`neurosdm.lowering.fold_batchnorm` (the exporter's fold) does, so the mantissas are those
      of ``quantize_weight(fold_batchnorm(W, b, bn)[0])``. The gradient is straight-through (clamped, see
      :func:`neurosdm.quantize.fake_quant`) to ``W`` and, through ``s``, to ``gamma``.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, num_steps=4, tsm=False):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding)
        self.tsmp = nn.Parameter(torch.ones(num_steps, 1, 1, 1, 1)) if tsm else None
        self.qat: tuple[int, nn.Module | None] | None = None  # a tuple is not registered as a submodule
        self.steps: int | None = None  # spiking steps run now (SpikingUNet.set_spiking_steps); None: all of tsmp
        init.xavier_uniform_(self.weight)
        init.zeros_(self.bias)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: ``self.weight``, or its fake-quantised version under QAT."""
        if self.qat is None:
            return self.weight
        bits, bn = self.qat
        if bn is None:
            return fake_quant(self.weight, None, bits)
        w = self.weight.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
        s = (gamma / torch.sqrt(bn.running_var.double() + bn.eps)).reshape(-1, *([1] * (w.ndim - 1)))
        zero = s == 0  # a channel BN multiplies by 0: nothing to quantise; avoid 0/0
        q = fake_quant(w * s, None, bits)
        return torch.where(zero, w, q / torch.where(zero, torch.ones_like(s), s)).to(self.weight.dtype)

    def scale(self) -> torch.Tensor | None:
        """The TSM scales of the steps run now, ``[steps, 1, 1, 1, 1]`` (None without TSM)."""
        if self.tsmp is None:
            return None
        return self.tsmp if self.steps is None else self.tsmp[:self.steps]

    def forward(self, x: torch.Tensor, tsm: bool = True, bias: bool = True) -> torch.Tensor:
        """The convolution; without the TSM scale (``tsm=False``) or the bias (``bias=False``) for a caller that
        applies them itself (:func:`conv_bn`)."""
        w = self.effective_weight()
        y = per_step(lambda z: self._conv_forward(z, w, self.bias if bias else None), x)
        p = self.scale() if tsm else None
        # in the conv's output dtype: under bf16 autocast a float32 scale would promote every activation to float32
        return y if p is None else y * p.to(y.dtype)


def conv_bn(conv: Conv, bn: nn.BatchNorm2d, x: torch.Tensor, temb=None, shortcut=None, x_short=None):
    """``bn(conv(x)) + temb + shortcut(x_short)``, the biases, TSM scales, BatchNorm and adds in the fused passes
    of :mod:`neurosdm.models.tsm_norm` (``shortcut`` a :class:`Conv`, whose bias and TSM scale join them, or the
    identity)."""
    residual, rscale, rbias = x_short, None, None
    if x_short is not None and isinstance(shortcut, Conv):
        residual, rscale, rbias = shortcut(x_short, tsm=False, bias=False), shortcut.scale(), shortcut.bias
    return tsm_batchnorm(conv(x, tsm=False, bias=False), conv.scale(), bn, temb, residual, rscale, conv.bias, rbias)


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over ``[num_steps, B, C, H, W]``; statistics shared across spiking steps (as the public code)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_step(super().forward, x)


class TimeEmbedding(nn.Module):
    def __init__(self, num_diffusion_steps: int, ch: int, tdim: int):
        super().__init__()
        self.timembedding = nn.Sequential(
            nn.Embedding.from_pretrained(sinusoidal_table(num_diffusion_steps, ch)),
            nn.Linear(ch, tdim),
            nn.SiLU(),
            nn.Linear(tdim, tdim),
        )
        for m in self.timembedding:
            if isinstance(m, nn.Linear):
                init.xavier_uniform_(m.weight)
                init.zeros_(m.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, tdim: int, cfg: ModelConfig):
        super().__init__()
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, out_ch))
        init.xavier_uniform_(self.temb_proj[1].weight)
        init.zeros_(self.temb_proj[1].bias)
        self.neuron1 = _neurons(cfg)
        self.conv1 = Conv(in_ch, out_ch, 3, 1, 1, cfg.num_steps, cfg.tsm)
        self.bn1 = BatchNorm(out_ch)
        self.neuron2 = _neurons(cfg)
        self.conv2 = Conv(out_ch, out_ch, 3, 1, 1, cfg.num_steps, cfg.tsm)
        self.bn2 = BatchNorm(out_ch)
        self.shortcut = Conv(in_ch, out_ch, 1, 1, 0, cfg.num_steps, cfg.tsm) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = conv_bn(self.conv1, self.bn1, self.neuron1(x), temb=self.temb_proj(temb))
        return conv_bn(self.conv2, self.bn2, self.neuron2(h), shortcut=self.shortcut, x_short=x)


class DownSample(nn.Module):
    def __init__(self, ch: int, cfg: ModelConfig):
        super().__init__()
        self.neuron = _neurons(cfg)
        self.conv = Conv(ch, ch, 3, 2, 1, cfg.num_steps, cfg.tsm)
        self.bn = BatchNorm(ch)

    def forward(self, x, temb):
        return conv_bn(self.conv, self.bn, self.neuron(x))


class UpSample(nn.Module):
    def __init__(self, ch: int, cfg: ModelConfig):
        super().__init__()
        self.neuron = _neurons(cfg)
        self.conv = Conv(ch, ch, 3, 1, 1, cfg.num_steps, cfg.tsm)
        self.bn = BatchNorm(ch)

    def forward(self, x, temb):
        s = per_step(lambda z: F.interpolate(z, scale_factor=2, mode="nearest"), self.neuron(x))
        return conv_bn(self.conv, self.bn, s)


def _neurons(cfg: ModelConfig) -> SpikingNeurons | QCFS:
    """The activation in front of a conv: an IF neuron, or (ANN) a QCFS activation. Per-layer thresholds are set by
    :class:`SpikingUNet` once every module has its name."""
    if cfg.activation == "qcfs":
        return QCFS(cfg.qcfs_bits, cfg.qcfs_clip_init)
    return SpikingNeurons(cfg.threshold, decay=1.0, reset=cfg.reset, surrogate=cfg.surrogate,
                          alpha=cfg.surrogate_alpha, v_init=cfg.v_init)


class SpikingUNet(nn.Module):
    """``eps = model(x_t, t)`` with ``x_t: [B, img_ch, H, W]`` float and ``t: [B]`` long diffusion steps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch, tdim, steps, tsm = cfg.ch, cfg.ch * 4, cfg.num_steps, cfg.tsm
        self.time_embedding = TimeEmbedding(cfg.num_diffusion_steps, ch, tdim)
        self.conv = Conv(cfg.img_ch, ch, 3, 1, 1, steps, tsm)
        self.bn = BatchNorm(ch)
        self.neuron = _neurons(cfg)
        self.conv_identity = Conv(ch, ch, 3, 1, 1, steps, tsm)
        self.bn_identity = BatchNorm(ch)

        self.downblocks = nn.ModuleList()
        chs, now_ch = [ch], ch
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.downblocks.append(ResBlock(now_ch, ch * mult, tdim, cfg))
                now_ch = ch * mult
                chs.append(now_ch)
            if i != len(cfg.ch_mult) - 1:
                self.downblocks.append(DownSample(now_ch, cfg))
                chs.append(now_ch)
        self.middleblocks = nn.ModuleList([ResBlock(now_ch, now_ch, tdim, cfg) for _ in range(2)])
        self.upblocks = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.upblocks.append(ResBlock(chs.pop() + now_ch, ch * mult, tdim, cfg))
                now_ch = ch * mult
            if i != 0:
                self.upblocks.append(UpSample(now_ch, cfg))

        self.tail_bn = BatchNorm(now_ch)
        self.tail_conv = Conv(now_ch, cfg.img_ch, 3, 1, 1, steps, tsm)
        init.xavier_uniform_(self.tail_conv.weight, gain=1e-5)
        if cfg.head == "sdm":
            # A Conv3d with kernel (3,3,1) over [B, C, H, W, num_steps]: a 2-D conv applied at each spiking step.
            self.T_output_layer = nn.Conv3d(cfg.img_ch, cfg.img_ch, kernel_size=(3, 3, 1), padding=(1, 1, 0))
            self.last_bn = BatchNorm(cfg.img_ch)
        else:
            self.tail_neuron = _neurons(cfg)
        self._set_layer_thresholds(cfg.thresholds)
        self.set_threshold_scale(cfg.threshold_scale)
        self.qat_bits: int | None = None
        self.spiking_steps: int | None = None

    def set_spiking_steps(self, steps: int | None) -> None:
        """Run ``steps`` spiking steps per call instead of ``cfg.num_steps`` (None: back to it); with TSM the first
        ``steps`` scales (at most the trained ``num_steps``). The sampler's steps schedule
        (:func:`neurosdm.sample.generate`) sets it per diffusion step; nothing is stored in the state dict."""
        if steps is not None and self.cfg.tsm and not 1 <= steps <= self.cfg.num_steps:
            raise ConfigError(f"a TSM model runs 1..{self.cfg.num_steps} spiking steps (one scale per trained step), "
                              f"got {steps}")
        self.spiking_steps = None if steps is None else int(steps)
        for m in self.modules():
            if isinstance(m, Conv):
                m.steps = self.spiking_steps

    def qat_pairs(self) -> list[tuple[Conv, BatchNorm | None]]:
        """Every conv of the spiking path with the BatchNorm that follows it (None where none does): the stem's
        ``conv``/``bn`` and ``conv_identity``/``bn_identity``, each ResBlock's ``conv1``/``bn1``, ``conv2``/``bn2``
        and 1x1 ``shortcut`` (no BN), Down/UpSample ``conv``/``bn`` and, with the spiking head, ``tail_conv`` (no
        BN after it). The SDM head's ``tail_conv`` and ``T_output_layer`` run on the host in float: not listed."""
        pairs: list[tuple[Conv, BatchNorm | None]] = [(self.conv, self.bn), (self.conv_identity, self.bn_identity)]
        for m in self.modules():
            if isinstance(m, ResBlock):
                pairs += [(m.conv1, m.bn1), (m.conv2, m.bn2)]
                if isinstance(m.shortcut, Conv):
                    pairs.append((m.shortcut, None))
            elif isinstance(m, (DownSample, UpSample)):
                pairs.append((m.conv, m.bn))
        if self.cfg.head == "spiking":
            pairs.append((self.tail_conv, None))
        return pairs

    def set_qat(self, bits: int | None) -> None:
        """Quantisation-aware training with ``bits``-bit weight mantissas (per-layer power-of-two exponent), or
        float (``None``): every conv of :meth:`qat_pairs` uses :meth:`Conv.effective_weight`. Nothing is added
        to the state dict. The BN statistics must stay fixed while QAT trains (the trainer keeps BN in eval mode):
        the folded weight ``W * s`` is what is quantised."""
        if bits is not None and not 2 <= int(bits) <= 24:
            raise ConfigError(f"QAT weight bits must be in 2..24, got {bits}")
        self.qat_bits = None if bits is None else int(bits)
        for conv, bn in self.qat_pairs():
            conv.qat = None if bits is None else (int(bits), bn)

    def _set_layer_thresholds(self, thresholds: dict) -> None:
        if thresholds and self.cfg.activation != "if":
            raise ConfigError("per-layer thresholds are for IF neurons; this model has QCFS activations")
        names = {name for name, m in self.named_modules() if isinstance(m, SpikingNeurons)}
        unknown = sorted(set(thresholds) - names)
        if unknown:
            raise ConfigError(f"thresholds given for {unknown[:3]}, which are not IF layers of this model")
        for name, value in thresholds.items():
            self.get_submodule(name).threshold = float(value)

    def set_threshold_scale(self, scale: float) -> None:
        """Threshold guidance (SDM): every IF neuron fires at ``threshold * scale``; no retraining."""
        self.cfg.threshold_scale = float(scale)
        for m in self.modules():
            if isinstance(m, SpikingNeurons):
                m.threshold_scale = float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        temb = self.time_embedding(t)
        # direct encoding: the stem conv sees the same image at every spiking step, so it runs once (the TSM
        # scales then make the per-step copies); activations are channels-last from here on
        h = self.conv(x.contiguous(memory_format=torch.channels_last).unsqueeze(0), tsm=False, bias=False)
        h = tsm_batchnorm(channels_last(h.expand(self.spiking_steps or cfg.num_steps, *h.shape[1:])),
                          self.conv.scale(), self.bn, bias=self.conv.bias)
        h = conv_bn(self.conv_identity, self.bn_identity, self.neuron(h))
        hs = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            hs.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = cat_channels(h, hs.pop())
            h = layer(h, temb)

        if cfg.head == "sdm":
            if cfg.readout == "mean":  # the head sees the rate
                h = h.mean(0, keepdim=True)
            h = self.tail_conv(F.silu(self.tail_bn(h)))
            w = self.T_output_layer.weight[..., 0]
            h = F.silu(self.last_bn(per_step(lambda z: F.conv2d(z, w, self.T_output_layer.bias, padding=1), h))) + h
        else:
            h = self.tail_conv(self.tail_neuron(self.tail_bn(h)))
            if cfg.readout == "mean":
                return h.mean(0)
        return leaky_readout(h, cfg.readout_decay)


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (the public code's count, which includes the sinusoidal table)."""
    return sum(p.numel() for p in model.parameters())
