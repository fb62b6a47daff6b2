"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al., arXiv 2205.05638).

A trained vector rescales the layer: its output, y = l ⊙ (W x) + b, or — for feed-forward
down-projections (option `feedforward=True`) — its input, y = W (l ⊙ x) + b. l starts at one.
Non-additive: merging scales W's rows (or columns). The bias is not scaled, unless option
`scale_bias=True`: then y = l ⊙ (W x + b), as PEFT computes it (merging then scales the bias too).

Option `feedforward` may also name the feed-forward modules, as PEFT's `feedforward_modules` does
(a list of name endings, or a regex the full name must match); a layer learns which it is only when
an adapter file is loaded (the method does not see its module's name before), so an adapter built
by `add_adapter` takes True or False.

Saved in PEFT's IA3 format: `ia3_l` [out, 1] (output scaling) or [1, in] (input scaling), config
`feedforward_modules` (".*" for every layer, [] for none) and `init_ia3_weights`. PEFT scales the bias
of output-scaled layers, so an adapter with `scale_bias=False` on layers with a bias is saved in
loralab's layout ("peft_type": "LORALAB") instead; loading a PEFT file sets `scale_bias=True`. Files of
loralab's older layout (`ia3_l` [size], peft_type LORALAB) still load. PEFT's IA3 takes nn.Linear,
GPT-2's Conv1D and nn.Conv2d; loralab's the first two.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, AdapterMethod, check_shape
from loralab.spec import AdapterSpec

ALL = ".*"  # feedforward_modules for "every targeted module" (a regex: PEFT checks a list against target_modules)


def is_feedforward(path: str, modules: str | list[str]) -> bool:
    """PEFT's rule for feedforward_modules: a regex matches the full name, a list entry its ending."""
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path.endswith(m) for m in modules)


@METHODS.register("ia3")
class IA3(AdapterMethod):
    name = "ia3"
    summary = "A trained vector rescales the layer's output (or its input, for feed-forward layers)"
    paper = "2205.05638"
    param_formula = "out (or in, with feedforward=True)"
    peft_type = "IA3"
    peft_when = "scale_bias=True where layers have a bias"
    peft_lacks = ("bias", "layers_pattern", "layers_to_transform")
    suggested_lr = 1e-2
    additive = False
    needs_base = True
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = {"feedforward": False, "scale_bias": False}

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        ff = self.options["feedforward"]
        if not isinstance(ff, bool | str) and not (isinstance(ff, list) and all(isinstance(m, str) for m in ff)):
            raise ValueError(f"ia3 option feedforward must be True, False, a list of module names or a regex, "
                             f"got {ff!r}")
        self.scales_input: bool | None = ff if isinstance(ff, bool) else None  # names: settled by from_saved
        size = layer.in_features if self.scales_input else layer.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=layer.weight.dtype, device=layer.weight.device))

    @classmethod
    def max_rank(cls, layer: LayerKind) -> int:
        return max(layer.in_features, layer.out_features)  # r is unused

    def input_side(self) -> bool:
        """Whether l scales the input (else the output)."""
        if self.scales_input is None:
            raise ValueError(f"ia3 option feedforward={self.options['feedforward']!r} names modules; a layer "
                             "learns whether it is one only from an adapter file: pass True or False to add_adapter")
        return self.scales_input

    def expected_trainable_params(self) -> int:
        return self.layer.in_features if self.input_side() else self.layer.out_features

    def scaled_bias(self) -> torch.Tensor | None:
        """The bias that l scales with the output (scale_bias on a layer with one), else None."""
        return None if self.input_side() or not self.options["scale_bias"] else self.layer.bias

    def forward(self, x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if self.input_side():
            return self.layer.apply(x * (self.ia3_l - 1), self.layer.matrix())
        bias = self.scaled_bias()
        return (base if bias is None else self.layer.add_bias(base, bias)) * (self.ia3_l - 1)

    def scaled(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.ia3_l if self.input_side() else weight * self.ia3_l[:, None]

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scaled(weight)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor | None:
        return None if self.scaled_bias() is None else bias * self.ia3_l.to(bias.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The change to W (with scale_bias, the bias changes too: by (l − 1) ⊙ b)."""
        w = self.layer.matrix().detach()
        return self.scaled(w) - w

    # ---- PEFT's IA3 format -----------------------------------------------------------------
    def to_saved(self) -> dict[str, torch.Tensor]:
        l = self.ia3_l.detach()
        return {"ia3_l": l[None] if self.input_side() else l[:, None]}

    def from_saved(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if "ia3_l" not in tensors:
            raise ValueError(f"adapter file lacks {where}.ia3_l")
        if self.scales_input is None:
            self.scales_input = is_feedforward(where, self.options["feedforward"])
            size = self.layer.in_features if self.scales_input else self.layer.out_features
            self.ia3_l = nn.Parameter(self.ia3_l.new_ones(size), requires_grad=self.ia3_l.requires_grad)
        saved, size = tensors["ia3_l"], self.ia3_l.numel()
        if saved.shape != (size,):  # (size,): loralab's older layout
            check_shape(f"{where}.ia3_l", saved.shape, (1, size) if self.scales_input else (size, 1))
        with torch.no_grad():
            self.ia3_l.copy_(saved.reshape(size))

    @classmethod
    def peft_config(cls, spec: AdapterSpec, adapted: dict[str, AdapterMethod]) -> dict[str, Any] | None:
        """None (loralab's layout) where a layer that may be output-scaled has a bias l leaves unscaled:
        PEFT scales it."""
        options = {**cls.option_defaults, **spec.options}
        ff = options["feedforward"]
        if ff is not True and not options["scale_bias"] and any(m.layer.bias is not None for m in adapted.values()):
            return None
        return {"peft_type": "IA3", "feedforward_modules": ALL if ff is True else [] if ff is False else ff,
                "init_ia3_weights": True}

    @classmethod
    def spec_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        ff = config.get("feedforward_modules")
        if ff is None:
            raise ValueError("this IA3 adapter_config.json has no feedforward_modules (PEFT fills them in from its "
                             "table of model types, which loralab does not have): name them there")
        return {"method": "ia3", "r": 1,
                "options": {"feedforward": True if ff == ALL else ff or False, "scale_bias": True}}
