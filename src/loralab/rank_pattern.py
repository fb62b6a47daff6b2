"""Per-layer ranks and scales, in HF PEFT's terms: `rank_pattern` and `alpha_pattern` in
adapter_config.json map module names to a layer's own r and lora_alpha (its scale is then
lora_alpha / r, or / √r with rsLoRA). A spec's own patterns (AdapterSpec.rank_pattern, built layer by
layer in add_adapter) and EVA's rank redistribution (arXiv 2410.07170, inits/eva.py) give layers
ranks of their own; saving writes the patterns from the layers as built, and reading puts them into
the spec (PEFT's LoRA, LoHa and LoKr files as well).

PEFT matches a pattern key k against a module name n with `re.match(rf"(.*\\.)?({k})$", n)`, first
key first (peft.utils.other.get_pattern_key); loralab reads keys by the same rule, and writes full
module names, longest first, adding a name wherever a shorter key would otherwise catch it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from loralab.fused_lora import b_factor_layout
from loralab.methods.base import AdapterMethod
from loralab.spec import AdapterSpec, pattern_value


def write_pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """A pattern that gives every path in `values` its value under PEFT's rule (empty if all are default)."""
    keys = {p for p, v in values.items() if not _same(v, default)}
    for _ in range(2):  # the second pass names every layer that a shorter key would otherwise catch
        pattern = {p: values[p] for p in sorted(keys, key=lambda p: (-len(p), p))}
        wrong = {p for p, v in values.items() if not _same(pattern_value(pattern, p, default), v)}
        if not wrong:
            return pattern
        keys |= wrong
    raise ValueError(f"PEFT's pattern keys cannot tell module names {sorted(wrong)[:3]} apart from others")


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) or isinstance(b, float) else a == b


def layer_patterns(adapted: Iterable[tuple[str, AdapterMethod]], r: int, alpha: float, rslora: bool,
                   factor: int = 1) -> tuple[dict[str, int], dict[str, float]]:
    """(rank_pattern, alpha_pattern) for layers whose rank or scale differ from the config's r and alpha;
    a layer's saved rank is `factor`·its rank (2 where an init moved part of W into the adapter)."""
    ranks, alphas = {}, {}
    for path, method in adapted:
        k = factor * method.r
        ranks[path] = k
        alphas[path] = method.scale * (math.sqrt(k) if rslora else k)
    return write_pattern(ranks, r), write_pattern(alphas, alpha)


def lycoris_patterns(spec: AdapterSpec, adapted: dict[str, AdapterMethod], alpha: float) -> dict[str, dict]:
    """PEFT's LoHa/LoKr rank_pattern and alpha_pattern for these layers (their scale is alpha / r, no rsLoRA);
    `alpha`: the config's."""
    rank_pattern, alpha_pattern = layer_patterns(adapted.items(), spec.r, alpha, rslora=False)
    return {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def read_patterns(config: dict[str, Any]) -> dict[str, dict]:
    """A PEFT config's per-layer ranks and alphas as AdapterSpec fields."""
    return {"rank_pattern": dict(config.get("rank_pattern") or {}),
            "alpha_pattern": dict(config.get("alpha_pattern") or {})}


def check_resizable(method: AdapterMethod, path: str, why: str) -> None:
    """Per-layer ranks are for LoRA and DoRA (PEFT's LoRA layers), whose rank lives only in A and B."""
    if method.peft_type != "LORA":
        raise ValueError(f"{why} needs per-layer ranks, which method {method.name!r} at {path} does not support "
                         "(only lora and dora do)")


@torch.no_grad()
def set_factors(method: AdapterMethod, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Replace a LoRA/DoRA method's A [k, in] and B [out, k] by new parameters of rank k, with this scale."""
    like = method.lora_A
    grad = like.requires_grad
    method.lora_A = nn.Parameter(a.to(like).contiguous(), requires_grad=grad)
    method.lora_B = nn.Parameter(b_factor_layout(b.to(like)), requires_grad=grad)
    method.r = a.shape[0]
    method.scale = scale
