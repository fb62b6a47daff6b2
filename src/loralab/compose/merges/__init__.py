"""Merge methods for `loralab.compose.combine`, one file each, registered in `MERGES`
(base.py says how to add one): linear / cat (exact task arithmetic), svd, ties, dare,
dare-ties, magnitude-prune, lora-lego."""

from loralab.compose.merges.base import MERGES, Factors, MergeMethod, MergeOptions, merge_method

__all__ = ["MERGES", "Factors", "MergeMethod", "MergeOptions", "merge_method"]
