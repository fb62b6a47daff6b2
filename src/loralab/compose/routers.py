"""Routers over trained adapters: add a MeteoRA-style gate (methods/meteora.py) to a model."""

from __future__ import annotations

from torch import nn

from loralab.model import adapted_layers, add_adapter, get_spec
from loralab.spec import AdapterSpec


def add_router(model: nn.Module, experts: list[str], name: str = "router", top_k: int = 1) -> nn.Module:
    """Add a trained per-token gate over the (frozen) adapters `experts`, in every layer they all adapt."""
    for e in experts:
        get_spec(model, e)  # unknown names fail with close matches
    common = set.intersection(*[{p for p, _ in adapted_layers(model, e)} for e in experts])
    if not common:
        raise ValueError(f"the adapters {experts} share no adapted layer to route in")
    spec = AdapterSpec(method="meteora", r=1, targets=sorted(common), options={"experts": list(experts),
                                                                                 "top_k": top_k})
    return add_adapter(model, spec, name=name)
