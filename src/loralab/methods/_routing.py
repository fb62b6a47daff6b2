"""Top-k token routing shared by the mixture methods (LoRAMoE, MeteoRA-style gates).

k > 1: softmax over each token's k best logits (Mixtral-style, as MeteoRA and LoRAMoE weight
their experts). k = 1: the chosen expert is weighted by its probability under the softmax
over all experts, as in Switch Transformer (arXiv 2101.03961); a softmax over one logit is
always 1, which would leave the router without any gradient from the task loss.
"""

from __future__ import annotations

import torch


def top_k_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[..., E] expert weights: non-zero on each token's top-k experts only."""
    top, index = logits.topk(k, dim=-1)
    weights = top.softmax(-1) if k > 1 else logits.softmax(-1).gather(-1, index)
    return torch.zeros_like(logits).scatter(-1, index, weights)
