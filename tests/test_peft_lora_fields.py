"""PEFT LoRA files saved with an init that changes the base (PiSSA, OLoRA) and not converted: loralab
re-forms the residual base as PEFT's own reload does, and gives PEFT's outputs; files whose base
cannot be re-formed (CorDA, LoftQ, LoRA-GA) are refused, and so is serving any of them. Files using
a feature of PEFT's LoRA that loralab does not implement are refused by name.

The reference is PEFT itself: the trained PEFT model, and `PeftModel.from_pretrained` on a fresh base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from method_harness import randomise_trainables
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loralab as ll
from loralab.peft_lora_fields import UNSUPPORTED
from loralab.serve.attached import attach_unstackable
from loralab.serve.pool import AdapterPool


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def peft_trained(folder, init, use_dora=False):
    """A PEFT adapter made with `init`, its factors moved as training would, saved without conversion."""
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=16, target_modules=["a", "b"], init_lora_weights=init,
                                             use_dora=use_dora))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        model.save_pretrained(folder)
        with model.disable_adapter():
            residual = model(X)
        return model(X), residual


@pytest.mark.parametrize("init,use_dora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_loads_as_peft_reloads_it(tmp_path, init, use_dora):
    want, residual = peft_trained(tmp_path, init, use_dora)
    with torch.no_grad():
        assert (want - Net()(X)).abs().max() > 1e-2  # the adapter changes the output
        peft_reload = PeftModel.from_pretrained(Net(), tmp_path)(X)
        torch.testing.assert_close(peft_reload, want)
        ours = ll.load_adapter(Net(), tmp_path)
        torch.testing.assert_close(ours(X), want, atol=1e-5, rtol=1e-5)
        with ll.disabled(ours):  # the base is the residual one, as in PEFT
            torch.testing.assert_close(ours(X), residual, atol=1e-5, rtol=1e-5)


def test_saving_it_again_writes_it_for_the_original_base(tmp_path):
    want, _ = peft_trained(tmp_path / "peft", "pissa")
    ll.save_adapter(ll.load_adapter(Net(), tmp_path / "peft"), tmp_path / "ours")
    assert ll.read_config(tmp_path / "ours")["init_lora_weights"] is True
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(Net(), tmp_path / "ours")(X), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ll.load_adapter(Net(), tmp_path / "ours")(X), want, atol=1e-5, rtol=1e-5)


def test_randomised_pissa_is_read_with_the_exact_svd_and_a_warning(tmp_path):
    want, _ = peft_trained(tmp_path, "pissa_niter_16")
    with pytest.warns(UserWarning, match="randomised SVD"):
        ours = ll.load_adapter(Net(), tmp_path)
    with torch.no_grad():  # PEFT's estimate after 16 iterations is close to the exact factors
        assert (ours(X) - want).abs().max() < 0.02 * (want - Net()(X)).abs().max()


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga"])
def test_files_whose_base_cannot_be_re_formed_are_refused(tmp_path, init):
    peft_trained(tmp_path, "pissa")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' and not converted.*path_initial_model"):
        ll.load_adapter(Net(), tmp_path)


def test_serving_refuses_them_and_says_how_to_convert(tmp_path):
    peft_trained(tmp_path / "pissa", "pissa")
    peft_trained(tmp_path / "plain", True)
    model = Net()
    before = copy.deepcopy(model.state_dict())
    attached, rejected = attach_unstackable(model, tmp_path)
    assert attached == [] and "changes the base weights" in rejected["pissa"] and "save_adapter" in rejected["pissa"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the shared base is untouched
    pool = AdapterPool(tmp_path, 2, model=model)
    assert pool.names() == ["plain"] and "changes the base weights" in pool.rejected["pissa"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("arrow_config", {"top_k": 2}, "uses arrow_config .*compose.add_arrow.*does not implement"),
    ("use_qalora", True, "uses use_qalora .*group-pooled A.*GPTQ.*does not implement"),
])
def test_peft_files_with_features_loralab_lacks_are_refused_by_name(tmp_path, field, value, message):
    get_peft_model(Net(), LoraConfig(r=4, target_modules=["a"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert field in config or field == "arrow_config"  # PEFT writes use_qalora (false) in every LoRA file
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message):
        ll.load_adapter(Net(), tmp_path)


def test_monteclora_files_load_as_the_lora_they_compute_outside_training(tmp_path):
    """MonteCLoRA samples perturbations of A only in training: in eval PEFT computes the plain LoRA of its factors."""
    from peft.tuners.lora.config import MontecloraConfig

    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["a", "b"], monteclora_config=MontecloraConfig()))
    randomise_trainables(model)
    model.eval().save_pretrained(tmp_path)
    assert any(".lora_monteclora_sampler." in k for k in ll.read_tensors(tmp_path))
    with pytest.warns(UserWarning, match="training-time sampling is not implemented"):
        ours = ll.load_adapter(Net(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), model(X), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_every_unsupported_field_is_refused_where_set_and_only_then(tmp_path, field):
    peft_trained(tmp_path, True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not config.get(field, False)  # PEFT writes it unset for a plain LoRA, which loads
    ll.load_adapter(Net(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: {"x": 1}}))
    with pytest.raises(ValueError, match=f"uses {field} "):
        ll.load_adapter(Net(), tmp_path)


def test_velora_files_load_without_their_training_only_buffer(tmp_path):
    """VeLoRA changes only how PEFT forms A's gradient; the forward, and so loralab's reading, is plain LoRA's."""
    from peft.tuners.lora.config import VeloraConfig

    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["a", "b"], velora_config=VeloraConfig(num_groups=4)))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    model(X).sum().backward()  # VeLoRA fills its buffer in a training step
    model.eval().save_pretrained(tmp_path)
    assert any(k.endswith("lora_velora_embed") for k in ll.read_tensors(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ll.load_adapter(Net(), tmp_path)(X), model(X), atol=1e-6, rtol=1e-6)


def test_readers_of_the_file_alone_refuse_it_and_take_the_converted_file(tmp_path):
    from loralab.analysis.report import lora_factors
    from loralab.compose import combine_folders
    from loralab.train.rank.lora_squeeze import squeeze_adapter

    want, _ = peft_trained(tmp_path / "peft", "pissa")
    readers = (lambda d: combine_folders([d, d], tmp_path / "combined"),
               lambda d: squeeze_adapter(d, 2, tmp_path / "sq"), lora_factors)
    for read in readers:
        with pytest.raises(ValueError, match="from the adapter file alone.*save_adapter first"):
            read(tmp_path / "peft")
    ll.save_adapter(ll.load_adapter(Net(), tmp_path / "peft"), tmp_path / "converted")
    squeezed = squeeze_adapter(tmp_path / "converted", 8, tmp_path / "sq")  # rank 2r = 8: the same ΔW
    with torch.no_grad():
        torch.testing.assert_close(ll.load_adapter(Net(), squeezed)(X), want, atol=1e-4, rtol=1e-4)


def test_merging_it_gives_the_weights_peft_merges(tmp_path):
    peft_trained(tmp_path, "pissa")
    theirs = PeftModel.from_pretrained(Net(), tmp_path).merge_and_unload()
    ours = ll.load_adapter(Net(), tmp_path)
    ll.merge(ours, "default")
    for name in ("a", "b"):
        torch.testing.assert_close(getattr(ours, name).base_layer.weight, getattr(theirs, name).weight,
                                   atol=1e-6, rtol=1e-5)


def test_inspect_says_the_norms_are_from_the_changed_base(tmp_path, capsys):
    from loralab.cli import main

    peft_trained(tmp_path / "pissa", "pissa")
    peft_trained(tmp_path / "plain", True)
    assert main(["inspect", str(tmp_path / "pissa")]) == 0
    assert "note: saved by PEFT with init_lora_weights='pissa' and not converted" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "plain")]) == 0
    assert "note:" not in capsys.readouterr().out
