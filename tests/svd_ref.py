"""The SVD of a test layer's canonical weight, computed here for reference ΔW formulas."""

import torch


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(w.float(), full_matrices=False)
