"""Combining adapters: merging several LoRA adapters into one (merging.py) and routing among
trained adapters per token (routers.py; LoRAMoE is a method of its own, methods/loramoe.py)."""

from loralab.compose.merging import MERGE_METHODS, combine, combine_folders
from loralab.compose.routers import add_router

__all__ = ["MERGE_METHODS", "add_router", "combine", "combine_folders"]
