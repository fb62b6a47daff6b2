"""Embedded models load offline; SmolLM2's cached folder matches the GGUF it came from."""

import importlib.util
from pathlib import Path

import pytest
import torch

import loralab as ll
from loralab.zoo import models


def test_unknown_name_lists_embedded_models():
    with pytest.raises(ValueError, match="smollm2-135m"):
        ll.load_base("smollm-135")


def test_folder_without_config_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ll.load_base(str(tmp_path))


def test_classification_needs_num_labels():
    with pytest.raises(ValueError, match="num_labels"):
        ll.load_base("minilm-l6", task="classification")


def test_minilm_classifier_logits_shape():
    model, tok = ll.load_base("minilm-l6", task="classification", num_labels=3)
    enc = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**enc).logits.shape == (2, 3)
    assert model.config.loralab_base == "minilm-l6"


@pytest.mark.slow
def test_smollm2_cache_equals_gguf_load():
    from transformers import AutoModelForCausalLM

    model, tok = ll.load_base("smollm2-135m")
    entry = models.EMBEDDED["smollm2-135m"]
    src = Path(next(iter(importlib.util.find_spec(entry.package).submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(src, gguf_file=entry.gguf_file, local_files_only=True)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
