"""OFT (arXiv 2306.07280): W' = W·R with R block-diagonal orthogonal from Cayley transforms."""

import json

import pytest
import torch
from method_harness import (
    attached,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from old_layout import old_loralab_config
from torch import nn

import loralab as ll
from loralab.methods.base import SavedTensors
from loralab.model import methods_of

SPEC = dict(method="oft", r=3, alpha=3, targets=["layer"])
KINDS = ("linear", "hf-conv1d")


def rotation(m):
    """Block-diagonal R built here from the trained upper triangles: Q skew, R = (I+Q)(I−Q)⁻¹."""
    blocks = []
    for k in range(3):
        q = torch.zeros(4, 4)
        q[torch.triu_indices(4, 4, 1)[0], torch.triu_indices(4, 4, 1)[1]] = m.oft_Q[k]
        q = q - q.T
        blocks.append((torch.eye(4) + q) @ torch.linalg.inv(torch.eye(4) - q))
    return torch.block_diag(*blocks)


def test_oft(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, lambda m, w: w @ rotation(m) - w, kinds=KINDS)
    check_merge_roundtrip(spec, kinds=KINDS)
    check_param_count(spec, lambda i, o: 3 * 4 * 3 // 2, kinds=KINDS)
    check_save_load(spec, tmp_path, kinds=KINDS)
    check_training_lowers_loss(spec, lr=3e-2)


def test_rotation_is_orthogonal_and_keeps_neuron_angles():
    net, method = attached(ll.AdapterSpec(**SPEC), "linear")
    r = torch.block_diag(*method.rotations().detach())
    torch.testing.assert_close(r @ r.T, torch.eye(12), atol=1e-5, rtol=0)
    w = net.layer.base_layer.weight.detach()
    merged = method.merged_weight(w).detach()
    torch.testing.assert_close(merged @ merged.T, w @ w.T, atol=1e-5, rtol=1e-5)


def test_block_size_and_block_share_set_the_blocks():
    sized = attached(ll.AdapterSpec(**{**SPEC, "r": 1, "options": {"block_size": 6}}), "linear")[1]
    assert sized.oft_Q.shape == (2, 15)
    net, shared = attached(ll.AdapterSpec(**{**SPEC, "options": {"block_share": True}}), "linear")
    assert shared.oft_Q.shape == (1, 6) and shared.expected_trainable_params() == 6
    plain_net, plain = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    with torch.no_grad():
        plain.oft_Q.copy_(shared.oft_Q.expand(3, -1))
    x = torch.randn(2, 12)
    torch.testing.assert_close(net(x), plain_net(x))


def test_neumann_terms_compute_peft_series():
    """n terms: I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1), written out here; many terms near the exact transform."""
    net, method = attached(ll.AdapterSpec(**{**SPEC, "options": {"neumann_terms": 5}}), "linear")
    q = torch.zeros(3, 4, 4)
    rows, cols = torch.triu_indices(4, 4, 1)
    q[:, rows, cols] = method.oft_Q.detach()
    q = q - q.transpose(1, 2)
    eye = torch.eye(4)
    series = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(method.rotations().detach(), series)
    with torch.no_grad():
        method.oft_Q.mul_(0.01)
    method.options["neumann_terms"] = 30
    exact = torch.linalg.solve(eye - 0.01 * q, eye + 0.01 * q, left=False)
    torch.testing.assert_close(method.rotations().detach(), exact)


@pytest.mark.parametrize("options", [{"block_size": 4}, {"block_share": True, "neumann_terms": 5}])
def test_options_survive_save_and_load(tmp_path, options):
    check_save_load(ll.AdapterSpec(**{**SPEC, "options": options}), tmp_path, kinds=KINDS)


@pytest.mark.parametrize("r, options, message", [
    (5, {}, "r \\(the number of blocks\\) to divide in=12"),
    (1, {"block_size": 5}, "block_size must be a positive integer dividing in=12"),
    (3, {"block_share": 1}, "block_share must be True or False"),
    (3, {"neumann_terms": 0}, "neumann_terms must be None"),
])
def test_invalid_options_say_what_is_allowed(r, options, message):
    with pytest.raises(ValueError, match=message):
        attached(ll.AdapterSpec(**{**SPEC, "r": r, "options": options}), "linear")


# ---- PEFT's OFT format, both ways ------------------------------------------------------------
class Net12(nn.Module):
    """Linear(12 → 10) named `layer`. (PEFT's OFT takes nn.Linear, nn.Conv2d and nn.Embedding; loralab's OFT
    takes nn.Linear and GPT-2's Conv1D, so only nn.Linear is read by both.)"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("r, options", [
    (3, {}),
    (1, {"block_size": 4}),
    (3, {"block_share": True}),
    (3, {"neumann_terms": 5}),
    (2, {"neumann_terms": 3, "block_share": True}),
])
def test_peft_loads_loralab_oft(tmp_path, r, options):
    from peft import PeftModel

    net = Net12()
    ll.add_adapter(net, ll.AdapterSpec(method="oft", r=r, targets=["layer"], options=options))
    (_, method), = methods_of(net, "default")
    with torch.no_grad():
        method.oft_Q.normal_(0, 0.3)
    ll.save_adapter(net, tmp_path)
    x = torch.randn(3, 5, 12)
    theirs = PeftModel.from_pretrained(Net12(), tmp_path).eval()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [
    dict(r=3, use_cayley_neumann=False),
    dict(r=0, oft_block_size=4, use_cayley_neumann=False),
    dict(r=3, block_share=True, use_cayley_neumann=False),
    dict(r=3),  # PEFT's default: the series, 5 terms
    dict(r=2, num_cayley_neumann_terms=3, block_share=True),
    dict(r=3, num_cayley_neumann_terms=2),
])
def test_loralab_loads_peft_oft(tmp_path, settings):
    from peft import OFTConfig, get_peft_model

    config = OFTConfig(target_modules=["layer"], **{"oft_block_size": 0, **settings}, init_weights=False)
    theirs = get_peft_model(Net12(), config).eval()  # init_weights=False: random Q
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(Net12(), tmp_path)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


def peft_file(tmp_path, **settings) -> dict:
    """A PEFT-written OFT adapter in tmp_path; its config, to edit."""
    from peft import OFTConfig, get_peft_model

    get_peft_model(Net12(), OFTConfig(target_modules=["layer"], r=3, oft_block_size=0, **settings)).save_pretrained(
        tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("settings, edit, message", [
    ({"coft": True}, {}, "constrained variant \\(coft=true\\)"),
    ({}, {"peft_version": "0.17.1"}, "series of PEFT before 0.18 \\(peft_version 0.17.1\\)"),
    ({}, {"peft_version": None}, "series of PEFT before 0.18 \\(peft_version None\\)"),
    ({}, {"oft_block_size": 4}, "exactly one of r and oft_block_size; this one has 3 and 4"),
])
def test_peft_files_loralab_cannot_read_exactly_are_refused(tmp_path, settings, edit, message):
    config = {**peft_file(tmp_path, **settings), **edit}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        ll.load_adapter(Net12(), tmp_path)


def test_old_loralab_layout_still_loads(tmp_path):
    """The layout loralab wrote before it used PEFT's: `oft_Q` under peft_type LORALAB."""
    from safetensors.torch import save_file

    upper = torch.randn(3, 6) * 0.3
    save_file({"base_model.model.layer.oft_Q": upper}, str(tmp_path / "adapter_model.safetensors"))
    config = old_loralab_config("oft", r=3, alpha=3)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    net = ll.load_adapter(Net12(), tmp_path)
    (_, method), = methods_of(net, "default")
    torch.testing.assert_close(method.oft_Q.detach(), upper)


def test_old_layout_key_is_read():
    """What load_adapter hands an OFT layer from loralab's old layout: `oft_Q`, read as the exact transform."""
    _, method = attached(ll.AdapterSpec(**SPEC), "linear", randomize=False)
    upper = torch.randn(3, 6)
    saved = SavedTensors({"oft_Q": upper})
    method.from_saved(saved, where="layer")
    assert saved.read == {"oft_Q"}  # so it is not reported as unexpected
    torch.testing.assert_close(method.oft_Q.detach(), upper)
