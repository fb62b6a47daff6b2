"""LoRA-Pro (arXiv 2407.18242): the adjusted gradients' equivalent update s(B·g_A' + g_B'·A)
equals the projection of the full gradient onto what LoRA can reach, P_B g + (I − P_B) g P_A."""

import torch
from optim_toy import loss_of, run, toy
from torch import nn

import loralab as ll
from loralab.model import methods_of
from loralab.train import TrainConfig
from loralab.train.optim import get_optimizer
from loralab.train.optim.lora_pro import lora_pro_grads


def test_equivalent_gradient_is_projected_full_gradient():
    model, method, x, target = toy()
    loss_of(model, x, target).backward()
    a, b, s = method.lora_A.detach().double(), method.lora_B.detach().double(), 2.0
    # the full gradient of W, computed directly on the dense layer
    w = (model[0].base_layer.weight.detach().double() + s * b @ a).requires_grad_(True)
    dense = ((x.double() @ w.T + model[0].base_layer.bias.double() - target.double()).pow(2).mean())
    (g,) = torch.autograd.grad(dense, w)
    new_a, new_b = lora_pro_grads(a, b, method.lora_A.grad.double(), method.lora_B.grad.double(), s, damping=0.0)
    equivalent = s * (b @ new_a + new_b @ a)
    p_b = b @ torch.linalg.inv(b.T @ b) @ b.T
    p_a = a.T @ torch.linalg.inv(a @ a.T) @ a
    expected = p_b @ g + (torch.eye(10, dtype=torch.double) - p_b) @ g @ p_a
    torch.testing.assert_close(equivalent, expected, atol=1e-6, rtol=1e-3)  # LoRA grads are float32


def test_lowers_loss_and_resumes_state():
    losses, _, opt = run("lora-pro", lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]
    state = opt.state_dict()
    assert state["steps_taken"] == 20


def test_frozen_b_gives_a_the_projection_onto_b():
    """MiCA freezes B: LoRA-Pro's step then moves W by the closest match A alone reaches, s·B·g_A' = P_B g."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    ll.add_adapter(model, ll.AdapterSpec(r=3, alpha=6, init="mica", targets=["0"]))
    (_, method), = list(methods_of(model, "default"))
    assert not method.lora_B.requires_grad
    with torch.no_grad():
        method.lora_A.normal_(std=0.1)
    x, target = torch.randn(32, 12), torch.randn(32, 10)
    opt = get_optimizer("lora-pro")(model, TrainConfig(lr=0.0, optimizer="lora-pro",
                                                       optimizer_options={"damping": 0.0}))
    loss_of(model, x, target).backward()
    a, b, s = method.lora_A.detach().double(), method.lora_B.double(), 2.0
    w = (model[0].base_layer.weight.detach().double() + s * b @ a).requires_grad_(True)
    dense = (x.double() @ w.T + model[0].base_layer.bias.double() - target.double()).pow(2).mean()
    (g,) = torch.autograd.grad(dense, w)
    opt.step()  # lr 0: only the gradient is rewritten
    equivalent = s * b @ method.lora_A.grad.double()
    torch.testing.assert_close(equivalent, b @ torch.linalg.inv(b.T @ b) @ b.T @ g, atol=1e-6, rtol=1e-3)
