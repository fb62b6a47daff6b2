"""MoS: mixture of shards (Wang et al., arXiv 2410.00938).

Global pools of short vectors ("shards", length l) are shared by every layer, one pool for
A and one for B (pair dissociation). Each row of a layer's A (r×in) and each column of its
B (out×r) is a concatenation of shards picked by a fixed random index (subset selection,
vector sharding); the first `private` shards of each row are the layer's own (shard
privatization). ΔW = s · B A. The B pool and private B shards start at zero, so ΔW = 0.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.layer_kinds import LayerKind
from loralab.methods.base import METHODS, FactoredMethod
from loralab.spec import AdapterSpec

DEFAULTS = {"pool_size": 512, "shard_length": 8, "private": 1, "seed": 0}


@METHODS.register("mos")
class MoS(FactoredMethod):
    name = "mos"
    summary = "A and B concatenated from shards of two global pools, a few shards private per layer"
    paper = "2410.00938"
    param_formula = "2·pool·l shared, plus r·private·l·2 per layer"
    suggested_lr = 3e-3
    layer_kinds = ("linear", "hf-conv1d")
    option_defaults = DEFAULTS

    @classmethod
    def make_shared(cls, spec: AdapterSpec, layers: list[LayerKind]) -> nn.Module:
        opts = {**DEFAULTS, **spec.options}
        like = layers[0].weight
        g = torch.Generator().manual_seed(opts["seed"])
        shared = nn.Module()
        shared.pool_A = nn.Parameter((torch.randn(opts["pool_size"], opts["shard_length"], generator=g)
                                      / layers[0].in_features ** 0.5).to(like))
        shared.pool_B = nn.Parameter(torch.zeros(opts["pool_size"], opts["shard_length"]).to(like))
        shared.generator = g
        return shared

    @classmethod
    def expected_shared_params(cls, spec: AdapterSpec, layers: list[LayerKind]) -> int:
        opts = {**DEFAULTS, **spec.options}
        return 2 * opts["pool_size"] * opts["shard_length"]

    def __init__(self, layer: LayerKind, spec: AdapterSpec, shared: nn.Module | None = None) -> None:
        super().__init__(layer, spec, shared)
        length, private, pool = self.options["shard_length"], self.options["private"], self.options["pool_size"]
        for size, what in ((layer.in_features, "in"), (layer.out_features, "out")):
            if size % length or size // length < private:
                raise ValueError(f"mos shard_length={length} must divide {what}={size} into at least "
                                 f"private={private} shards")
        g = shared.generator
        self.register_buffer("index_A", torch.randint(0, pool, (spec.r, layer.in_features // length - private),
                                                      generator=g).to(layer.weight.device))
        self.register_buffer("index_B", torch.randint(0, pool, (spec.r, layer.out_features // length - private),
                                                      generator=g).to(layer.weight.device))
        kw = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.private_A = nn.Parameter(torch.randn(spec.r, private, length, **kw) / layer.in_features ** 0.5)
        self.private_B = nn.Parameter(torch.zeros(spec.r, private, length, **kw))

    def expected_trainable_params(self) -> int:
        return self.private_A.numel() + self.private_B.numel()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([self.private_A, self.shared.pool_A[self.index_A]], dim=1).reshape(self.r, -1)
        b = torch.cat([self.private_B, self.shared.pool_B[self.index_B]], dim=1).reshape(self.r, -1).T
        return a, b
