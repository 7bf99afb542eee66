"""Run mergekit YAML configs as they are: translate mergekit's schema into a surgeon recipe.

A mergekit config is recognised by its ``merge_method`` key. The translation is a plain dict (a recipe) that
``surgeon run --dry-run`` prints; keys or values we do not support fail with one line naming them.

Parameter resolution follows mergekit 0.1.5 (``mergekit/config.py``, ``parameter_resolver.py``): a setting is a
scalar, a list (a gradient over the layers of the slice), or a list of ``{filter, value}`` whose first entry with
a filter that is a substring of the tensor name wins (no filter or ``*``: everything); a per-model setting wins over
the slice's, which wins over the global ``parameters``. In our recipes that is a number, a list, or an ordered
``{substring: value, default: value}`` mapping, with per-model values under ``per_model``.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any

from surgeon.errors import SurgeonError

TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "chat_template", "name", "tokenizer", "modules"}
UNSUPPORTED_TOP = {"tokenizer": "use tokenizer_source (base, union or a model)", "modules": "multi-module models"}

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
               "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# mergekit method -> (surgeon op, {mergekit param: (surgeon field, scope)}, fixed surgeon params);
# scope: "model" (per model: weights/per_model), "shared" (one value, may vary per layer/filter), "flag"
_W = ("weight", "model")
METHODS: dict[str, tuple[str, dict[str, tuple[str, str]], dict[str, Any]]] = {
    "linear": ("merge.linear", {"weight": _W, "normalize": ("normalize", "flag")}, {}),
    "task_arithmetic": ("merge.task-arithmetic", {"weight": _W, "lambda": ("scale", "shared"),
                                                  "normalize": ("normalize", "flag")}, {}),
    "ties": ("merge.ties", {"weight": _W, "density": ("density", "model"), "lambda": ("scale", "shared"),
                            "normalize": ("normalize", "flag")}, {}),
    "dare_ties": ("merge.dare", {"weight": _W, "density": ("density", "model"), "lambda": ("scale", "shared"),
                                 "normalize": ("normalize", "flag"), "rescale": ("rescale", "flag")},
                  {"consensus": "ties", "rescale_norm": "l1"}),
    "dare_linear": ("merge.dare", {"weight": _W, "density": ("density", "model"), "lambda": ("scale", "shared"),
                                   "normalize": ("normalize", "flag"), "rescale": ("rescale", "flag")},
                    {"consensus": "none", "rescale_norm": "l1"}),
    "breadcrumbs": ("merge.breadcrumbs", {"weight": _W, "density": ("density", "model"), "gamma": ("gamma", "model"),
                                          "lambda": ("scale", "shared"), "normalize": ("normalize", "flag")}, {}),
    "breadcrumbs_ties": ("merge.breadcrumbs-ties", {"weight": _W, "density": ("density", "model"),
                                                    "gamma": ("gamma", "model"), "lambda": ("scale", "shared"),
                                                    "normalize": ("normalize", "flag")}, {}),
    "della": ("merge.della", {"weight": _W, "density": ("density", "model"), "epsilon": ("epsilon", "model"),
                              "lambda": ("scale", "shared"), "normalize": ("normalize", "flag"),
                              "rescale": ("rescale", "flag")}, {"rescale": "l1"}),
    "della_linear": ("merge.della-linear", {"weight": _W, "density": ("density", "model"),
                                            "epsilon": ("epsilon", "model"), "lambda": ("scale", "shared"),
                                            "normalize": ("normalize", "flag"), "rescale": ("rescale", "flag")},
                     {"rescale": "l1"}),
    "slerp": ("merge.slerp", {"t": ("t", "shared")}, {}),
    "nuslerp": ("merge.nuslerp", {"weight": _W, "nuslerp_flatten": ("_flatten", "flag"),
                                  "nuslerp_row_wise": ("_row_wise", "flag")}, {}),
    "multislerp": ("merge.multislerp", {"weight": _W, "normalize_weights": ("normalize_weights", "flag")}, {}),
    "karcher": ("merge.karcher", {"max_iter": ("max_iter", "flag"), "tol": ("tol", "flag")}, {}),
    "model_stock": ("merge.model-stock", {"filter_wise": ("filter_wise", "flag")}, {}),
    "sce": ("merge.sce", {"select_topk": ("select_topk", "flag")}, {}),
    "nearswap": ("merge.nearswap", {"t": ("t", "shared")}, {}),
    "passthrough": ("merge.passthrough", {"scale": ("scale", "shared")}, {}),
}
# parameters mergekit accepts that change nothing numerically here
IGNORED = {"int8_mask"}
# mergekit's defaults where a pattern mapping needs a fallback (a per-model parameter without a default is
# required by mergekit, e.g. weight)
DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0, "t": None, "scale": 1.0, "weight": None}


def is_mergekit_config(raw: Any) -> bool:
    return isinstance(raw, dict) and "merge_method" in raw and "steps" not in raw


def _err(msg: str) -> SurgeonError:
    return SurgeonError(f"mergekit config: {msg}")


# ---------------------------------------------------------------------------------------------------------
# parameter settings


def _is_conditional(x: Any) -> bool:
    return isinstance(x, dict) and "value" in x and set(x) <= {"value", "filter"}


def _scalar(x: Any, where: str) -> Any:
    if isinstance(x, (bool, int, float)):
        return x
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            raise _err(f"{where}: value {x!r} is not a number") from None
    raise _err(f"{where}: unsupported value {x!r}")


def _plain(x: Any, where: str) -> Any:
    """A scalar or a gradient list."""
    if isinstance(x, list):
        if not x:
            raise _err(f"{where}: empty list")
        if any(_is_conditional(e) for e in x):
            raise _err(f"{where}: filters nested inside a filter's value are not supported")
        return [_scalar(e, where) for e in x]
    return _scalar(x, where)


def layered(settings: list[Any], where: str, default: Any) -> Any:
    """mergekit settings in precedence order (None = absent) -> one surgeon LayerValue (or None)."""
    filters: dict[str, Any] = {}
    fallback = None
    for s in settings:
        if s is None:
            continue
        conds = [s] if _is_conditional(s) else s if isinstance(s, list) and s and all(
            _is_conditional(e) for e in s) else None
        if conds is None:
            fallback = _plain(s, where)
            break
        found = False
        for c in conds:
            f = c.get("filter")
            if f in (None, "*"):
                fallback = _plain(c["value"], where)
                found = True
                break
            filters.setdefault(str(f), _plain(c["value"], where))
        if found:
            break
    if fallback is None:
        fallback = default
    if not filters:
        return fallback
    if fallback is None:
        raise _err(f"{where}: no value for tensors that match none of the filters {sorted(filters)}; add an "
                   "entry without a filter")
    return {**filters, "default": fallback}


# ---------------------------------------------------------------------------------------------------------
# models and names


def _model_ref(ref: Any, where: str) -> str:
    if isinstance(ref, dict):  # mergekit accepts {model: {path: ...}, lora: ...} forms
        raise _err(f"{where}: structured model references are not supported; give the path or repo id")
    ref = str(ref)
    if "+" in ref:
        raise _err(f"{where}: {ref!r} applies a LoRA with '+'; pass the adapter folder as its own model with a "
                   "base_model instead")
    return ref


class _Names:
    """Short unique recipe names for model paths (the folder name, made unique)."""

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self.by_path:
            stem = PurePath(path.rstrip("/")).name or "model"
            name, k = stem, 2
            while name in self.by_path.values():
                name, k = f"{stem}_{k}", k + 1
            self.by_path[path] = name
        return self.by_path[path]


# ---------------------------------------------------------------------------------------------------------
# translation


def _check_keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise _err(f"key {where + '.' if where else ''}{k!r} is not supported")


def _method_params(method: str, names: list[str], per_model_settings: dict[str, dict[str, Any]],
                   shared_settings: list[dict[str, Any] | None], where: str) -> dict[str, Any]:
    """Per-model and shared mergekit parameters -> the surgeon op's params."""
    _, spec, fixed = METHODS[method]
    out: dict[str, Any] = dict(fixed)
    known = set(spec) | IGNORED
    for scope_name, scope in [(f"models.{n}.parameters", per_model_settings.get(n)) for n in names] + [
            ("parameters", s) for s in shared_settings]:
        for k in scope or {}:
            if k not in known:
                raise _err(f"{where}{scope_name}: parameter {k!r} is not supported by {method}")
    per_model: dict[str, dict[str, Any]] = {}
    for key, (field, scope) in spec.items():
        if scope == "model":
            vals = {n: layered([(per_model_settings.get(n) or {}).get(key)] + [(s or {}).get(key) for s in
                                                                               shared_settings],
                               f"{where}{n}.{key}", DEFAULTS.get(key)) for n in names}
            if all(v is None for v in vals.values()):
                continue
            if key == "weight" and any(v is None for v in vals.values()):
                missing = next(n for n, v in vals.items() if v is None)
                raise _err(f"{where}model {missing!r} has no weight (mergekit requires one for {method})")
            uniform = len({repr(v) for v in vals.values()}) == 1
            if key == "weight" and all(isinstance(v, (int, float)) for v in vals.values()):
                out["weights"] = [float(vals[n]) for n in names]
            elif uniform and key != "weight":
                out[field] = next(iter(vals.values()))
            else:
                for n, v in vals.items():
                    if v is not None:
                        per_model.setdefault(n, {})[key] = v
        else:
            v = layered([(s or {}).get(key) for s in shared_settings], f"{where}parameters.{key}", None)
            if v is None:
                continue
            if scope == "flag":
                if isinstance(v, (dict, list)):
                    raise _err(f"{where}parameters.{key}: must be one value, not per layer or per filter")
                out[field] = v
            else:
                out[field] = v
    if per_model:
        out["per_model"] = per_model
    if method in ("dare_ties", "dare_linear") and out.get("rescale") is False:
        out.pop("rescale_norm", None)
    if method in ("della", "della_linear") and out.get("rescale") is False:
        out["rescale"] = "none"
    elif method in ("della", "della_linear"):
        out["rescale"] = "l1"
    if method == "nuslerp":
        flatten = out.pop("_flatten", True)
        row_wise = out.pop("_row_wise", False)
        out["axis"] = "flat" if flatten else ("columns" if row_wise else "rows")
    if method in ("nuslerp",) and per_model:
        raise _err(f"{where}{method}: weights must be numbers (gradients are not supported for {method})")
    return out


