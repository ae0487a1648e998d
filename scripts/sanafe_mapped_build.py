"""neurosdm's side of the mapping cross-check with SANA-FE (docs/mapping.md), main .venv:

    .venv/bin/python scripts/sanafe_mapped_build.py build OUT_DIR [NEURONS_PER_CORE]   # default 32
    .venv-sanafe/bin/python scripts/sanafe_mapped.py OUT_DIR
    .venv/bin/python scripts/sanafe_mapped_build.py report OUT_DIR

``build``: every suite network of ``neurosdm.hardware.sanafe`` mapped by neurosdm's mapper onto ``loihi-sanafe``
with NEURONS_PER_CORE neurons per core (so that layers split over cores in several tiles and spikes travel), run on
the event engine and priced on the mapping (``neurosdm.hardware.sanafe.run_mapped``). ``report``: the Markdown
table of docs/mapping.md (spikes, packets, hops, time per step on both sides).
"""

import json
import sys
from pathlib import Path

from neurosdm.energy import estimate
from neurosdm.hardware.profiles import PROFILE_DIR
from neurosdm.hardware.sanafe import SUITE, run_mapped


def build(out: Path, neurons: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = (PROFILE_DIR / "loihi-sanafe.toml").read_text()
    old = "[resources.neurons_per_core]\nvalue = 1024\n"
    text = text.replace(old, old.replace("1024", str(neurons)))
    prof = out / "loihi-sanafe-small.toml"
    prof.write_text(text)
    for name in SUITE:
        side = run_mapped(name, out, prof, lambda stats, mapping: estimate(stats, prof, mapping=mapping))
        print(f"{name}: {side['cores_used']} cores, exact {side['exact']}, mapper {side['mapper']}")


def report(out: Path) -> None:
    print("| network | cores | spikes per layer and step identical | packets neurosdm exact / mapper / SANA-FE | "
          "hops neurosdm exact / mapper / SANA-FE | ns per step neurosdm / SANA-FE |")
    print("|---|---|---|---|---|---|")
    for name in SUITE:
        a = json.loads((out / f"{name}.mapped.json").read_text())
        b = json.loads((out / f"{name}.sanafe_mapped.json").read_text())
        lay = a["mapping"]["layers"]
        same = all(a["spikes"][n] == b["spikes"][n][lay[n]["depth"]:lay[n]["depth"] + a["num_steps"]] for n in lay)
        print(f"| {name} | {a['cores_used']} | {same} | {a['exact']['packets']} / {a['mapper']['packets']:.0f} / "
              f"{b['packets']} | {a['exact']['hops']} / {a['mapper']['hops']:.0f} / {b['hops']} | "
              f"{a['time_per_step_s'] * 1e9:.0f} / {b['time_per_step_s'] * 1e9:.0f} |")


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 32)
    else:
        report(Path(sys.argv[2]))
