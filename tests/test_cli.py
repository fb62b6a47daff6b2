"""The `loralab` command, run in-process: train → inspect → eval → merge, help, and bad input."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import loralab as ll
from loralab.cli import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert len(capsys.readouterr().out) > 100
    parser = argparse.ArgumentParser()
    COMMANDS[command][1](parser)
    bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not bare, f"options of `loralab {command}` without help: {bare}"


def test_help_shows_defaults_that_say_something(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (default: 0.0005)" in out and "(default: 0)" in out  # a zero default is one
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "adapter/ (default" not in out  # --out is required


def test_methods_lists_papers(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "arXiv:2106.09685" in out and "arXiv:2402.09353" in out
    assert "PEFT reads it as BOFT" in out and "PEFT reads it as UNILORA with start='uniform'" in out
    assert main(["methods", "--json"]) == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    assert {"lora", "dora"} <= set(rows)
    assert rows["dora"]["peft_type"] == "LORA" and rows["loldu"]["peft_type"] is None
    assert (rows["bone"]["peft_type"], rows["bone"]["peft_when"]) == ("MISS", "share='rows'")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "64", "--max-test", "48",
                 "--steps", "4", "--batch-size", "8", "--r", "4", "--targets", "query,value", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    return out


def test_train_writes_peft_adapter(trained, capsys):
    cfg = ll.read_config(trained / "adapter")
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["query", "value"]
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert (trained / "log.jsonl").is_file() and (trained / "checkpoint-4" / "adapter").is_dir()


def test_inspect_counts_parameters(trained, capsys):
    assert main(["inspect", str(trained / "adapter"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    lora = 6 * 2 * 4 * (384 + 384)  # 6 layers × (query, value) × r·(in + out)
    head = 2 * 384 + 2
    assert summary["params"] == lora + head


def test_eval_reproduces_training_metric(trained, capsys):
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    final = [r for r in log if "eval_accuracy" in r][-1]["eval_accuracy"]
    assert main(["eval", "--base", "minilm-l6", "--adapter", str(trained / "adapter"), "--task", "sst2",
                 "--max-test", "48"]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {final:.4f}" in out


def test_merge_exports_a_model_transformers_loads(trained, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--base", "minilm-l6", "--adapter", str(trained / "adapter"), "--out", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    model, tok = ll.load_base("minilm-l6", task="classification", num_labels=2)
    ll.load_adapter(model, trained / "adapter")
    model.eval()
    enc = tok(["a gripping film", "tedious"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, atol=1e-5, rtol=1e-4)
    assert main(["merge", "--base", "minilm-l6", "--adapter", str(trained / "adapter"), "--out", str(out)]) == 2


def test_missing_field_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\ngood,1\n")
    code = main(["train", "--train-file", str(data), "--steps", "1", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "lacks field 'text'; it has: sentence, label" in capsys.readouterr().err


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--task", "sst2", "--method", "lorra", "--steps", "1", "--out", str(tmp_path)])
    assert code == 2 and "did you mean: lora" in capsys.readouterr().err


def _offline_greedy(model, tok, prompt: str, tokens: int) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_generate_matches_offline_greedy(capsys):
    assert main(["generate", "--base", "smollm2-135m", "--prompt", "What is 3+4?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == _offline_greedy(*ll.load_base("smollm2-135m"), "What is 3+4?", 8)


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    """A LoRA adapter on SmolLM2 that changes what it generates, and its tokens decoded unmerged."""
    model, tok = ll.load_base("smollm2-135m")
    base_tokens = _offline_greedy(model, tok, "Name a colour.", 12)
    ll.add_adapter(model, ll.AdapterSpec(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    tokens = _offline_greedy(model, tok, "Name a colour.", 12)
    assert tokens != base_tokens, "the test adapter must change the output"
    out = tmp_path_factory.mktemp("smollm2") / "adapter"
    ll.save_adapter(model, out)
    return out, tokens


@pytest.mark.slow
@pytest.mark.parametrize("unmerged", [False, True])
def test_generate_with_an_adapter_matches_offline_greedy(smollm2_adapter, unmerged, capsys):
    """Merged into the weights (the default) or not, the command decodes what the adapted model does."""
    path, expected = smollm2_adapter
    argv = ["generate", "--adapter", str(path), "--prompt", "Name a colour.", "--max-new-tokens", "12"]
    assert main(argv + (["--unmerged"] if unmerged else [])) == 0
    assert capsys.readouterr().out.strip() == expected


def test_merge_for_inference_keeps_routed_and_16_bit_adapters_unmerged():
    from torch import nn

    from loralab.loading import merge_for_inference

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for spec, dtype in [(ll.AdapterSpec(r=2, targets=["0"]), torch.bfloat16),
                        (ll.AdapterSpec(method="loramoe", r=2, targets=["0"]), torch.float32),
                        (ll.AdapterSpec(r=2, targets=["0"]), torch.float32)]:
        model = nn.Sequential(nn.Linear(8, 8)).to(dtype)
        ll.add_adapter(model, spec)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "experts_B" in name:
                    p.normal_()
        before = model(x.to(dtype))
        merged = merge_for_inference(model, "default")
        assert merged == (dtype == torch.float32 and spec.method == "lora")
        assert model[0].merged == (["default"] if merged else [])
        torch.testing.assert_close(model(x.to(dtype)), before, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_chat_training_on_smollm2_and_peft_reads_it(tmp_path):
    from peft import PeftModel

    out = tmp_path / "gsm"
    assert main(["train", "--base", "smollm2-135m", "--task", "gsm8k", "--max-train", "8", "--max-test", "4",
                 "--steps", "2", "--batch-size", "4", "--r", "4", "--targets", "q_proj,v_proj", "--lr", "1e-2",
                 "--max-length", "192", "--out", str(out), "--no-progress"]) == 0
    assert ll.read_config(out / "adapter")["task_type"] == "CAUSAL_LM"
    ours, tok = ll.load_base("smollm2-135m")
    ll.load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(ll.load_base("smollm2-135m")[0], str(out / "adapter")).eval()
    ids = tok("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids
    with torch.no_grad():
        ours.eval()
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
        base_logits = ll.load_base("smollm2-135m")[0](ids).logits
    assert not torch.allclose(ours(ids).logits, base_logits, atol=1e-3)


def test_train_with_gradient_checkpointing(tmp_path, monkeypatch):
    import loralab.train.trainer as trainer_module

    enabled = []
    real = trainer_module.enable_gradient_checkpointing
    monkeypatch.setattr(trainer_module, "enable_gradient_checkpointing", lambda m: (enabled.append(m), real(m)))
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16",
                 "--steps", "2", "--batch-size", "8", "--r", "2", "--targets", "query", "--out", str(tmp_path),
                 "--no-progress", "--gradient-checkpointing"])
    assert code == 0 and len(enabled) == 1 and enabled[0].is_gradient_checkpointing


def test_train_on_chosen_blocks_only(tmp_path):
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16",
                 "--steps", "1", "--batch-size", "8", "--r", "2", "--targets", "query", "--layers", "0,4-5",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    saved = ll.read_config(tmp_path / "adapter")["target_modules"]
    assert saved == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 4, 5)]


def test_train_with_per_layer_ranks(tmp_path):
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16",
                 "--steps", "1", "--batch-size", "8", "--r", "2", "--targets", "query,value",
                 "--rank-pattern", "value=4", "--alpha-pattern", "layer.0.attention.self.query=8",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    tensors = ll.read_tensors(tmp_path / "adapter")
    ranks = {k.split(".")[3] + k.split(".")[6]: t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {f"{i}{m}": 4 if m == "value" else 2 for i in range(6) for m in ("query", "value")}
    alphas = ll.read_config(tmp_path / "adapter")["alpha_pattern"]
    assert alphas["bert.encoder.layer.0.attention.self.query"] == 8.0


def test_train_with_trainable_token_rows(tmp_path, capsys):
    """Rows of tokens in the data move; rows of tokens no example holds stay the base's (Adam moves no
    parameter without gradient), and the file is PEFT's TrainableTokens layout."""
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16",
                 "--steps", "2", "--batch-size", "8", "--r", "2", "--targets", "query", "--trainable-tokens",
                 "101,102,30520-30521", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert ll.read_config(tmp_path / "adapter")["trainable_token_indices"] == [101, 102, 30520, 30521]
    rows = ll.read_tensors(tmp_path / "adapter")["bert.embeddings.word_embeddings.token_adapter.trainable_tokens_delta"]
    base, _ = ll.load_base("minilm-l6", task="classification", num_labels=2)
    original = base.get_input_embeddings().weight.detach()[[101, 102, 30520, 30521]]
    moved = (rows - original).abs().amax(dim=1)
    assert (moved[:2] > 0).all() and (moved[2:] == 0).all()  # [CLS] and [SEP] are in every example
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "tokens    trained rows of [101, 102, 30520, 30521]" in out and "bert.embeddings.word_embeddings " in out


