"""Combining adapters: merging several LoRA adapters into one (merging.py, with one file per
merge method in merges/) and routing among trained adapters per token (routers.py; LoRAMoE is
a method of its own, methods/loramoe.py)."""

from loralab.compose.merging import combine, combine_folders, list_merge_methods
from loralab.compose.routers import add_arrow, add_router

__all__ = ["add_arrow", "add_router", "combine", "combine_folders", "list_merge_methods"]
