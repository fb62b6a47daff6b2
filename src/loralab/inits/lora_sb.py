"""LoRA-SB's data-driven initialisation (Ponkshe et al., arXiv 2411.19557, "Initialization using
update approximation is a silver bullet for extreme efficient low-rank fine-tuning").

The frozen bases B, A and the trained r×r core R of `method="lora-sb"` start from the first step
full fine-tuning would take. With Ḡ the full-weight gradient averaged over the calibration batches,
that step is approximated as ΔW₁ = −η·Ḡ (option optimizer="sgd", the default) or −η·sign(Ḡ)
(optimizer="adam": Adam's first step, which is what the authors' code uses). With the SVD of the
direction, −Ḡ (or −sign Ḡ) = U S Vᵀ:

    B = U_r,  A = V_rᵀ  (orthonormal, frozen),  R = η·S_r / s,

so s·B R A is the best rank-r approximation of ΔW₁ (Eckart–Young) and the model starts as if that
step had been taken; the base weight is left as it is (as in the authors' code). Training R then
moves W only within the gradient's top-r singular subspaces, where an SGD step on R lowers the loss
most to first order (Ky Fan: ‖BᵀḠAᵀ‖_F is largest there).
Options: lr (η, default 1e-3; 0 starts R at zero and leaves the output unchanged), optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.inits.base import InitContext, initialiser
from loralab.inits.calibration import weight_gradients
from loralab.methods.base import AdapterMethod

OPTIONS = {"lr": 1e-3, "optimizer": "sgd"}
OPTIMIZERS = ("sgd", "adam")


@initialiser("lora-sb", "LoRA-SB's B, A, R from the SVD of the first full fine-tuning step on calibration data",
             "2411.19557", needs_data=True, options=OPTIONS)
@torch.no_grad()
def lora_sb(model: nn.Module, adapted: list[tuple[str, AdapterMethod]], context: InitContext) -> None:
    lr, optimizer = context.options["lr"], context.options["optimizer"]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"lora-sb init option optimizer must be one of {', '.join(OPTIMIZERS)} "
                         f"(whose first step it approximates), got {optimizer!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr < 0:
        raise ValueError(f"lora-sb init option lr must be a number >= 0 (the first step's learning rate), got {lr!r}")
    for path, method in adapted:
        if method.name != "lora-sb":
            raise ValueError(f"init 'lora-sb' sets LoRA-SB's bases and core, but {path} holds method "
                             f"{method.name!r}: use AdapterSpec(method='lora-sb', init='lora-sb')")
    grads = weight_gradients(model, adapted, context, "lora-sb: gradients")
    for path, method in adapted:
        g = grads[path].double()
        u, s, vh = torch.linalg.svd(-(g.sign() if optimizer == "adam" else g), full_matrices=False)
        r = method.r
        method.basis_B.copy_(u[:, :r])
        method.basis_A.copy_(vh[:r])
        method.lora_R.copy_(torch.diag(lr * s[:r] / method.scale))