class _Models:
    """The recipe's ``models`` map built while reading the config: each reference gets a short unique name."""

    def __init__(self) -> None:
        self.names = _Names()
        self.paths: dict[str, str] = {}

    def add(self, ref: Any, where: str) -> str:
        path = _model_ref(ref, where)
        n = self.names(path)
        self.paths[n] = path
        return n


def _models_step(raw: dict[str, Any], method: str, base: str | None, models: _Models,
                 global_params: Any) -> dict[str, Any]:
    """Params of the step for a ``models:`` config."""
    order: list[str] = []
    pm: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(raw["models"]):
        if not isinstance(m, dict) or "model" not in m:
            raise _err(f"models[{i}]: expected {{model: ..., parameters: ...}}")
        _check_keys(m, {"model", "parameters"}, f"models[{i}]")
        n = models.add(m["model"], f"models[{i}].model")
        pm[n] = m.get("parameters") or {}
        if n != base:
            order.append(n)
    if method == "passthrough":
        if len(order) + (1 if base else 0) != 1:
            raise _err("passthrough takes exactly one model (use slices to combine several)")
        only = order[0] if order else base
        return {"models": [only], **_method_params(method, [only], pm, [global_params], "")}
    params = _method_params(method, order, pm, [global_params], "")
    params["models"] = order
    if base is not None:
        params["base"] = base
    if method == "slerp" and base is None:
        raise _err("slerp needs base_model (the t = 0 end)")
    return params