def test_trainable_tokens_by_their_text(capsys):
    from transformers import AutoTokenizer

    from loralab.cli import _token_ids
    from loralab.zoo.models import resolve

    vocab = AutoTokenizer.from_pretrained(resolve("smollm2-135m"), local_files_only=True).get_vocab()
    assert _token_ids("<|im_start|>,7,10-11", "smollm2-135m") == [vocab["<|im_start|>"], 7, 10, 11]
    wrong = r"'<\|im_strt\|>' is not a token of smollm2-135m's tokenizer; close: <\|im_start"
    with pytest.raises(ValueError, match=wrong):
        _token_ids("<|im_strt|>", "smollm2-135m")
    assert main(["train", "--out", "x", "--trainable-tokens", ","]) == 2
    assert "give token ids" in capsys.readouterr().err
    assert main(["train", "--out", "x", "--trainable-tokens", "9-3"]) == 2
    assert "'9-3' is not a number or a range like 20-29" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["5-3", "a", "1,,x", ","])
def test_bad_block_indices_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--layers", text])
    assert "--layers" in capsys.readouterr().err


def test_train_over_bfloat16_weights_keeps_a_float32_adapter(tmp_path, capsys):
    from safetensors.torch import load_file

    argv = ["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16", "--steps",
            "2", "--batch-size", "8", "--r", "2", "--targets", "query", "--no-progress", "--dtype", "bfloat16"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2  # without autocast: refused, by name
    assert "precision='bf16'" in capsys.readouterr().err
    assert main(argv + ["--out", str(tmp_path / "b"), "--precision", "bf16"]) == 0
    saved = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # LoRA factors and the trained head


def test_train_lora_on_parameters_alone(tmp_path, capsys):
    """--targets none --target-parameters: LoRA on the named weights themselves (PEFT's target_parameters)."""
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16",
                 "--steps", "2", "--batch-size", "8", "--r", "2", "--targets", "none", "--target-parameters",
                 "attention.self.query.weight", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    config = ll.read_config(tmp_path / "adapter")
    assert config["target_parameters"] == ["attention.self.query.weight"] and config["target_modules"] == []
    tensors = ll.read_tensors(tmp_path / "adapter")
    b = {k for k, t in tensors.items() if k.endswith("lora_B.weight") and t.abs().max() > 0}
    assert b == {f"bert.encoder.layer.{i}.attention.self.query.lora_B.weight" for i in range(6)}  # trained
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "parameters ['attention.self.query.weight']" in capsys.readouterr().out


def test_train_on_replicated_blocks(tmp_path, capsys):
    """--layer-replication: MiniLM's 6 blocks rebuilt as 0…5, 4, 5, each copy with its own adapter (PEFT's
    layer_replication), saved with the field and the copies' keys."""
    code = main(["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16",
                 "--steps", "2", "--batch-size", "8", "--r", "2", "--targets", "query", "--layer-replication",
                 "0:6,4:6", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    config = ll.read_config(tmp_path / "adapter")
    assert config["layer_replication"] == [[0, 6], [4, 6]]
    keys = {k for k in ll.read_tensors(tmp_path / "adapter") if k.endswith("lora_A.weight")}
    assert keys == {f"bert.encoder.layer.{i}.attention.self.query.lora_A.weight" for i in range(8)}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "replicated from ranges [[0, 6], [4, 6]]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--base", "minilm-l6", "--task", "sst2", "--layer-replication", "4:2", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "'4:2' is not a block range" in capsys.readouterr().err


def test_train_an_activated_lora(tmp_path, capsys):
    """--alora-invocation TEXT: the text's tokens in the base's tokenizer become the adapter's invocation
    (PEFT's alora_invocation_tokens); text without tokens exits 2 with the reason."""
    from transformers import AutoTokenizer

    from loralab.zoo.models import resolve

    argv = ["train", "--base", "minilm-l6", "--task", "sst2", "--max-train", "16", "--max-test", "16", "--steps", "2",
            "--batch-size", "8", "--r", "2", "--targets", "query", "--no-progress"]
    assert main([*argv, "--alora-invocation", "the film", "--out", str(tmp_path)]) == 0
    want = AutoTokenizer.from_pretrained(resolve("minilm-l6"))("the film", add_special_tokens=False).input_ids
    assert ll.read_config(tmp_path / "adapter")["alora_invocation_tokens"] == want and len(want) == 2
    capsys.readouterr()
    assert main([*argv, "--alora-invocation", " ", "--out", str(tmp_path / "b")]) == 2
    assert "has no tokens" in capsys.readouterr().err
