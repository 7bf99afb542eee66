"""How transformers loads surgeon's own formats: the Auto-class registration of their model types.

Two outputs are not plain transformers layouts: the packed ShiftAdd form (``X.qweight`` bit-planes + scales,
``quantization_config.quant_method = "shiftadd"``) and the compact recursive form of ``surgeon tie`` (a shared
block + per-layer LoRA, ``config["recursion"]``). A plain transformers model class would load either *without
error and with random weights* (the unknown tensors only land in the "unexpected keys" table, and transformers
skips a ``quant_method`` it does not know). So their ``config.json`` names a surgeon model type:

- ``model_type: "surgeon_shiftadd"`` / ``"surgeon_recursive"``, the architecture's own type kept under
  ``surgeon_base_model_type``. Inside surgeon (checkpoint reading, ops, the writer) the config has the base type
  back: :func:`from_disk` / :func:`to_disk` are the only two places that know the difference.
- transformers without surgeon refuses them (``AutoConfig``: "has model type `surgeon_shiftadd` but
  Transformers does not recognize this architecture"), never loads random weights.
- after ``import surgeon`` the two model types are registered with transformers' Auto classes (its extension
  point for model types it does not ship): ``AutoModelForCausalLM.from_pretrained(folder)`` returns the model
  from :func:`surgeon.formats.shiftadd.load_shiftadd` /
  :func:`surgeon.formats.recursive.load_recursive`. The registration
  runs when transformers' auto modules are imported (an import hook), so ``import surgeon`` stays free of
  torch and transformers.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any

from surgeon.formats.model_types import RECURSIVE_MODEL_TYPE, SHIFTADD_MODEL_TYPE, SURGEON_MODEL_TYPES

HOW_TO_LOAD = {
    SHIFTADD_MODEL_TYPE: "a ShiftAdd-packed checkpoint: `import surgeon` first (then AutoModelForCausalLM loads "
                         "it), or surgeon.load_shiftadd(path); `surgeon shiftadd --materialize` writes a dense one",
    RECURSIVE_MODEL_TYPE: "a compact recursive checkpoint: `import surgeon` first (then AutoModelForCausalLM "
                          "loads it), or surgeon.load_recursive(path); `surgeon tie --materialize` writes a "
                          "dense one",
}


# ------------------------------------------------------------------------------ transformers registration
@functools.cache
def config_classes() -> dict[str, type]:
    """``{surgeon model type: PretrainedConfig subclass}`` (the config keeps every key of config.json)."""
    from transformers import PretrainedConfig

    def make(model_type: str) -> type:
        return type(f"{model_type.title().replace('_', '')}Config", (PretrainedConfig,),
                    {"model_type": model_type, "__module__": __name__,
                     "__doc__": f"config.json of {HOW_TO_LOAD[model_type]}."})

    return {t: make(t) for t in SURGEON_MODEL_TYPES}


def _load(model_type: str, path: Any, kwargs: dict[str, Any]):
    import os

    path = str(path)
    if not os.path.isdir(path):  # a Hub repo id: resolve to the local snapshot (downloads only if allowed)
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                                 local_files_only=bool(kwargs.get("local_files_only", False)))
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    device_map = kwargs.get("device_map")
    device = device_map if isinstance(device_map, str) and device_map != "auto" else "cpu"
    if model_type == SHIFTADD_MODEL_TYPE:
        import torch

        from surgeon.formats.shiftadd import load_shiftadd

        return load_shiftadd(path, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                             device=device)
    from surgeon.formats.recursive import load_recursive

    return load_recursive(path, dtype=None if dtype in (None, "auto") else dtype, device=device)


@functools.cache
def model_classes() -> dict[str, type]:
    """``{surgeon model type: class}`` whose ``from_pretrained`` is surgeon's loader for that layout."""
    configs = config_classes()

    def make(model_type: str) -> type:
        def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
            return _load(model_type, pretrained_model_name_or_path, kwargs)

        return type(f"{model_type.title().replace('_', '')}ForCausalLM", (), {
            "config_class": configs[model_type], "__module__": __name__,
            "__doc__": f"Loads {HOW_TO_LOAD[model_type]}.", "from_pretrained": classmethod(from_pretrained)})

    return {t: make(t) for t in SURGEON_MODEL_TYPES}


def _register_configs(module: Any) -> None:
    for model_type, cls in config_classes().items():
        module.AutoConfig.register(model_type, cls, exist_ok=True)


def _register_models(module: Any) -> None:
    configs, models = config_classes(), model_classes()
    for model_type, cls in models.items():
        module.AutoModelForCausalLM.register(configs[model_type], cls, exist_ok=True)


_HOOKS = {"transformers.models.auto.configuration_auto": _register_configs,
          "transformers.models.auto.modeling_auto": _register_models}


class _AfterExec(importlib.abc.Loader):
    """Runs the real loader, then the registration for that module."""

    def __init__(self, loader: Any, then: Any):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.then(module)


class _TransformersHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        then = _HOOKS.get(fullname)
        if then is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterExec(spec.loader, then)
        return spec


def install_transformers_hook() -> None:
    """Register surgeon's model types with transformers now if its auto modules are loaded, else on import."""
    for name, then in _HOOKS.items():
        if name in sys.modules:
            then(sys.modules[name])
    if not any(isinstance(f, _TransformersHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersHook())
