"""Planning: pure functions from a layer table (and capacities) to a plan, all assembled by one builder.

    whole.make_plan            whole layers, one card per stage (fewest cards; min-max over k; cards in order)
    groups.make_split_plan     stages on tensor groups of any width their layers allow
    baseline.make_baseline_plan  the classic TP x PP layout, built as asked
    timed.make_time_plan       the least slowest predicted stage
    peers                      a peer's constraint on stages (vLLM: a decoder layer in each), planned for
    diagnose                   why nothing fits, and what would
    algorithms/                the exact partitioners over interval costs (numpy)
"""

from cachefit.planning.baseline import make_baseline_plan, parse_baseline
from cachefit.planning.builder import Settings
from cachefit.planning.groups import make_split_plan
from cachefit.planning.peers import NOTES, PEERS, Peer, for_peer, on_original_layers
from cachefit.planning.timed import make_time_plan
from cachefit.planning.whole import check_arguments, make_plan

__all__ = ["NOTES", "PEERS", "Peer", "Settings", "check_arguments", "for_peer", "make_baseline_plan", "make_plan",
           "make_split_plan", "make_time_plan", "on_original_layers", "parse_baseline"]
