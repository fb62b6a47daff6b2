"""Initialisers, one file each, registered by name in `INITS`."""

from loralab.inits.base import INITS, InitContext


def list_inits() -> list[str]:
    """Names of every registered initialiser."""
    return INITS.names()


__all__ = ["INITS", "InitContext", "list_inits"]
