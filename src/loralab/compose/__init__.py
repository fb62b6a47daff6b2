"""Combining adapters: merging several LoRA adapters into one (merging.py)."""

from loralab.compose.merging import MERGE_METHODS, combine, combine_folders

__all__ = ["MERGE_METHODS", "combine", "combine_folders"]
