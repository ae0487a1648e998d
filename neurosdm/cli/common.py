"""What every command group shares: the consoles, the progress bar, the one-line error of a user error, the
per-layer count table and energy formatting, and option help used by several commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from neurosdm.errors import NeuroSDMError
from neurosdm.io import atomic_path

console = Console()
DEFAULT_CKPT = Path(__file__).parent.parent / "assets" / "tiny_fashion.pt"  # the demo's shipped model

SAMPLER_HELP = "ddpm | ddim | dpm-solver (--order) | analytic-ddpm | analytic-ddim (--gamma)"
GAMMA_HELP = "analytic samplers: the Gamma table written by `neurosdm gamma` (for the same --steps)"
FORCE_HELP = "overwrite existing output files"
DISC_HELP = {
    "dt": "foreign graphs: step length (default: the graph's metadata 'dt', else 1)",
    "method": "foreign graphs: euler | exp (default: metadata 'discretisation', else euler)",
    "reset": "foreign graphs: zero | subtract (default: metadata 'reset', else zero)",
    "comparison": "foreign graphs: '>=' | '>' (default: metadata 'comparison', else '>=')",
}


def say(message: str, to: Console | None = None) -> None:
    """Print one line of plain text (no markup highlighting, no hard wrapping) on ``to`` (default: stdout)."""
    (to or console).print(message, highlight=False, soft_wrap=True)


def fail(error: NeuroSDMError) -> NoReturn:
    """A user error: ``error: <message>`` in one line on stderr (a message quoting a multi-line value is joined),
    exit status 1."""
    message = " ".join(line.strip() for line in str(error).splitlines())
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(1)


def progress_bar(description: str):
    """A wrapper ``wrap(iterable, completed=0) -> iterable`` that shows a rich progress bar on stderr when stderr is
    a terminal (in a log or a pipe a bar is noise, and a bar stopped by an error left a blank line before the
    one-line error)."""

    def wrap(iterable, completed: int = 0):
        items = list(iterable)
        console = Console(stderr=True)
        if not console.is_terminal:
            yield from items
            return
        columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=len(items) + completed, completed=completed)
            for item in items:
                yield item
                bar.advance(task)

    return wrap


def layer_table(stats, title: str) -> Table:
    """The per-layer counts of a RunStats (spikes, rate, synops, graded ops, MACs, neuron updates, saturations)."""
    table = Table(title=title)
    cols = ("layer", "kind", "spikes", "rate", "synops", "graded", "MACs", "neuron upd.", "sat.")
    for col in cols:
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in stats.layer_rows():
        if r["kind"] in ("input", "output"):
            continue
        fmt = (lambda k: f"{r[k]:,}" if k in r else "")
        table.add_row(r["layer"], r["kind"], fmt("spikes_out"), f"{r['rate']:.3f}" if "rate" in r else "",
                      fmt("synops"), fmt("graded_ops"), fmt("macs"), fmt("neuron_updates"), fmt("saturations"))
    return table


def write_rendered(path: Path, table: Table, lines: tuple[str, ...] = (), width: int = 140) -> None:
    """Write ``table`` (and plain ``lines`` after it) as the text a console of ``width`` columns shows."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            c = Console(file=f, width=width)
            c.print(table)
            for line in lines:
                c.print(line, highlight=False, soft_wrap=True)


def fmt_energy(pj: float) -> str:
    """An energy in picojoules with the largest unit that keeps it >= 1 (J, mJ, uJ, nJ, pJ), 3 digits."""
    for unit, f in (("J", 1e12), ("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= f:
            return f"{pj / f:.3g} {unit}"
    return f"{pj:.3g} pJ"
