"""Embedded default models and built-in data sets, all offline."""

from loralab.zoo.datasets import Task, list_tasks, load_rows, load_task, require_fields
from loralab.zoo.models import list_models, load_base

__all__ = ["Task", "list_models", "list_tasks", "load_base", "load_rows", "load_task", "require_fields"]
