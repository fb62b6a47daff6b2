"""How each supported base layer type looks to an adapter method.

Methods see every layer as one matrix W of shape [out_features, in_features] and a
function `apply(x, W)` (the layer's own operation without bias). This file maps that
canonical view onto nn.Linear, nn.Conv1d/2d/3d, nn.Embedding and transformers' GPT-2-style
Conv1D (which stores W transposed), so no method needs per-layer-type code.
nn.MultiheadAttention is seen as its packed input projection; it is not linear in its input, so
its adapted forward runs the attention with W + ΔW in place of that weight (`call_with`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


# torch's registries of module-wide hooks (nn.modules.module.register_module_forward_hook, …), which it
# fills and empties in place
_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, n, None) for n in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _global_hooks() -> bool:
    """Whether any module-wide hook is set."""
    return any(_GLOBAL_HOOKS)


class LayerKind:
    """The canonical view of one base layer. Holds a reference to it, not a copy."""

    name = "linear"

    def __init__(self, base: nn.Module) -> None:
        self.base = base

    @property
    def weight(self) -> nn.Parameter:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight[0].numel()

    def matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The canonical [out, in] view of `weight` (default: the base weight)."""
        w = self.weight if weight is None else weight
        return w if w.dim() == 2 else w.reshape(w.shape[0], -1)

    def to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """A canonical [out, in] matrix in the base weight's own shape."""
        return matrix.reshape(self.weight.shape)

    def apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """The layer's operation with weight `matrix` (canonical) and no bias."""
        return F.linear(x, matrix)

    def add_bias(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return out + bias

    def without_bias(self, out: torch.Tensor) -> torch.Tensor:
        """The base output `out` minus the layer's bias."""
        bias = self.bias
        return out if bias is None else self.add_bias(out, -bias)

    def runs_plain(self) -> bool:
        """Whether calling the base layer computes `x Wᵀ + b` and nothing else — the class's own
        forward (not a subclass's, e.g. a quantised Linear), no hooks on it — so that a fused path
        may compute that itself instead of calling the layer."""
        b = self.base
        hooked = b._forward_hooks or b._forward_pre_hooks or b._backward_hooks or b._backward_pre_hooks
        return not hooked and not _global_hooks() and self._own_forward(type(b))

    def _own_forward(self, cls: type) -> bool:
        return cls.forward is nn.Linear.forward


class TransposedKind(LayerKind):
    """Layers that store W transposed, [in, out]: GPT-2's Conv1D, and nn.Embedding's [num, dim] table."""

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0]

    def matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return (self.weight if weight is None else weight).T

    def to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T


class HFConv1DKind(TransposedKind):
    """transformers' Conv1D (GPT-2): y = x @ W + b with W stored [in, out]."""

    name = "hf-conv1d"

    def _own_forward(self, cls: type) -> bool:
        return cls.__module__ == "transformers.pytorch_utils"


class ConvKind(LayerKind):
    """nn.Conv1d / Conv2d / Conv3d with groups=1: W is [out, in·k…], the kernel flattened."""

    name = "conv"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        if base.groups != 1:
            raise ValueError(f"adapters on grouped convolutions (groups={base.groups}) are not supported")
        if base.padding_mode != "zeros":
            raise ValueError(f"adapters on convolutions need padding_mode='zeros', got {base.padding_mode!r}")
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base.weight.dim() - 2]

    def apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return self.conv_kernel(x, self.to_weight(matrix))

    def conv_kernel(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Convolve with this layer's stride, padding and dilation but another kernel."""
        b = self.base
        return self.conv(x, kernel, None, b.stride, b.padding, b.dilation)

    def add_bias(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return out + bias.view(-1, *([1] * (out.dim() - 2)))


def embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The factor an embedding subclass multiplies its looked-up rows by, as transformers' scaled word
    embeddings do (Gemma 3, BART, Marian, M2M100, …: an `embed_scale` number or one-element tensor), else None.
    PEFT applies the same factor to its LoRA rows. Any other `embed_scale` is refused: how the layer uses
    it cannot be known."""
    scale = getattr(module, "embed_scale", None)
    if scale is None or isinstance(scale, int | float):
        return scale
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
    raise ValueError(f"adapters on {type(module).__name__} need its embed_scale to be one number (it scales every "
                     f"looked-up row); got {shape}")


class EmbeddingKind(TransposedKind):
    """nn.Embedding: the table is [num, dim]; canonically W = table.T, [dim, num], so out = dim. A scaled
    embedding (see `embed_scale`) scales every lookup, so an update's rows are scaled as the base's are."""

    name = "embedding"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        embed_scale(base)  # refused here, when adapted, if it is not one number

    def apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return self.lookup(x, matrix.T)

    def lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        b = self.base
        rows = F.embedding(x, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        scale = embed_scale(b)
        if scale is None:
            return rows
        return rows * (scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else scale)


class AttentionKind(LayerKind):
    """nn.MultiheadAttention's packed input projection, W = in_proj_weight [3·E, E] (query, key and value
    stacked), as PEFT adapts it; its out_proj is adapted as a linear layer beside it, which the attention
    reads by weight (AdaptedLayer.weight)."""

    name = "mha"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        if not base._qkv_same_embed_dim:
            raise ValueError("adapters on nn.MultiheadAttention need query, key and value of one width "
                             "(kdim and vdim unset), as its input projection is then one packed weight")

    @property
    def weight(self) -> nn.Parameter:
        return self.base.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.in_proj_bias

    def apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        raise TypeError("nn.MultiheadAttention is not linear in its input: its adapters change its weight "
                        "(call_with), not its output")

    def call_with(self, weight: torch.Tensor, bias: torch.Tensor | None, args: tuple, kwargs: dict):
        """The attention's own forward, with `weight` (and `bias`) as its input projection."""
        swapped = {"in_proj_weight": weight} if bias is None else {"in_proj_weight": weight, "in_proj_bias": bias}
        return torch.func.functional_call(self.base, swapped, args, kwargs)

    def runs_plain(self) -> bool:
        return False


SUPPORTED_TYPES = "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.MultiheadAttention, transformers Conv1D"


def kind_of(module: nn.Module) -> LayerKind | None:
    """The LayerKind for a supported base layer, else None."""
    if isinstance(module, nn.Linear):
        return LayerKind(module)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return ConvKind(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingKind(module)
    if _is_hf_conv1d(module):
        return HFConv1DKind(module)
    if isinstance(module, nn.MultiheadAttention):
        return AttentionKind(module)
    return None


def is_linear_like(module: nn.Module) -> bool:
    """What "all-linear" adapts: nn.Linear and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)
