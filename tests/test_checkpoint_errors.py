"""Bad adapter files get clear errors, and saving never leaves a half-written file."""

import stat

import pytest
import torch
from torch import nn

import loralab as ll
import loralab.checkpoint as ckpt


def net(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))


def saved(tmp_path, width=8):
    m = net(width)
    ll.add_adapter(m, ll.AdapterSpec(r=2, targets=["0"]))
    return m, ll.save_adapter(m, tmp_path / "a")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    _, path = saved(tmp_path, width=8)
    other = net(width=6)
    with pytest.raises(ValueError, match=r"0\.lora_A\.weight has shape \[2, 8\].*needs \[2, 6\]"):
        ll.load_adapter(other, path)
    assert ll.adapter_names(other) == []  # nothing half-loaded
    assert not any("lora" in n for n, _ in other.named_parameters())


def test_truncated_file_gets_clear_error(tmp_path):
    _, path = saved(tmp_path)
    file = path / ckpt.WEIGHTS_FILE
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ll.load_adapter(net(), path)


def test_garbage_file_gets_clear_error(tmp_path):
    _, path = saved(tmp_path)
    (path / ckpt.WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ll.load_adapter(net(), path)


def test_missing_folder_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ll.load_adapter(net(), tmp_path / "nowhere")
    _, path = saved(tmp_path)
    (path / ckpt.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ll.load_adapter(net(), path)


def test_unsupported_peft_type(tmp_path):
    _, path = saved(tmp_path)
    cfg = ll.read_config(path)
    cfg["peft_type"] = "PROMPT_TUNING"
    import json

    (path / ckpt.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        ll.load_adapter(net(), path)


def test_failed_save_keeps_previous_files_intact(tmp_path, monkeypatch):
    m, path = saved(tmp_path)
    before = (path / ckpt.WEIGHTS_FILE).read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", broken)
    with torch.no_grad():
        m[0].adapters["default"].lora_B.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ll.save_adapter(m, path)
    assert (path / ckpt.WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == [ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE]


def test_saved_files_get_the_mode_open_would_give_not_mkstemps_0600(tmp_path):
    _, path = saved(tmp_path)
    for name in (ckpt.CONFIG_FILE, ckpt.WEIGHTS_FILE):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o666 & ~ckpt._UMASK
    assert ckpt._UMASK & 0o044 == 0  # else the check above cannot tell 0600 from the right mode here


def test_non_peft_method_config_carries_loralab_section(tmp_path, monkeypatch):
    from loralab.methods.base import METHODS
    from loralab.methods.lora import LoRA

    class Renamed(LoRA):
        name = "lora-copy-for-test"
        peft_type = None

    monkeypatch.setitem(METHODS._items, "lora-copy-for-test", Renamed)
    m = net()
    ll.add_adapter(m, ll.AdapterSpec(method="lora-copy-for-test", r=2, targets=["0"]))
    ll.save_adapter(m, tmp_path / "x")
    cfg = ll.read_config(tmp_path / "x")
    assert cfg["peft_type"] == "LORALAB" and cfg["loralab"]["method"] == "lora-copy-for-test"
    fresh = net()
    ll.load_adapter(fresh, tmp_path / "x")
    assert ll.get_spec(fresh, "default").method == "lora-copy-for-test"
