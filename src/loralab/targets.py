"""Which modules an AdapterSpec adapts: PEFT's suffix rule, a regex, or "all-linear"."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from loralab.layer_kinds import SUPPORTED_TYPES, is_linear_like, kind_of
from loralab.registry import close_matches

ALL_LINEAR = "all-linear"


def suffix_match(name: str, key: str) -> bool:
    """PEFT's rule: the full module name, or its tail after a dot."""
    return name == key or name.endswith("." + key)


def matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(suffix_match(name, key) for key in pattern)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, base layer) for every module, looking through loralab's own wrappers."""
    from loralab.layers import AdaptedLayer, SavedModule

    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdaptedLayer):
                yield name, child.base_layer
            elif isinstance(child, SavedModule):
                yield name, child.original
            else:
                yield name, child
                stack.append((name, child))


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head.base_layer if hasattr(head, "base_layer") else head


def resolve_targets(
    model: nn.Module,
    targets: str | list[str],
    exclude: str | list[str] | None = None,
    skip: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The names of the modules to adapt, in model order; clear errors when nothing fits."""
    modules = list(candidate_modules(model))
    excluded = [n for n, _ in modules if exclude and matches(n, exclude)]
    excluded += [n for n, _ in modules if any(suffix_match(n, s) for s in skip)]
    if targets == ALL_LINEAR:
        head = output_head(model)
        chosen = [n for n, m in modules if is_linear_like(m) and m is not head]
    else:
        chosen = [n for n, _ in modules if matches(n, targets)]
        _check_each_target_used(modules, targets, chosen)
    chosen = [n for n in chosen if n not in excluded]
    by_name = dict(modules)
    wrong = [f"{n} ({type(by_name[n]).__name__})" for n in chosen if kind_of(by_name[n]) is None]
    if wrong:
        raise ValueError(
            f"targets match module(s) loralab cannot adapt: {', '.join(wrong[:5])}"
            f"{' …' if len(wrong) > 5 else ''}; supported types: {SUPPORTED_TYPES}"
        )
    if not chosen:
        raise ValueError(f"targets {targets!r} matched no adaptable module in {type(model).__name__}")
    return chosen


def _check_each_target_used(modules: list[tuple[str, nn.Module]], targets: str | list[str],
                            chosen: list[str]) -> None:
    keys = [targets] if isinstance(targets, str) else targets
    names = [n for n, m in modules if kind_of(m) is not None]
    vocabulary = sorted({n.rsplit(".", 1)[-1] for n in names} | set(names))
    for key in keys:
        used = any(matches(n, key if isinstance(targets, str) else [key]) for n in chosen)
        if not used:
            hint = close_matches(key, vocabulary, n=5)
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ValueError(
                f"target {key!r} matches no module of the model"
                + (f"; close matches: {', '.join(hint)}" if hint else "")
                + f". Adaptable module names end in: {', '.join(leaves[:30])}"
            )
