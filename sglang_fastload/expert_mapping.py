"""O(1) lookup of FusedMoE expert mappings by checkpoint tensor name.

Upstream's MoE ``load_weights`` tests every (param, "experts.{e}.{proj}.", e, shard)
mapping against every checkpoint name: 3 × num_experts substring tests per tensor. This
index returns, for a name, exactly the mappings whose weight name occurs in it, in their
original order — the same ones the linear scan would reach.
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

_EXPERT_KEY = re.compile(r"experts\.(\d+)\.([^.]+)\.")
# Every occurrence in a name, overlapping ones included (a lookahead consumes nothing).
_EXPERT_KEYS_IN_NAME = re.compile(r"(?=experts\.(\d+)\.([^.]+)\.)")


class ExpertMappingIndex:
    """Index of ``(param_name, weight_name, expert_id, shard_id)`` mappings by weight name."""

    def __init__(self, mappings: Sequence[Tuple]):
        self._by_key: Dict[Tuple[str, str], List[Tuple[int, Tuple]]] = {}
        self._unindexed: List[Tuple[int, Tuple]] = []
        for position, mapping in enumerate(mappings):
            weight_name = mapping[1]
            m = _EXPERT_KEY.fullmatch(weight_name)
            if m is None:
                self._unindexed.append((position, mapping))
            else:
                self._by_key.setdefault((m.group(1), m.group(2)), []).append((position, mapping))

    def candidates(self, name: str) -> List[Tuple]:
        """Return the mappings whose weight name is a substring of ``name``, in original order."""
        keys = _EXPERT_KEY.findall(name)
        if len(keys) != name.count("experts."):
            # An occurrence that did not start a match may start one inside another match.
            keys = _EXPERT_KEYS_IN_NAME.findall(name)
        if len(keys) == 1 and not self._unindexed:
            # The common case (one expert key, every mapping indexed): the key's mappings,
            # kept in original order when indexed; their weight name is the matched text.
            return [mapping for _, mapping in self._by_key.get(keys[0], ())]
        found = dict(item for key in set(keys) for item in self._by_key.get(key, ()))
        found.update(item for item in self._unindexed if item[1][1] in name)
        return [found[position] for position in sorted(found)]
