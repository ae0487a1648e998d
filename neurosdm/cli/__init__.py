"""The ``neurosdm`` command: one module per command group, each command declares its options, hands them to one
function (of :mod:`neurosdm.jobs` when the job needs several library calls, else the library function itself)
and renders what it returns.

- ``model``: train, sample, info, gamma, convert (the GPU path)
- ``export``: export, inspect (the NIR exchange format)
- ``simulate``: simulate, compare, demo (the exported graph on the engines)
- ``energy``: energy, profiles (pricing on hardware profiles)
- ``map``: map (a graph onto a profile's chips: cores, chips, utilisation)
- ``evaluate``: evaluate, sweep (FID and IS)
- ``pareto``: pareto (energy-quality trade-offs of the knobs)
- ``common``: consoles, progress bar, the one-line user error, shared tables and help texts

Import rule: a command module imports at its top only typer, rich, the leaves (``neurosdm.errors``,
``neurosdm.io``) and ``neurosdm.cli.common``; every other neurosdm import sits inside the command function that
uses it, only so that ``neurosdm --help`` does not load torch. Those lazy imports are neurosdm library imports and
nothing else. User errors (:class:`neurosdm.errors.NeuroSDMError`) print ``error: ...`` in one line and exit 1;
usage errors are typer's (exit 2).
"""

from __future__ import annotations

import typer
from rich.console import Console

from neurosdm.cli import energy, evaluate, export, model, pareto, simulate
from neurosdm.cli import map as mapping
from neurosdm.cli.common import DEFAULT_CKPT, fail
from neurosdm.errors import NeuroSDMError
from neurosdm.heap import retain_freed_memory
from neurosdm.io import cancel_interrupts, interrupt_handlers, interrupts_end_the_command

__all__ = ["DEFAULT_CKPT", "app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Spiking diffusion models from the GPU to neuromorphic hardware.")

for command in (model.train, model.sample, model.info, simulate.demo, export.export, export.inspect,
                simulate.simulate, simulate.compare, energy.energy, energy.profiles, mapping.map, evaluate.evaluate,
                evaluate.sweep, pareto.pareto, model.gamma, model.convert):  # the order of `neurosdm --help`
    app.command()(command)


def main() -> None:
    """Entry point. Usage errors are typer's (usage line, exit 2); user errors print one line and exit 1;
    Ctrl-C and SIGTERM print ``error: interrupted`` and exit 130 (outputs are written atomically and staged, so
    nothing is left half-written). A command is one job in a process of its own, so malloc keeps freed memory for
    reuse (:mod:`neurosdm.heap`: the GPU path's large activations are not page-faulted in again at every call)."""
    retain_freed_memory()
    previous = interrupt_handlers()
    try:
        try:
            interrupts_end_the_command()  # SIGTERM as Ctrl-C: temporaries are removed, one line, exit 130
            app()
        except KeyboardInterrupt:  # before click's own handling starts (typer still building the command)
            raise SystemExit(130) from None
    except NeuroSDMError as e:
        fail(e)
    except SystemExit as e:
        if e.code == 130:  # typer's exit for a KeyboardInterrupt, silent otherwise
            Console(stderr=True).print("[bold red]error:[/] interrupted; no partial output was left", highlight=False)
        raise
    finally:
        cancel_interrupts(previous)  # a signal after the work ends the process as it would have before


if __name__ == "__main__":
    main()
