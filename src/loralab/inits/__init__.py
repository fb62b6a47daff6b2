"""Initialisers, one file each, registered by name in `INITS`."""

from loralab.inits.base import INITS, InitContext, Initialiser, initialiser


def list_inits() -> list[str]:
    """Names of every registered initialiser."""
    return INITS.names()


__all__ = ["INITS", "InitContext", "Initialiser", "initialiser", "list_inits"]
