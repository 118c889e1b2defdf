"""Adapters from the routing data users bring, as it is published, to the canonical table layout.

One module per published format (`sprout`, `routerbench`, `lm_eval`); each returns a `RoutingTable`,
which validates the result like any canonical table, and `common.write_canonical` writes it.
"""

from training.adapters.common import write_canonical
from training.adapters.lm_eval import load_lm_eval
from training.adapters.routerbench import load_routerbench
from training.adapters.sprout import load_sprout

__all__ = ["load_lm_eval", "load_routerbench", "load_sprout", "write_canonical"]
