"""A progress bar for per-layer work that can take long on a big model (an SVD or QR of every adapted
weight, building methods on frozen bases): it appears only once the work has run for `SHOW_AFTER_S`
seconds, so small models and fast methods print nothing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
SHOW_AFTER_S = 2.0


def over_layers(items: Sequence[T], desc: str) -> Iterator[T]:
    """Iterate `items` (one per layer) with a bar labelled `desc`, shown past SHOW_AFTER_S seconds."""
    yield from tqdm(items, desc=desc, total=len(items), leave=False, delay=SHOW_AFTER_S, unit="layer")
