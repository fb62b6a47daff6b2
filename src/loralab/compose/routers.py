"""Routers over trained adapters: add a MeteoRA-style gate (methods/meteora.py) or an Arrow router
(methods/arrow.py) to a model."""

from __future__ import annotations

from torch import nn

from loralab.model import adapted_layers, add_adapter, get_spec
from loralab.spec import AdapterSpec


def _shared_layers(model: nn.Module, adapters: list[str]) -> list[str]:
    """The layers every one of `adapters` adapts (unknown names fail with close matches)."""
    for e in adapters:
        get_spec(model, e)
    common = set.intersection(*[{p for p, _ in adapted_layers(model, e)} for e in adapters])
    if not common:
        raise ValueError(f"the adapters {adapters} share no adapted layer to route in")
    return sorted(common)


def add_router(model: nn.Module, experts: list[str], name: str = "router", top_k: int = 1) -> nn.Module:
    """Add a trained per-token gate over the (frozen) adapters `experts`, in every layer they all adapt."""
    spec = AdapterSpec(method="meteora", r=1, targets=_shared_layers(model, experts),
                       options={"experts": list(experts), "top_k": top_k})
    return add_adapter(model, spec, name=name)


def add_arrow(model: nn.Module, experts: list[str], name: str = "arrow", top_k: int = 3, temperature: float = 1.0,
              general: list[str] | None = None) -> nn.Module:
    """Add an Arrow router over the LoRA adapters `experts` (nothing trains), in every layer they all adapt
    (and the `general` adapters of GenKnowSub too); it becomes the active adapter."""
    general = list(general or [])
    spec = AdapterSpec(method="arrow", r=1, targets=_shared_layers(model, [*experts, *general]),
                       options={"experts": list(experts), "top_k": min(top_k, len(experts)),
                                "temperature": temperature, "general": general})
    return add_adapter(model, spec, name=name)
