from neurosdm.models.spiking_unet import SpikingUNet, count_parameters  # noqa: F401
