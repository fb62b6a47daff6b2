"""Trainable token rows: a few rows of an embedding (or output head) trained in place of the base's.

HF PEFT's TrainableTokens (`LoraConfig(trainable_token_indices=...)`), as used to teach a model new
chat or tool tokens without training the whole vocabulary: each adapter holds its own copy of the
rows at the given token indices, started from the base's rows, and the layer's output uses those
rows in place of the base's (they are replaced, not added to, as in PEFT). An output head whose
weight is the embedding's (tied word embeddings) uses the same rows, so training them changes both.

`TokenRows` wraps the layer and follows the wrapper protocol of loralab.layers (`held`, `unwrapped`,
`plain`, add/remove/set_active, `disabled`, `row_plan`, merge/unmerge_all). Its forward runs the base
layer and overwrites what the chosen rows produce, so the cost grows with the batch, not with the
vocabulary: no copy of the full weight per step.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loralab.layer_kinds import embed_scale
from loralab.layers import Wrapper
from loralab.registry import close_matches
from loralab.targets import candidate_modules, set_module, suffix_match

SAVED_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key, under the embedding's module path


class TokenRowSet(nn.Module):
    """One adapter's trained rows: `delta[i]` replaces row `indices[i]` of the base weight."""

    def __init__(self, weight: torch.Tensor, indices: Sequence[int], padding_idx: int | None = None) -> None:
        super().__init__()
        indices = list(indices)
        # the padding token's row gets no gradient, as F.embedding gives the base's padding row none
        self.padding_slot = indices.index(padding_idx) if padding_idx in indices else None
        idx = torch.tensor(indices, dtype=torch.long, device=weight.device)
        self.delta = nn.Parameter(weight.detach()[idx].clone())
        self.register_buffer("indices", idx, persistent=False)
        slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slots[idx] = torch.arange(len(idx), device=weight.device)
        self.register_buffer("slots", slots, persistent=False)  # token id → its row in delta, or -1

    def embed(self, layer: nn.Embedding, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` = layer(ids) with the embeddings of the chosen tokens taken from these rows."""
        slot = self.slots[ids]
        hit = slot >= 0
        rows = F.embedding(slot.clamp(min=0), self.delta, padding_idx=self.padding_slot)
        scale = embed_scale(layer)
        if scale is not None:
            rows = rows * scale
        return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)

    def project(self, layer: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` = layer(x) (a fresh output, changed in place) with the outputs (logits) of the chosen tokens
        computed from these rows: their difference from the base rows is added to those columns, so neither
        pass copies the vocabulary-wide output."""
        change = self.delta - layer.weight.detach()[self.indices].to(self.delta.dtype)
        return out.index_add_(-1, self.indices, F.linear(x, change.to(x.dtype)).to(out.dtype))

    def extra_repr(self) -> str:
        return f"tokens={len(self.indices)}"


def overlap(row_sets: Sequence[TokenRowSet]) -> list[int]:
    """Token indices that more than one of these row sets replaces."""
    seen: set[int] = set()
    twice: set[int] = set()
    for rows in row_sets:
        mine = set(rows.indices.tolist())
        twice |= seen & mine
        seen |= mine
    return sorted(twice)


class TokenRows(Wrapper):
    """An nn.Embedding or nn.Linear whose rows at some token indices are trained per adapter.

    `tied`: this layer shares its weight with another TokenRows layer (an output head tied to the input
    embedding), which owns the row sets; this one uses them and saves nothing of its own.
    """

    def __init__(self, base_layer: nn.Module, tied: bool = False) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding | nn.Linear):
            raise TypeError(f"trainable token rows need an nn.Embedding or nn.Linear, got {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Embedding) and base_layer.max_norm is not None:
            raise ValueError("trainable token rows on an embedding with max_norm are not supported "
                             "(its lookup renormalises the base rows in place)")
        self.base_layer = base_layer
        self.tied = tied
        self.rows = nn.ModuleDict()
        self._backups: dict[str, torch.Tensor] = {}
        self._live: list[TokenRowSet] = []
        self._clash: tuple[list[str], list[int]] | None = None  # live adapters whose rows overlap, and where

    # ---- the wrapper protocol ------------------------------------------------------------------
    @property
    def held(self) -> nn.ModuleDict:
        return self.rows

    def add(self, name: str, indices: Sequence[int] | TokenRowSet) -> TokenRowSet:
        """Give adapter `name` rows at `indices`, started from the base's (or the tied owner's row set)."""
        rows = indices if isinstance(indices, TokenRowSet) else TokenRowSet(
            self.base_layer.weight, indices, getattr(self.base_layer, "padding_idx", None))
        self.rows[name] = rows
        self._refresh()
        return rows

    def _refresh(self) -> None:
        live = [n for n in self.active if n not in self.merged]
        self._live = [self.rows[n] for n in live]
        both = overlap(self._live) if len(self._live) > 1 else []
        self._clash = (live, both) if both else None  # raised by the forward, not by set_active

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the layer uses it: the base's with the active adapters' rows in place (a new
        tensor where rows are live, as PEFT's wrapper gives)."""
        weight = self.base_layer.weight
        if self.disabled:
            return weight
        for rows in self._live:
            weight = weight.index_copy(0, rows.indices, rows.delta.to(weight.dtype))
        return weight

    # ---- forward ---------------------------------------------------------------------------------
    def _replace(self, rows: TokenRowSet, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Embedding):
            return rows.embed(self.base_layer, x, out)
        return rows.project(self.base_layer, x, out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_plan is not None:
            if self.merged:
                raise RuntimeError(f"adapters {self.merged} are merged: unmerge them before a mixed-adapter batch")
            for name, idx in self.row_plan.on(out.device).groups:
                if name in self.rows:
                    mine = self._replace(self.rows[name], x.index_select(0, idx), out.index_select(0, idx))
                    out = out.index_copy(0, idx, mine)
            return out
        if self._clash is not None:
            raise _overlap_error(*self._clash)
        for rows in self._live:
            out = self._replace(rows, x, out)
        return out

    # ---- merging ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Write adapter `name`'s rows into the base weight (the base rows are kept for unmerge_all); a tied
        layer only notes it, as the owner of the shared weight writes it."""
        if name in self.merged:
            return
        both = overlap([self.rows[n] for n in [*self.merged, name]])
        if both:
            raise _overlap_error([*self.merged, name], both)
        if not self.tied:
            rows, weight = self.rows[name], self.base_layer.weight
            self._backups[name] = weight[rows.indices].clone()
            weight.index_copy_(0, rows.indices, rows.delta.to(weight.dtype))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge_all(self) -> None:
        weight = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            if name in self._backups:
                weight.index_copy_(0, self.rows[name].indices, self._backups.pop(name))
        self._refresh()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tied={self.tied}"


def _overlap_error(names: Sequence[str], both: list[int]) -> ValueError:
    return ValueError(f"adapters {list(names)} train rows of the same tokens {both[:8]}"
                      f"{' …' if len(both) > 8 else ''}: which rows to use is undefined, so they cannot be "
                      "active or merged together (as in PEFT)")


def _input_embedding(model: nn.Module, modules: dict[str, nn.Module]) -> str:
    """The path of the model's input embedding (its get_input_embeddings(), else its only nn.Embedding)."""
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    found = getattr(found, "unwrapped", found)
    paths = [p for p, m in modules.items() if m is found] if found is not None else []
    if not paths:
        paths = [p for p, m in modules.items() if isinstance(m, nn.Embedding)]
    if len(paths) != 1:
        raise ValueError(f"trainable_token_indices as a list needs one input embedding, but the model has "
                         f"{len(paths)} ({', '.join(paths) or 'none'}): give {{module name: indices}} instead")
    return paths[0]


def plan_token_rows(model: nn.Module, tokens: list[int] | dict[str, list[int]], adapted: Collection[str],
                    saved: Collection[str]) -> dict[str, tuple[list[int], str | None]]:
    """Module path → (token indices, the path of the layer whose row sets it shares, or None): the layers
    that `trainable_token_indices` names, and every layer whose weight is one of theirs (a tied output
    head). Checked before anything changes: `adapted` (LoRA layers) and `saved` (modules_to_save) may not
    be among them."""
    modules = dict(candidate_modules(model))
    if isinstance(tokens, dict):
        named: dict[str, list[int]] = {}
        for key, indices in tokens.items():
            found = [p for p in modules if suffix_match(p, key)]
            if not found:
                hint = close_matches(key, {p.rsplit(".", 1)[-1] for p in modules} | set(modules))
                raise ValueError(f"trainable_token_indices key {key!r} matches no module"
                                 + (f"; close matches: {', '.join(hint)}" if hint else ""))
            named.update(dict.fromkeys(found, list(indices)))
    else:
        named = {_input_embedding(model, modules): list(tokens)}
    for path, indices in named.items():
        module = modules[path]
        if not isinstance(module, nn.Embedding | nn.Linear):
            raise ValueError(f"trainable_token_indices: {path} is a {type(module).__name__}; token rows are "
                             "trained on an nn.Embedding or an nn.Linear output head")
        size = module.weight.shape[0]
        if max(indices) >= size:
            raise ValueError(f"trainable_token_indices: {path} has {size} rows (tokens 0..{size - 1}), got token "
                             f"{max(indices)}")
    # an embedding's rows are shared by a head tied to it (and saved under the embedding), as in PEFT; a head
    # named alone changes only its own outputs
    owners = sorted(named, key=lambda p: not isinstance(modules[p], nn.Embedding))
    plan: dict[str, tuple[list[int], str | None]] = {}
    for path in owners:
        if path in plan:
            continue
        plan[path] = (named[path], None)
        if not isinstance(modules[path], nn.Embedding):
            continue
        for other, module in modules.items():
            if other == path or getattr(module, "weight", None) is not modules[path].weight:
                continue
            if other in named and named[other] != named[path]:
                raise ValueError(f"{path} and {other} share one weight (tied embeddings), so they need the "
                                 f"same trainable_token_indices; got {named[path]} and {named[other]}")
            plan[other] = (named[path], path)
    for path in plan:
        for what, paths in (("adapted by the method (its targets)", adapted), ("in modules_to_save", saved)):
            if path in paths:
                raise ValueError(f"{path} has trainable token rows and is also {what}: choose one of the two")
        current = model.get_submodule(path)
        if hasattr(current, "held") and not isinstance(current, TokenRows):
            raise ValueError(f"{path} is already wrapped by another adapter ({type(current).__name__}); trainable "
                             "token rows cannot go on the same layer")
    return plan


def attach_token_rows(model: nn.Module, name: str, plan: dict[str, tuple[list[int], str | None]]) -> None:
    """Give adapter `name` the row sets of `plan` (see plan_token_rows), wrapping each layer once."""
    owned: dict[str, TokenRowSet] = {}
    for path, (indices, owner) in sorted(plan.items(), key=lambda item: item[1][1] is not None):
        current = model.get_submodule(path)
        if not isinstance(current, TokenRows):
            current = TokenRows(current, tied=owner is not None)
            set_module(model, path, current)
        owned[path] = current.add(name, indices if owner is None else owned[owner])
