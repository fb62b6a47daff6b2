"""Whole embedding weights beside an adapter for a resized vocabulary (loralab.embedding_layers, PEFT's
save_embedding_layers): files PEFT writes load with PEFT's logits, files loralab writes load in PEFT with
the same logits, and "auto" writes them exactly when the vocabulary differs from the base's."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import loralab as ll

VOCAB, NEW = 64, 66
IDS = torch.tensor([[1, 64, 5, 65, 7]])  # the two new tokens among old ones
CASES = {"lora": dict(target_modules=["q_proj"]),
         "lora on the embedding": dict(target_modules=["q_proj", "embed_tokens"]),
         "token rows": dict(target_modules=["q_proj"], trainable_token_indices=[64, 65])}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def resized_base(folder, seed: int, rows: int = NEW) -> LlamaForCausalLM:
    """The base with its new rows drawn from `seed`: two such bases differ in exactly those rows."""
    model = LlamaForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    if rows != VOCAB:
        model.resize_token_embeddings(rows, mean_resizing=False)
    return model.eval()


def peft_adapter(folder, out, case: str) -> torch.Tensor:
    """PEFT's adapter of `case` on the resized base, saved to `out`; its logits."""
    model = get_peft_model(resized_base(folder, seed=1), LoraConfig(r=2, **CASES[case]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_()
    model.eval().save_pretrained(out)
    return model(IDS).logits


def embedding_keys(folder) -> set[str]:
    return {k for k in load_file(folder / "adapter_model.safetensors") if "weight" in k and "lora" not in k
            and "q_proj" not in k}


@pytest.mark.parametrize("case", CASES)
def test_peft_files_with_whole_embeddings_load_with_peft_logits(base_folder, tmp_path, case):
    want = peft_adapter(base_folder, tmp_path, case)
    assert embedding_keys(tmp_path)  # PEFT saw the resize and saved the embeddings
    ours = ll.load_adapter(resized_base(base_folder, seed=2), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, want)


@pytest.mark.parametrize("case", CASES)
def test_peft_reads_the_embeddings_loralab_saves_for_a_resized_vocabulary(base_folder, tmp_path, case):
    want = peft_adapter(base_folder, tmp_path / "peft", case)
    ours = ll.load_adapter(resized_base(base_folder, seed=2), tmp_path / "peft")
    ll.save_adapter(ours, tmp_path / "ours")
    assert embedding_keys(tmp_path / "ours") >= embedding_keys(tmp_path / "peft")
    theirs = PeftModel.from_pretrained(resized_base(base_folder, seed=3), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, want)


def test_auto_writes_them_only_for_a_resized_vocabulary(base_folder, tmp_path):
    plain = ll.add_adapter(resized_base(base_folder, seed=1, rows=VOCAB), ll.AdapterSpec(r=2, targets=["q_proj"]))
    ll.save_adapter(plain, tmp_path / "same")
    assert embedding_keys(tmp_path / "same") == set()
    ll.save_adapter(plain, tmp_path / "forced", embeddings=True)
    assert embedding_keys(tmp_path / "forced") == {"base_model.model.model.embed_tokens.weight",
                                                   "base_model.model.lm_head.weight"}
    grown = ll.add_adapter(resized_base(base_folder, seed=1), ll.AdapterSpec(r=2, targets=["q_proj"]))
    ll.save_adapter(grown, tmp_path / "grown")
    assert embedding_keys(tmp_path / "grown") == embedding_keys(tmp_path / "forced")
    ll.save_adapter(grown, tmp_path / "left out", embeddings=False)
    assert embedding_keys(tmp_path / "left out") == set()
    with pytest.raises(ValueError, match="embeddings must be True, False or 'auto'"):
        ll.save_adapter(grown, tmp_path / "x", embeddings="yes")


def test_a_base_not_resized_gets_the_resize_to_run(base_folder, tmp_path):
    peft_adapter(base_folder, tmp_path, "lora")
    with pytest.raises(ValueError, match=r"embed_tokens\.weight has shape \(66, 16\).*resize_token_embeddings\(66\)"):
        ll.load_adapter(resized_base(base_folder, seed=2, rows=VOCAB), tmp_path)


def test_a_load_that_fails_leaves_the_base_embeddings_as_they_were(base_folder, tmp_path):
    peft_adapter(base_folder, tmp_path, "lora")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.no_such_module.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = resized_base(base_folder, seed=2)
    before = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match="no place for"):
        ll.load_adapter(model, tmp_path)
    torch.testing.assert_close(model.get_input_embeddings().weight, before)
