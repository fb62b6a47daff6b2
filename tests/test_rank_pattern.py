"""Per-layer ranks in PEFT's rank_pattern: the keys loralab writes give every layer its own value under
PEFT's matching rule (peft.utils.other.get_pattern_key), even where one module name ends another."""

import pytest
from peft.utils.other import get_pattern_key

from loralab.rank_pattern import pattern_value, write_pattern

CASES = [
    ({"a": 2, "b": 2}, 2),  # nothing differs: empty pattern
    ({"layer": 2, "block.layer": 4, "x.block.layer": 4}, 4),  # "layer" alone would catch the others
    ({"layer": 4, "block.layer": 2, "x.block.layer": 8}, 4),
    ({"q": 1.5, "attn.q": 2.0}, 2.0),
]


@pytest.mark.parametrize("values, default", CASES)
def test_written_pattern_resolves_each_layer_as_peft_does(values, default):
    pattern = write_pattern(values, default)
    for path, value in values.items():
        assert pattern_value(pattern, path, default) == value
        key = get_pattern_key(pattern.keys(), path)  # PEFT's own lookup
        assert pattern.get(key, default) == value
    assert (pattern == {}) == all(v == default for v in values.values())
