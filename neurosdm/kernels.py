"""Element-wise and reduction kernels of the GPU path, written as plain torch functions and run through
``torch.compile`` (inductor fuses each into one pass over memory; on CPU about an order of magnitude faster than
the same ops run eagerly, which each read and write the whole tensor).

``run(fn, *args)`` compiles ``fn`` once (dynamic shapes) and runs it; a failing compile (no C++ compiler, an
unsupported platform) falls back to running ``fn`` eagerly for good, with a warning: eager is exact, only slower.
``NEUROSDM_COMPILE=0`` runs every kernel eagerly (the parity tests compare both)."""

from __future__ import annotations

import os
import warnings

import torch

_COMPILED: dict[object, object] = {}


def unaliased(a):
    """``a`` itself, or for a view the same memory as a tensor without a view base: the compiled kernels guard on
    the strides of an input's base, and the many bases the model's layouts give would recompile them until
    torch.compile gives up (its cache limit) and runs them eagerly."""
    if not isinstance(a, torch.Tensor) or a._base is None:
        return a
    return torch.empty(0, dtype=a.dtype, device=a.device).set_(a.untyped_storage(), a.storage_offset(), a.size(),
                                                               a.stride())


def compiling() -> bool:
    return os.environ.get("NEUROSDM_COMPILE", "1") != "0"


def run(fn, *args):
    """``fn(*args)``, compiled when possible (see the module docstring)."""
    if compiling() and _COMPILED.get(fn, True) is not None:
        try:
            if fn not in _COMPILED:
                _COMPILED[fn] = torch.compile(fn, dynamic=True)
            return _COMPILED[fn](*(unaliased(a) for a in args))
        except Exception as e:  # no working compiler here: eager is exact, only slower
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}); running it eagerly")
            _COMPILED[fn] = None
    return fn(*args)
