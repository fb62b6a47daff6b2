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


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` in `model` (in place of what is there)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(suffix_match(name, key) for key in pattern)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, base layer) for every module, looking through loralab's own wrappers."""
    from loralab.layers import Wrapper

    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, Wrapper):
                yield name, child.unwrapped
            else:
                yield name, child
                stack.append((name, child))


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head.base_layer if hasattr(head, "base_layer") else head


def block_index(name: str, pattern: str | list[str] | None = None) -> int | None:
    """The block a module sits in, as PEFT reads it for layers_to_transform: the number after
    `pattern` ("layers.3."), or else the first number between dots (PEFT's rule wants a name before
    the container, as in "model.layers.3."; a top-level "blocks.3." counts here too); None if none."""
    if not pattern:
        found = re.match(r"(?:^|.*?\.)[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            found = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if found is not None:
                break
    return int(found["idx"]) if found else None


def _in_layers(chosen: list[str], targets: str | list[str], layers: int | list[int],
               pattern: str | list[str] | None) -> list[str]:
    wanted = {layers} if isinstance(layers, int) else set(layers)
    named = set(targets) if isinstance(targets, list) else set()
    blocks = {n: block_index(n, pattern) for n in chosen}
    missing = sorted(wanted - set(blocks.values()))
    if missing:
        found = sorted({b for b in blocks.values() if b is not None})
        raise ValueError(f"layers {missing} hold no targeted module (blocks found"
                         f"{f' under {pattern!r}' if pattern else ''}: {found or 'none'})")
    return [n for n in chosen if n in named or blocks[n] in wanted]


def resolve_targets(
    model: nn.Module,
    targets: str | list[str],
    exclude: str | list[str] | None = None,
    skip: list[str] | tuple[str, ...] = (),
    layers: int | list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
) -> list[str]:
    """The names of the modules to adapt, in model order (in `layers` only, if given: see AdapterSpec);
    clear errors when nothing fits."""
    modules = list(candidate_modules(model))
    excluded = [n for n, _ in modules if exclude and matches(n, exclude)]
    excluded += [n for n, _ in modules if any(suffix_match(n, s) for s in skip)]
    if targets == ALL_LINEAR:
        head = output_head(model)
        chosen = [n for n, m in modules if is_linear_like(m) and m is not head]
    else:
        chosen = [n for n, _ in modules if matches(n, targets)]
        _check_each_target_used(modules, targets, chosen)
    if layers is not None:
        chosen = _in_layers(chosen, targets, layers, layers_pattern)
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
