"""RandLoRA: full-rank parameter-efficient fine-tuning (Albert et al., arXiv 2502.00987).

A sum of n frozen random rank-r bases with one shared frozen A and two trained diagonal scalings:
    ΔW = s · Σ_{i<n} B_i diag(λ_i) A diag(γ_i)  (in ≤ out; for in > out, ΔWᵀ has this form),
B_i ∈ R^{max×r}, A ∈ R^{r×min} with min, max = min(in, out), max(in, out): γ scales the smaller side, so
only n·(r + min) values train, and n = ⌈min/r⌉ makes the sum full rank. As in the paper's (and PEFT's)
code the random matrices are one pair shared by every layer (a layer slices its block of the pair drawn
at the adapter's largest shape), drawn Kaiming-uniform in bfloat16 and divided by their std, and the
bases pair up as PEFT flattens them: column b·r + k of the flat B with row k·n + b of the flat
λ ⊙ A ⊙ γ. λ starts at zero (the output is unchanged), γ at 1 / max(n, min); s = alpha / r.

Options: `seed` (PEFT's projection_prng_key), `sparse` / `very_sparse` (ternary bases: P(−1) = P(+1) = 1/6,
or 1/(2√min) at the largest shape; very_sparse wins), `save_projection` (False: the bases are left out of
the file and redrawn from the seed), `num_bases` (n on every layer instead of ⌈min/r⌉, loralab's own).

Saved in PEFT's RandLoRA format: per layer `randlora_lambda` [r, n] and `randlora_gamma` [n, min], the
shared `base_model.randlora_A` [r, 1, min] and `base_model.randlora_B` [max, n, r], and, as PEFT writes
them, copies of those two under every layer (PEFT warns of missing keys without them); alpha is saved
as `randlora_alpha` = s·r. PEFT's RandLoRA takes nn.Linear and GPT-2's Conv1D, and n = ⌈min/r⌉ only:
a RandLoRA on nn.Conv2d or nn.Embedding, or with `num_bases` (an extra config field), is read by loralab
alone. PEFT draws the dense bases in float16 instead on GPUs without bfloat16; a save_projection=False
file made there is redrawn differently here (as PEFT itself warns across machines). Files of loralab's
earlier RandLoRA (n independent A_i per layer, "peft_type": "LORALAB") have no equivalent and are refused.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, FactoredMethod
from loralab.spec import AdapterSpec


def kaiming_bases(r: int, n: int, small: int, large: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, 1, small] and B [large, n, r] as PEFT draws them: Kaiming-uniform in bfloat16, B one base at a time."""
    def draw(shape: tuple[int, int, int]) -> torch.Tensor:
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)

    a = draw((r, 1, small))
    b = torch.cat([draw((large, 1, r)) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


def sparse_bases(r: int, n: int, small: int, large: int, g: torch.Generator,
                 sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary A, B as PEFT draws them: −1 below 1/(2·sparsity), +1 above 1 − 1/(2·sparsity), else 0."""
    def ternary(u: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        return t / t.std()

    a = torch.rand((r, 1, small), generator=g)
    return ternary(a), ternary(torch.rand((large, n, r), generator=g))


@METHODS.register("randlora")
class RandLoRA(FactoredMethod):
    name = "randlora"
    summary = "Full-rank update from n frozen random rank-r bases with trained diagonal scalings"
    paper = "2502.00987"
    suggested_lr = 0.003
    param_formula = "n·(r + min(in, out)), n = ⌈min(in, out)/r⌉"
    peft_type = "RANDLORA"
    peft_lacks = ("exclude_modules",)
    shared_prefix = "base_model."
    option_defaults = {"num_bases": None, "seed": 0, "sparse": False, "very_sparse": False, "save_projection": True}

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        options = {**cls.option_defaults, **spec.options}
        out = max(layer.out_features for layer in layers)
        inp = max(layer.in_features for layer in layers)
        small, large = min(out, inp), max(out, inp)
        n = options["num_bases"] or math.ceil(small / spec.r)
        g = torch.Generator().manual_seed(options["seed"])
        if options["very_sparse"]:
            a, b = sparse_bases(spec.r, n, small, large, g, math.sqrt(small))
        elif options["sparse"]:
            a, b = sparse_bases(spec.r, n, small, large, g, 3)
        else:
            a, b = kaiming_bases(spec.r, n, small, large, g)
        like, saved = layers[0].weight, bool(options["save_projection"])
        shared = nn.Module()
        shared.register_buffer("randlora_A", a.to(like), persistent=saved)
        shared.register_buffer("randlora_B", b.to(like), persistent=saved)
        return shared

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        self.small = min(layer.in_features, layer.out_features)
        self.n = self.options["num_bases"] or math.ceil(self.small / spec.r)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.randlora_lambda = nn.Parameter(torch.zeros(spec.r, self.n, **kw))
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.small), 1 / max(self.n, self.small), **kw))

    def expected_trainable_params(self) -> int:
        return self.n * (self.r + self.small)

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return sys.maxsize

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        large = max(self.layer.in_features, self.layer.out_features)
        a = self.shared.randlora_A[:, 0, : self.small]
        b = self.shared.randlora_B[:large, : self.n].flatten(1)  # [max, n·r], column b·r + k
        scaled = (self.randlora_lambda[:, :, None] * a[:, None] * self.randlora_gamma).flatten(0, 1)  # row k·n + b
        return (scaled, b) if self.small == self.layer.in_features else (b.T, scaled.T)

    # ---- PEFT's RandLoRA format ------------------------------------------------------------
    def to_saved(self) -> dict[str, torch.Tensor]:
        return {**super().to_saved(), **self.shared.state_dict()}  # PEFT repeats the shared bases under each layer

    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if config.get("peft_type") == "LORALAB" and any(k.endswith(".bases_A") for k in tensors):
            raise ValueError("this adapter holds RandLoRA in loralab's earlier layout (bases_A, bases_B: n independent "
                             "random A_i per layer), which today's RandLoRA (one shared A, as the paper and PEFT) "
                             "cannot express; retrain it, or load it with the loralab release that wrote it")
        return tensors

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        config = {"peft_type": "RANDLORA", "r": spec.r, "randlora_alpha": spec.scale * spec.r,
                  "randlora_dropout": spec.dropout, "projection_prng_key": options["seed"],
                  "save_projection": bool(options["save_projection"]), "sparse": bool(options["sparse"]),
                  "very_sparse": bool(options["very_sparse"]), "init_weights": True,
                  "bias": "randlora_only" if spec.bias == "lora_only" else spec.bias}
        if options["num_bases"]:
            config["num_bases"] = options["num_bases"]  # loralab's own field: PEFT ignores it and refuses the shapes
        return config

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        options = {"seed": int(config.get("projection_prng_key", 0)), "num_bases": config.get("num_bases"),
                   "save_projection": bool(config.get("save_projection", True)),
                   "sparse": bool(config.get("sparse")), "very_sparse": bool(config.get("very_sparse"))}
        bias = config.get("bias") or "none"
        return {"method": "randlora", "r": int(config["r"]), "alpha": float(config.get("randlora_alpha", 640)),
                "dropout": float(config.get("randlora_dropout") or 0), "options": options,
                "bias": "lora_only" if bias == "randlora_only" else bias}
