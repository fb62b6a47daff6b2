"""loralab: low-rank adapters for any PyTorch model.

    import loralab as ll
    spec = ll.AdapterSpec(method="lora", r=8, alpha=16, targets="all-linear")
    ll.add_adapter(model, spec, name="default")
    ll.save_adapter(model, "out/")          # HF PEFT's adapter_config.json + adapter_model.safetensors
"""

from loralab.checkpoint import load_adapter, read_config, read_tensors, save_adapter
from loralab.inits import list_inits
from loralab.methods import get_method, list_methods
from loralab.model import (
    active_adapters,
    adapter_names,
    add_adapter,
    disabled,
    get_spec,
    merge,
    merge_and_unload,
    remove_adapter,
    row_adapters,
    set_active,
    trainable_parameters,
    unmerge,
)
from loralab.spec import AdapterSpec

__version__ = "0.1.0"


def load_base(name_or_path: str, **kwargs):
    """An embedded default model ("smollm2-135m", "minilm-l6") or a local HF folder, offline."""
    from loralab.zoo.models import load_base as _load_base

    return _load_base(name_or_path, **kwargs)


__all__ = [
    "AdapterSpec",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "disabled",
    "get_method",
    "get_spec",
    "list_inits",
    "list_methods",
    "load_adapter",
    "load_base",
    "merge",
    "merge_and_unload",
    "read_config",
    "read_tensors",
    "remove_adapter",
    "row_adapters",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]
