"""The neurosdm NIR dialect and graph layer (numpy + nir, no torch): metadata as typed objects, structure,
geometry, and the one translation of NIR nodes into an executable program."""
