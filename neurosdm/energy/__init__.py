"""Energy of a simulated run: pricing (:mod:`neurosdm.energy.pricing`: counts x a hardware profile -> a report of
energy, time and EDP, its CSV, a run on every profile) and, beside it, baselines (:mod:`neurosdm.energy.baselines`:
ANN MACs of the same architecture, the SDM paper's formula).

The profiles themselves are :mod:`neurosdm.hardware.profiles`; counts beyond the engines' counters (zero-weight
synapse events, Loihi's state updates) are :mod:`neurosdm.simulators.activity`. Their public names are re-exported
here, so ``from neurosdm import energy as E; E.estimate(stats, "loihi2")`` reaches everything.
"""

from neurosdm.energy.baselines import (PAPER_ANN_MJ, PAPER_SNN_MJ, ann_baseline, ann_per_image, firing_rates,
                                       model_macs, paper_check, paper_energy, program_macs, snn_to_ann_ratio,
                                       with_ann_baseline)
from neurosdm.energy.pricing import PLACEMENT_LAYER_KEYS, estimate, price_all, report_csv
from neurosdm.hardware.profiles import (CANONICAL, CONST_KEYS, EVIDENCE, PROFILE_DIR, SECTIONS, TERMS, TOP_KEYS,
                                        Constant, Profile, list_profiles, load_profile)
from neurosdm.simulators.activity import add_state_updates, add_synapse_events, state_updates, synapse_events

__all__ = ["PROFILE_DIR", "TERMS", "SECTIONS", "CANONICAL", "EVIDENCE", "TOP_KEYS", "CONST_KEYS", "Constant",
           "Profile", "list_profiles", "load_profile", "PLACEMENT_LAYER_KEYS", "estimate", "price_all",
           "report_csv", "synapse_events", "add_synapse_events", "state_updates", "add_state_updates",
           "program_macs", "model_macs", "ann_baseline", "ann_per_image", "snn_to_ann_ratio", "with_ann_baseline",
           "firing_rates", "paper_energy", "paper_check", "PAPER_ANN_MJ", "PAPER_SNN_MJ"]
