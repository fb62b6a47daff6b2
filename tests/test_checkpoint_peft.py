"""Our adapter files against HF PEFT itself: what loralab saves PEFT loads, and the other way round.

Small transformers models built from configs (Llama with nn.Linear, GPT-2 with Conv1D, BERT
classification with a saved head) stand in for the embedded ones; logits must agree.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import loralab as ll


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def bert_cls():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


INPUT = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))

CASES = {
    "lora": (llama, dict(r=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj"])),
    "rslora": (llama, dict(r=4, alpha=8, targets="all-linear", rslora=True)),
    "dora": (llama, dict(method="dora", r=4, alpha=8, targets=["q_proj", "down_proj"])),
    "gpt2-conv1d": (gpt2, dict(r=4, alpha=8, targets=["c_attn", "c_fc"])),
    "bert-head": (bert_cls, dict(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"],
                                 bias="lora_only")),
    "layers": (llama, dict(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"], layers=[1])),
    "layers-pattern": (gpt2, dict(r=4, alpha=8, targets=["c_attn", "c_fc"], layers=0, layers_pattern="h")),
}


def randomise_trainables(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("case", CASES)
def test_loralab_saved_adapter_loads_in_peft(case, tmp_path):
    make, kwargs = CASES[case]
    model = make()
    ll.add_adapter(model, ll.AdapterSpec(**kwargs))
    randomise_trainables(model, 1)
    want = logits(model)
    ll.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(make()), want, atol=1e-3)  # the adapter does change the output


def peft_config(kwargs):
    return LoraConfig(r=kwargs["r"], lora_alpha=kwargs["alpha"], target_modules=kwargs["targets"],
                      use_dora=kwargs.get("method") == "dora", use_rslora=kwargs.get("rslora", False),
                      modules_to_save=kwargs.get("modules_to_save"), bias=kwargs.get("bias", "none"),
                      layers_to_transform=kwargs.get("layers"), layers_pattern=kwargs.get("layers_pattern"))


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_in_loralab(case, tmp_path):
    make, kwargs = CASES[case]
    peft_model = get_peft_model(make(), peft_config(kwargs))
    randomise_trainables(peft_model, 2)
    peft_model.eval()
    want = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = make()
    ll.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-4)
    adapted = {path for path, _ in ll.model.adapted_layers(model)}
    assert adapted == {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                       if hasattr(m, "lora_A") and not hasattr(m, "base_model")}  # the very modules PEFT adapted


def test_saved_config_has_peft_fields(tmp_path):
    model = llama()
    ll.add_adapter(model, ll.AdapterSpec(method="dora", r=4, alpha=8, targets=["q_proj"], rslora=True))
    ll.save_adapter(model, tmp_path)
    cfg = ll.read_config(tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] and cfg["use_rslora"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["q_proj"]
    assert cfg["task_type"] == "CAUSAL_LM" and "loralab" not in cfg


def test_merged_export_equals_peft_merge(tmp_path):
    model = llama()
    ll.add_adapter(model, ll.AdapterSpec(r=4, alpha=8, targets="all-linear"))
    randomise_trainables(model, 3)
    ll.save_adapter(model, tmp_path)
    ours = ll.merge_and_unload(copy.deepcopy(model))
    theirs = PeftModel.from_pretrained(llama(), tmp_path).merge_and_unload()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-4)


# Every method saved in a PEFT format, with settings its format holds
PEFT_FORMAT_SPECS = {"lora": {}, "dora": {}, "boft": dict(r=2), "oft": dict(r=2), "loha": {}, "lokr": {},
                     "ia3": dict(options={"scale_bias": True}), "adalora": {}, "vb-lora": {}, "shira": {},
                     "fourierft": dict(options={"n_frequency": 8}), "vera": {}, "randlora": {},
                     "bone": dict(r=2, options={"share": "rows"}), "uni-lora": dict(options={"start": "uniform"}),
                     "miss": {}, "kasa": dict(r=2)}


@pytest.mark.parametrize("method", sorted(PEFT_FORMAT_SPECS))
def test_config_holds_only_fields_peft_knows(tmp_path, method):
    """PEFT reads each method's config without warning of fields its config class lacks: those every LoRA
    config has but the method's does not are left out when unused (SHiRA keeps its own "loralab" field)."""
    from method_harness import Stack
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    net = Stack()
    spec = {"r": 4, **PEFT_FORMAT_SPECS[method], "targets": ["a", "b", "c"]}
    ll.add_adapter(net, ll.AdapterSpec(method=method, **spec))
    ll.save_adapter(net, tmp_path)
    config = ll.read_config(tmp_path)
    known = {f.name for f in dataclasses.fields(PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]])}
    unknown = sorted(set(config) - known)
    assert unknown == (["loralab"] if method == "shira" else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftConfig.from_pretrained(tmp_path)
    assert sum("Unexpected keyword arguments" in str(w.message) for w in caught) == (1 if unknown else 0)


def test_loralab_layout_records_the_options_defaults_it_was_made_with(tmp_path, monkeypatch):
    """A later change of a method's default does not change what an older file means."""
    from method_harness import Stack

    from loralab.methods.bone import Bone

    net = Stack()
    ll.add_adapter(net, ll.AdapterSpec(method="bone", r=4, targets=["b"]))  # default share="columns": LORALAB
    with torch.no_grad():
        net.b.adapters["default"].bone_B.normal_()
    ll.save_adapter(net, tmp_path)
    assert ll.read_config(tmp_path)["loralab"]["options"] == {"share": "columns"}
    monkeypatch.setattr(Bone, "option_defaults", {"share": "rows"})
    x = torch.randn(2, 16)
    torch.testing.assert_close(ll.load_adapter(Stack(), tmp_path)(x), net(x))
