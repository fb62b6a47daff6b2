"""LoRA-SB's data-driven init (arXiv 2411.19557): B and A span the top-r singular subspaces of the
averaged full gradient G, and s·B R A is the best rank-r approximation of the first step −η·G."""

import pytest
import torch
from calib_toy import CalibNet, batches

import loralab as ll
from loralab.model import methods_of

LAYERS = ("first", "second")


def lora_sb(init="lora-sb", calibration=None, **options):
    model = CalibNet()
    spec = ll.AdapterSpec(method="lora-sb", r=3, alpha=6, targets=list(LAYERS), init=init, init_options=options)
    ll.add_adapter(model, spec, calibration=calibration)
    return model, dict(methods_of(model, "default"))


def full_gradients(calibration):
    """G of the plain model, averaged over the batches, written out here with autograd."""
    model = CalibNet()
    for b in calibration:
        (model(**b).loss / len(calibration)).backward()
    return {name: model.get_submodule(name).weight.grad.double() for name in LAYERS}


def projector(columns):
    return columns @ columns.T


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bases_span_top_singular_subspaces_of_the_first_step(optimizer):
    calibration = batches()
    _, methods = lora_sb(calibration=calibration, lr=0.01, optimizer=optimizer)
    for name, g in full_gradients(calibration).items():
        step = -0.01 * (g.sign() if optimizer == "adam" else g)  # the first full fine-tuning step
        u, s, vh = torch.linalg.svd(step, full_matrices=False)
        m = methods[name]
        b, a = m.basis_B.double(), m.basis_A.double()
        torch.testing.assert_close(projector(b), projector(u[:, :3]), atol=1e-5, rtol=0)
        torch.testing.assert_close(projector(a.T), projector(vh[:3].T), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]  # Eckart–Young
        torch.testing.assert_close(m.delta_weight().double(), best, atol=1e-7, rtol=1e-4)


def loss(model, calibration):
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in calibration) / len(calibration)


def after_one_sgd_step(model, calibration, lr=0.1):
    trainable = [p for p in model.parameters() if p.requires_grad]
    for b in calibration:
        (model(**b).loss / len(calibration)).backward()
    torch.optim.SGD(trainable, lr=lr).step()
    return loss(model, calibration)


@pytest.mark.parametrize("options", [{}, {"lr": 0.0}])
def test_first_step_lowers_loss_at_least_as_much_as_the_weight_basis(options):
    """An SGD step on R lowers the loss by ≈ lr·s²·‖BᵀGAᵀ‖²_F, which the gradient's top singular
    subspaces maximise (Ky Fan); the weight's singular subspaces are the comparison."""
    calibration = batches()
    base = loss(CalibNet(), calibration)
    data_driven, _ = lora_sb(calibration=calibration, **options)
    at_init = loss(data_driven, calibration)
    assert at_init <= base  # lr > 0: the init already took the (truncated) first step; lr = 0: unchanged
    weight_basis, _ = lora_sb(init="gaussian")
    ours, theirs = after_one_sgd_step(data_driven, calibration), after_one_sgd_step(weight_basis, calibration)
    assert ours < base and theirs < base
    assert base - ours >= 1.5 * (base - theirs)


def test_zero_lr_leaves_the_output_unchanged_and_save_load_reproduces(tmp_path):
    calibration = batches()
    model, methods = lora_sb(calibration=calibration, lr=0.0)
    x = calibration[0]["x"]
    torch.testing.assert_close(model(x).logits, CalibNet()(x).logits)
    with torch.no_grad():
        for m in methods.values():
            m.lora_R.normal_()  # pretend training moved R
    ll.save_adapter(model, tmp_path)
    fresh = CalibNet()
    ll.load_adapter(fresh, tmp_path)  # bases come from the file: no gradients recomputed
    torch.testing.assert_close(fresh(x).logits, model(x).logits)


def test_refusals():
    calibration = batches()
    with pytest.raises(ValueError, match="needs calibration data"):
        lora_sb()
    with pytest.raises(ValueError, match=r"holds method 'lora'.*method='lora-sb', init='lora-sb'"):
        ll.add_adapter(CalibNet(), ll.AdapterSpec(targets=["first"], init="lora-sb"), calibration=calibration)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam"):
        lora_sb(calibration=calibration, optimizer="lion")
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        lora_sb(calibration=calibration, lr=-1)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['rho'\]; it takes: lr, optimizer"):
        lora_sb(calibration=calibration, rho=2)
    with pytest.raises(ValueError, match=r"init 'gaussian' does not take option\(s\) \['lr'\]; it takes: none"):
        lora_sb(init="gaussian", lr=1.0)
