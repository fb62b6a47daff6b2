"""VeRA: vector-based random matrix adaptation (Kopiczko et al., arXiv 2310.11454).

One pair of frozen random matrices A (r×in) and B (out×r), drawn from one seed and shared by
every layer (a layer takes the top-left block of the pair drawn at the adapter's largest
shape), and two trained vectors per layer:
    ΔW = Λ_b B Λ_d A,   b ∈ R^{out} (zero at the start), d ∈ R^{r} (d_init, 0.1 in the paper).
Scale s is not used (as in the paper); r may exceed the layer's shape (B and A need not be thin).

Saved in PEFT's VeRA format: per layer `vera_lambda_b` [out] and `vera_lambda_d` [r], and the shared
`base_model.vera_A` [r, max in] and `base_model.vera_B` [max out, r]; option `seed` is PEFT's
`projection_prng_key`, `d_init` its `d_initial`. A and B are drawn as PEFT draws them (Kaiming-uniform,
A then B from one CPU generator seeded with `seed`), so an adapter with option `save_projection=False`
(as PEFT's own) leaves them out of the file and both libraries redraw the same ones.
PEFT's VeRA takes nn.Linear and GPT-2's Conv1D only: a VeRA on nn.Conv2d or nn.Embedding is read by loralab alone.
Files of loralab's older layout ("peft_type": "LORALAB", keys lora_b, lora_d, loralab_shared.vera_A/B) still load.
Since the bases are now drawn as PEFT draws them (bound √6/√fan_in, not 1/√fan_in), a new adapter's random
A and B differ from those an earlier loralab drew for the same seed; saved adapters keep theirs.
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


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−√6/√fan_in, √6/√fan_in) with fan_in = shape[1], computed as PEFT's VeRA does (to the bit)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@METHODS.register("vera")
class VeRA(FactoredMethod):
    name = "vera"
    summary = "Frozen random A, B shared by all layers; trained scaling vectors b and d"
    paper = "2310.11454"
    param_formula = "out + r"
    peft_type = "VERA"
    peft_lacks = ("exclude_modules",)
    shared_prefix = "base_model."
    suggested_lr = 1e-2
    option_defaults = {"seed": 0, "d_init": 0.1, "save_projection": True}

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        options = {**cls.option_defaults, **spec.options}
        out = max(layer.out_features for layer in layers)
        inp = max(layer.in_features for layer in layers)
        g = torch.Generator().manual_seed(options["seed"])
        like, saved = layers[0].weight, bool(options["save_projection"])
        shared = nn.Module()
        shared.register_buffer("vera_A", kaiming_uniform((spec.r, inp), g).to(like), persistent=saved)
        shared.register_buffer("vera_B", kaiming_uniform((out, spec.r), g).to(like), persistent=saved)
        return shared

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.vera_lambda_b = nn.Parameter(torch.zeros(layer.out_features, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((spec.r,), float(self.options["d_init"]), **kw))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return sys.maxsize

    def expected_trainable_params(self) -> int:
        return self.layer.out_features + self.r

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.shared.vera_A[:, : self.layer.in_features],
                self.shared.vera_B[: self.layer.out_features])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.bases()
        return a, self.vera_lambda_b[:, None] * b * self.vera_lambda_d

    def factor_scale(self) -> float:
        return 1.0  # VeRA's b and d carry the scale

    # ---- PEFT's VeRA format ----------------------------------------------------------------
    @classmethod
    def remap_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """loralab's older layout ("peft_type": "LORALAB"): b, d as lora_b, lora_d, A and B under loralab_shared."""
        if config.get("peft_type") != "LORALAB":
            return tensors
        renamed = {"lora_b": "vera_lambda_b", "lora_d": "vera_lambda_d"}

        def key_now(key: str) -> str:
            path, _, leaf = key.rpartition(".")
            if path == "loralab_shared":
                return cls.shared_prefix + leaf
            return f"{path}.{renamed[leaf]}" if leaf in renamed else key

        return {key_now(k): t for k, t in tensors.items()}

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any]:
        options = {**cls.option_defaults, **spec.options}
        return {"peft_type": "VERA", "r": spec.r, "projection_prng_key": options["seed"],
                "save_projection": bool(options["save_projection"]), "d_initial": options["d_init"],
                "vera_dropout": spec.dropout, "bias": "vera_only" if spec.bias == "lora_only" else spec.bias,
                "init_weights": True}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        options = {"seed": int(config.get("projection_prng_key", 0)), "d_init": float(config.get("d_initial", 0.1)),
                   "save_projection": bool(config.get("save_projection", True))}
        bias = config.get("bias") or "none"
        return {"method": "vera", "r": int(config["r"]), "options": options,
                "dropout": float(config.get("vera_dropout") or 0), "bias": "lora_only" if bias == "vera_only" else bias}