def _slice_entry(sl: dict[str, Any], i: int, method: str, base: str | None, models: _Models,
                 global_params: Any) -> dict[str, Any]:
    """One entry of ``merge.passthrough``'s ``slices`` for ``slices[i]`` of the config."""
    _check_keys(sl, {"sources", "parameters", "base_model"}, f"slices[{i}]")
    srcs = []
    pm = {}
    for j, src in enumerate(sl.get("sources") or []):
        _check_keys(src, {"model", "layer_range", "parameters"}, f"slices[{i}].sources[{j}]")
        n = models.add(src["model"], f"slices[{i}].sources[{j}].model")
        lr = src.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2):
            raise _err(f"slices[{i}].sources[{j}].layer_range: expected [start, end]")
        srcs.append({"model": n, "layers": [int(lr[0]), int(lr[1])]})
        pm[n] = src.get("parameters") or {}
    if not srcs:
        raise _err(f"slices[{i}]: no sources")
    slice_base = models.add(sl["base_model"], f"slices[{i}].base_model") if sl.get("base_model") else base
    entry: dict[str, Any] = {"sources": srcs}
    shared = [sl.get("parameters"), global_params]
    if method == "passthrough":
        if len(srcs) != 1:
            raise _err(f"slices[{i}]: passthrough takes one source per slice")
        p = _method_params(method, [srcs[0]["model"]], pm, [pm[srcs[0]["model"]]] + shared, f"slices[{i}].")
        if "scale" in p:
            entry["scale"] = p["scale"]
    else:
        merged = [s["model"] for s in srcs if s["model"] != slice_base]
        if slice_base is not None and slice_base not in [s["model"] for s in srcs]:
            raise _err(f"slices[{i}]: the base model is not among the slice's sources")
        entry["method"] = method
        entry["params"] = _method_params(method, merged, pm, shared, f"slices[{i}].")
        if slice_base is not None:
            entry["base"] = slice_base
    return entry


