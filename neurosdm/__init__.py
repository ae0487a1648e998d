"""neurosdm: spiking diffusion models from the GPU to neuromorphic hardware."""

__version__ = "0.1.0"
