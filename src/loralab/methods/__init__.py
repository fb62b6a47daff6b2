"""Adapter methods (ΔW forms), one file each, registered by name in `METHODS`."""

from loralab.methods.base import METHODS, AdapterMethod


def list_methods() -> list[str]:
    """Names of every registered method."""
    return METHODS.names()


def get_method(name: str) -> type[AdapterMethod]:
    return METHODS.get(name)


__all__ = ["METHODS", "AdapterMethod", "get_method", "list_methods"]