def _output_params(raw: dict[str, Any], params: dict[str, Any], op: str, base: str | None,
                   models: _Models) -> None:
    """``dtype``, ``tokenizer_source`` and ``chat_template`` of the config into the step's params."""
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        if str(dtype) not in DTYPE_NAMES:
            raise _err(f"dtype {dtype!r} is not supported (float32, float16, bfloat16)")
        params["dtype"] = DTYPE_NAMES[str(dtype)]
    if op == "merge.passthrough":
        for key in ("tokenizer_source", "chat_template"):
            if raw.get(key) is not None:
                raise _err(f"key {key!r} is not supported with passthrough or slices")
    tok = raw.get("tokenizer_source")
    if tok is not None:
        tok = str(tok)
        if tok not in ("base", "union"):
            tok = models.names(_model_ref(tok, "tokenizer_source"))
            if tok not in models.paths:
                models.paths[tok] = str(raw["tokenizer_source"])
        if tok == "base" and base is None:
            raise _err("tokenizer_source: base needs base_model")
        params["tokenizer_source"] = tok
    ct = raw.get("chat_template")
    if ct is not None:
        params["chat_template"] = str(ct)


def translate(raw: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """mergekit config dict -> surgeon recipe dict (``models``, ``base``, ``steps``)."""
    for k in raw:
        if k in UNSUPPORTED_TOP:
            raise _err(f"key {k!r} is not supported ({UNSUPPORTED_TOP[k]})")
        if k not in TOP_KEYS:
            raise _err(f"key {k!r} is not supported")
    method = str(raw["merge_method"])
    if method not in METHODS:
        raise _err(f"merge_method {method!r} is not supported (supported: {', '.join(sorted(METHODS))})")
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise _err("give exactly one of 'models' or 'slices'")
    models = _Models()
    base = models.add(raw["base_model"], "base_model") if raw.get("base_model") else None
    global_params = raw.get("parameters")
    if raw.get("models"):
        op = METHODS[method][0]
        params = _models_step(raw, method, base, models, global_params)
    else:
        op = "merge.passthrough"
        params = {"slices": [_slice_entry(sl, i, method, base, models, global_params)
                             for i, sl in enumerate(raw["slices"])]}
    _output_params(raw, params, op, base, models)
    recipe: dict[str, Any] = {"models": models.paths, "steps": [{op: params}]}
    if base is not None:
        recipe["base"] = base
    return recipe


def translation_of(path: str | os.PathLike) -> dict[str, Any] | None:
    """The recipe a mergekit config file becomes (paths as written), or None for a surgeon recipe."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return translate(raw, where=str(p)) if is_mergekit_config(raw) else None


def recipe_yaml(recipe: dict[str, Any]) -> str:
    """YAML of a recipe with number lists in flow style ([0, 0.5, 1]), as mergekit writes its configs."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
        flow = all(isinstance(e, (int, float)) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, _list)
    return yaml.dump(recipe, Dumper=_Dumper, sort_keys=False)
