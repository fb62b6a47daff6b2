"""FourierFT (arXiv 2405.03003): ΔW = α·Re(IDFT2(F)) with n trained coefficients at fixed frequencies."""

import cmath
import json

import pytest
import torch
from method_harness import (
    Net,
    check_forward,
    check_merge_roundtrip,
    check_param_count,
    check_save_load,
    check_training_lowers_loss,
)
from safetensors.torch import save_file

import loralab as ll
from loralab.model import get_spec, methods_of

SPEC = dict(method="fourierft", r=1, targets=["layer"], options={"n_frequency": 20, "scaling": 10.0})


def reference(m, w):
    """The inverse DFT written as a sum of the n sinusoids, not with torch.fft."""
    out, inp = w.shape
    rows = torch.arange(out)[:, None].double()
    cols = torch.arange(inp)[None, :].double()
    total = torch.zeros(out, inp, dtype=torch.double)
    for (u, v), c in zip(m.freq_index.T.tolist(), m.fourierft_spectrum.tolist()):
        phase = 2 * cmath.pi * (u * rows / out + v * cols / inp)
        total += c * torch.cos(phase)
    return (10.0 * total / (out * inp)).float()


def test_fourierft(tmp_path):
    spec = ll.AdapterSpec(**SPEC)
    check_forward(spec, reference)
    check_merge_roundtrip(spec)
    check_param_count(spec, lambda i, o: 20)
    check_save_load(spec, tmp_path)
    check_training_lowers_loss(spec, lr=1.0)


# ---- PEFT's FourierFT format, both ways --------------------------------------------------------
# PEFT's FourierFT takes nn.Linear and GPT-2's Conv1D (Net's "linear": 12 → 10, "hf-conv1d": Conv1D(10, 12)).
SETTINGS = [("linear", {"n_frequency": 20, "scaling": 10.0, "seed": 3}),
            ("linear", {"n_frequency": 120, "scaling": 150.0, "seed": 0}),  # every frequency of the 10×12 layer
            ("hf-conv1d", {"n_frequency": 30, "scaling": 7.0, "seed": 777})]


def randomized(kind: str, options: dict, bias: str = "none") -> Net:
    net = Net(kind)
    ll.add_adapter(net, ll.AdapterSpec(method="fourierft", targets=["layer"], options=options, bias=bias))
    (_, method), = methods_of(net, "default")
    with torch.no_grad():
        method.fourierft_spectrum.normal_()
    return net


@pytest.mark.parametrize("kind, options", SETTINGS)
def test_peft_loads_loralab_fourierft(tmp_path, kind, options):
    from peft import PeftModel

    net = randomized(kind, options)
    ll.save_adapter(net, tmp_path)
    theirs = PeftModel.from_pretrained(Net(kind), tmp_path).eval()
    x = Net(kind).sample()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, options", SETTINGS)
def test_loralab_loads_peft_fourierft(tmp_path, kind, options):
    from peft import FourierFTConfig, get_peft_model

    config = FourierFTConfig(target_modules=["layer"], n_frequency=options["n_frequency"], scaling=options["scaling"],
                             random_loc_seed=options["seed"], fan_in_fan_out=kind == "hf-conv1d", init_weights=False)
    theirs = get_peft_model(Net(kind), config).eval()  # init_weights=False: a standard normal spectrum
    theirs.save_pretrained(tmp_path)
    net = ll.load_adapter(Net(kind), tmp_path)
    x = Net(kind).sample()
    torch.testing.assert_close(net(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_fourierft_bias_is_peft_fourier_only_both_ways(tmp_path):
    from peft import PeftModel

    net = randomized("linear", {"n_frequency": 20}, bias="lora_only")
    with torch.no_grad():
        net.layer.kind.bias.normal_()
    ll.save_adapter(net, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "fourier_only"
    theirs = PeftModel.from_pretrained(Net("linear"), tmp_path).eval()
    x = Net("linear").sample()
    torch.testing.assert_close(theirs(x), net(x), atol=1e-5, rtol=1e-5)
    assert get_spec(ll.load_adapter(Net("linear"), tmp_path), "default").bias == "lora_only"


def test_peft_fourierft_with_another_n_for_some_layer_is_refused(tmp_path):
    from peft import FourierFTConfig, get_peft_model

    config = FourierFTConfig(target_modules=["layer"], n_frequency=20, n_frequency_pattern={"layer": 30})
    get_peft_model(Net("linear"), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="n_frequency_pattern"):
        ll.load_adapter(Net("linear"), tmp_path)


def write_old_layout(folder, net: Net, options: dict, index: torch.Tensor) -> None:
    """The files loralab wrote for a FourierFT before it wrote PEFT's format."""
    (_, method), = methods_of(net, "default")
    save_file({"base_model.model.layer.fourier_c": method.fourierft_spectrum.detach().clone(),
               "base_model.model.layer.freq_index": index}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORALAB", "r": 1, "lora_alpha": 1.0, "lora_dropout": 0.0, "target_modules": ["layer"],
              "bias": "none", "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "loralab": {"format_version": 1, "method": "fourierft", "options": options, "init": "gaussian"}}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_loralab_reads_its_old_fourierft_layout(tmp_path):
    options = {"n_frequency": 20, "scaling": 10.0, "seed": 3}
    net = randomized("linear", options)
    (_, method), = methods_of(net, "default")
    write_old_layout(tmp_path, net, options, method.freq_index.clone())
    x = Net("linear").sample()
    torch.testing.assert_close(ll.load_adapter(Net("linear"), tmp_path)(x), net(x))


def test_old_fourierft_layout_with_other_frequencies_is_refused(tmp_path):
    options = {"n_frequency": 20, "seed": 3}
    net = randomized("linear", options)
    (_, method), = methods_of(net, "default")
    write_old_layout(tmp_path, net, options, method.freq_index.flip(1))
    with pytest.raises(ValueError, match="freq_index is missing or is not the frequencies that seed 3 gives"):
        ll.load_adapter(Net("linear"), tmp_path)
