"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al., arXiv 2108.06098; LyCORIS's LoHa).

    ΔW = s · (B₁A₁) ⊙ (B₂A₂),
whose rank can reach r² with 2r(in + out) parameters. B₁ starts at zero, so ΔW = 0 at the start.
Options, as in LyCORIS and PEFT, for training only: `rank_dropout` (drop rows of ΔW, rescaling the
kept ones by 1 / their share) and `module_dropout` (skip the whole adapter in a step).

Saved in PEFT's LoHa format: `hada_w1_a` = B₁ [out, r], `hada_w1_b` = A₁ [r, in·k…], `hada_w2_a` = B₂,
`hada_w2_b` = A₂, config `r`, `alpha` (s = alpha / r; rsLoRA's scale is written as that alpha),
`rank_dropout`, `module_dropout`. PEFT's files with `use_effective_conv2d` (a kernel-sized core
`hada_t1`/`hada_t2` and factors [r, out], [r, in]) load exactly: the core folds into A. PEFT's per-layer
`rank_pattern`/`alpha_pattern` are refused (one r and alpha for all layers here), and the input
dropout (spec.dropout), which PEFT's LoHa lacks, is not saved. PEFT's LoHa takes nn.Linear,
nn.Conv1d and nn.Conv2d; a LoHa on GPT-2's Conv1D, nn.Conv3d or nn.Embedding is read by loralab alone.
Files of loralab's older layout (`hada_A1`, …, peft_type LORALAB) still load.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, check_shape
from loralab.rank_pattern import lycoris_patterns, read_patterns
from loralab.spec import AdapterSpec

PEFT_KEYS = {"hada_w1_a": "hada_B1", "hada_w1_b": "hada_A1", "hada_w2_a": "hada_B2", "hada_w2_b": "hada_A2"}
CORES = {"hada_t1": ("hada_w1_a", "hada_w1_b"), "hada_t2": ("hada_w2_a", "hada_w2_b")}  # use_effective_conv2d


def fold_core(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's use_effective_conv2d factors — core [r, r, k…], w_a [r, out], w_b [r, in], whose product is
    Σᵢⱼ w_a[i, p] core[i, j, k…] w_b[j, q] — as B [out, r] and A [r, in·k…] with the same B A."""
    return w_a.T, torch.einsum("ijk,jq->iqk", core.flatten(2), w_b).flatten(1)


@METHODS.register("loha")
class LoHa(AdapterMethod):
    name = "loha"
    summary = "Hadamard product of two low-rank products: ΔW = s(B₁A₁)⊙(B₂A₂), rank up to r²"
    paper = "2108.06098"
    param_formula = "2·r·(in + out)"
    peft_type = "LOHA"
    peft_lacks = ("bias", "fan_in_fan_out")
    option_defaults = {"rank_dropout": 0.0, "module_dropout": 0.0}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        for option in self.option_defaults:
            p = self.options[option]
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
                raise ValueError(f"loha option {option} must be a probability in [0, 1), got {p!r}")
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        i, o, r = layer.in_features, layer.out_features, spec.r
        self.hada_A1 = nn.Parameter(torch.randn(r, i, **kw) / i**0.5)
        self.hada_B1 = nn.Parameter(torch.zeros(o, r, **kw))
        self.hada_A2 = nn.Parameter(torch.randn(r, i, **kw) / i**0.5)
        self.hada_B2 = nn.Parameter(torch.randn(o, r, **kw) / r**0.5)

    def expected_trainable_params(self) -> int:
        return 2 * self.r * (self.layer.in_features + self.layer.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.hada_B1 @ self.hada_A1) * (self.hada_B2 @ self.hada_A2)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        p_module, p_rank = self.options["module_dropout"], self.options["rank_dropout"]
        if not self.training or not (p_module or p_rank):
            return super().delta(x)
        if p_module and not torch.rand(1).item() > p_module:  # PEFT's draws
            return self.layer.weight.new_zeros(())
        w = self.delta_weight()
        if p_rank:
            keep = (torch.rand(w.shape[0], device=w.device) > p_rank).to(w.dtype)
            w = w * (keep / keep.mean())[:, None]
        return self.layer.apply(self.drop(x), w.to(self.layer.weight.dtype))

    # ---- PEFT's LoHa format ----------------------------------------------------------------
    def to_saved(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, ours).detach() for key, ours in PEFT_KEYS.items()}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        keys = PEFT_KEYS if "hada_w1_a" in tensors else {ours: ours for ours in PEFT_KEYS.values()}  # or the older
        cores = {core for core in CORES if core in tensors}
        missing = sorted(set(keys) - set(tensors))
        if missing:
            raise ValueError(f"adapter file lacks {', '.join(f'{where}.{k}' for k in missing)}")
        got = {key: tensors[key] for key in keys}
        for core in cores:
            a, b = CORES[core]
            got[a], got[b] = fold_core(tensors[core], got[a], got[b])
        with torch.no_grad():
            for key, ours in keys.items():
                target = getattr(self, ours)
                check_shape(f"{where}.{key}", got[key].shape, target.shape)
                target.copy_(got[key])

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        alpha = spec.alpha * math.sqrt(spec.r) if spec.rslora else spec.alpha  # PEFT's scale is alpha / r
        return {"peft_type": "LOHA", "r": spec.r, "alpha": alpha,
                "rank_dropout": options["rank_dropout"], "module_dropout": options["module_dropout"],
                "use_effective_conv2d": False, "init_weights": True, **lycoris_patterns(spec, adapted, alpha)}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        options = {option: float(config.get(option) or 0.0) for option in cls.option_defaults}
        return {"method": "loha", "r": int(config["r"]), "alpha": float(config.get("alpha", 8)), "options": options,
                **read_patterns(config)}
