"""Architecture knowledge as data: which tensor plays which role in which model family.

Ops ask for roles (``attn.q``, ``mlp.down``, ``norm.attn``, ``embed``, ...), never for tensor names. Each family is
one entry of :data:`FAMILIES`: a layer-prefix template, a role -> tensor-suffix table, the global tensors, which
roles are stored transposed (GPT-2 ``Conv1D``) and which roles are row slices of a fused tensor (phi3 ``qkv_proj``,
GPT-2 ``c_attn``). The resolver tries every name as written, with and without the base prefix (``model.``,
``transformer.``), so checkpoints saved from the bare base model and from the ``*ForCausalLM`` head both resolve.

A recipe can supply or correct patterns for a family we do not know (``arch:`` in the recipe)::

    arch:
      layers: "backbone.blocks.{i}."          # layer prefix template
      attn.q: "attn.wq.weight"                 # role -> suffix after the layer prefix
      mlp.down: "ffn.w2.weight"
      embed: "backbone.tok_emb.weight"
      lm_head: "head.weight"
      transposed: [mlp.down]                   # roles stored as [d_in, d_out]

Selector grammar (ALGORITHMS.md §1.3), resolved to concrete names by :meth:`Roles.select`:

- a role name or glob over role names: ``attn.q``, ``mlp.*``, ``norm.*``, ``xattn.k``; globals ``embed``,
  ``lm_head``, ``final_norm``, ``pos_embed``; ``linears`` (every block linear), ``block`` (every block tensor);
- followed by an optional layer set: half-open range ``[a, b)`` or list ``[1, 3, 5]``, e.g. ``mlp.down[4, 8)``;
  a bare layer set (``[0, 2)``) means every tensor of those layers;
- ``re:<pattern>`` full-matched against tensor names;
- any other string: an exact tensor name.

A list of selectors is their union, in model order. An empty result is an error.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from surgeon.errors import SurgeonError

from .families import ALIASES, FAMILIES
from .head import logit_transform  # noqa: F401 - the engine asks surgeon.arch

#: The roles every family is asked about. Families may add more (``norm.q``, ``xattn.k``, ...).
CORE_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "norm.attn", "norm.mlp")
GLOBAL_ROLES = ("embed", "pos_embed", "lm_head", "final_norm")
BASE_PREFIXES = ("model.", "transformer.")


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _name_candidates(name: str) -> list[str]:
    """``name`` as written, without a base prefix, and with each base prefix added."""
    out = [name]
    for p in BASE_PREFIXES:
        if name.startswith(p):
            out.append(name[len(p):])
    for p in BASE_PREFIXES:
        if not name.startswith(p):
            out.append(p + name)
    return list(dict.fromkeys(out))


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else {}


def _cfg(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for src in (config, _text_config(config)):
        for k in keys:
            if src.get(k) is not None:
                return src[k]
    return default


@dataclass
class Roles:
    """Resolved roles of one model. Names are full graph names (``unet/...`` for a pipeline component)."""

    family: str
    n_layers: int
    layout: dict[str, Any]
    config: dict[str, Any]
    names: list[str]
    prefixes: list[str]  # layer prefix of each layer i
    embed: str | None
    lm_head: str | None
    final_norm: str | None
    pos_embed: str | None
    tied: bool
    _name_set: set[str] = field(default_factory=set, repr=False)

    # per layer -------------------------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        self._check_layer(i)
        return self.prefixes[i]

    def _check_layer(self, i: int) -> None:
        if not 0 <= i < self.n_layers:
            raise SurgeonError(f"layer {i}: out of range (the {self.family} model has {self.n_layers} layers)")

    def roles(self) -> list[str]:
        """Every role this family knows (fused parts included), core roles first."""
        known = set(self.layout.get("roles", {})) | set(self.layout.get("fused", {})) | set(
            self.layout.get("aliases", {}))
        return [r for r in CORE_ROLES if r in known] + sorted(known - set(CORE_ROLES))

    def _suffix(self, role: str) -> str | None:
        role = self.layout.get("aliases", {}).get(role, role)
        fused = self.layout.get("fused", {}).get(role)
        if fused is not None:
            role = fused[0]
        return self.layout.get("roles", {}).get(role)

    def _lookup(self, i: int, role: str) -> str | None:
        suffix = self._suffix(role)
        if suffix is None:
            return None
        name = (suffix.format(i=i) if "{i}" in suffix else self.prefixes[i] + suffix)
        for cand in _name_candidates(name):
            if cand in self._name_set:
                return cand
        return None

    def has(self, i: int, role: str) -> bool:
        self._check_layer(i)
        return self._lookup(i, role) is not None

    def tensor(self, i: int, role: str) -> str:
        """Full tensor name of ``role`` in layer ``i`` (the fused tensor for a fused role: see :meth:`rows`)."""
        self._check_layer(i)
        name = self._lookup(i, role)
        if name is None:
            where = f"{self.prefixes[i]}{self._suffix(role)}" if self._suffix(role) else "no pattern known"
            raise SurgeonError(
                f"role {role!r} of layer {i}: not found in this {self.family} model ({where}); "
                f"supply a pattern in the recipe, e.g. `arch: {{{role}: \"<suffix after the layer prefix>\"}}`"
                f" (known roles: {', '.join(self.roles())})")
        return name

    def transposed(self, role: str) -> bool:
        """True when the role's tensor is stored as [d_in, d_out] (GPT-2 Conv1D)."""
        return role in self.layout.get("transposed", ())

    def rows(self, i: int, role: str) -> tuple[int, int] | None:
        """``(start, stop)`` of the role inside a fused tensor, in Linear orientation (output rows; for a
        transposed tensor these are columns of the stored array), or None when the role is a whole tensor."""
        fused = self.layout.get("fused", {}).get(role)
        if fused is None:
            return None
        key = fused[1]
        hidden = int(_cfg(self.config, "hidden_size", "n_embd", "d_model"))
        if key in ("q", "k", "v"):
            n_heads = int(_cfg(self.config, "num_attention_heads", "n_head"))
            n_kv = int(_cfg(self.config, "num_key_value_heads", default=n_heads))
            head_dim = int(_cfg(self.config, "head_dim", default=hidden // n_heads))
            sizes = {"q": n_heads * head_dim, "k": n_kv * head_dim, "v": n_kv * head_dim}
            start = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}[key]
            return start, start + sizes[key]
        inter = int(_cfg(self.config, "intermediate_size", "n_inner", default=4 * hidden))
        return (0, inter) if key == "gate" else (inter, 2 * inter)

    def block_linears(self, i: int) -> list[str]:
        """Weight names of the linear layers of layer ``i`` (each fused tensor once), in model order."""
        self._check_layer(i)
        out = []
        for role in self.layout.get("roles", {}):
            if role.startswith("norm."):
                continue
            name = self._lookup(i, role)
            if name is not None:
                out.append(name)
        return self._ordered(set(out))

    def block_tensors(self, i: int) -> list[str]:
        """Every tensor of layer ``i`` (weights, biases, norms), in model order."""
        p = self.layer_prefix(i)
        return [n for n in self.names if n.startswith(p)]

    def _ordered(self, chosen: set[str]) -> list[str]:
        return [n for n in self.names if n in chosen]

    # selectors -------------------------------------------------------------------------------------------
    def select(self, selector: str | Sequence[str]) -> list[str]:
        """Resolve a selector (or list of selectors, a union) to concrete tensor names in model order."""
        items = [selector] if isinstance(selector, str) else list(selector)
        if not items:
            raise SurgeonError("selector: empty list")
        chosen: set[str] = set()
        for item in items:
            found = self._select_one(str(item).strip())
            if not found:
                raise SurgeonError(f"selector {item!r}: matches no tensor of this {self.family} model "
                                   f"(roles: {', '.join(self.roles())}; globals: {', '.join(GLOBAL_ROLES)}; "
                                   "or `re:<regex>`, exact names, layer sets like `mlp.down[0, 4)`)")
            chosen.update(found)
        return self._ordered(chosen)

    def _select_one(self, item: str) -> list[str]:
        if item.startswith("re:"):
            try:
                pat = re.compile(item[3:])
            except re.error as e:
                raise SurgeonError(f"selector {item!r}: invalid regular expression ({e})") from None
            return [n for n in self.names if pat.fullmatch(n)]
        if item in self._name_set:
            return [item]
        m = re.fullmatch(r"\s*([^\[\]]*?)\s*(\[[^\]]*[\])])?\s*", item)
        if m is None:
            return []
        head, layer_text = m.group(1), m.group(2)
        layers = self._parse_layers(item, layer_text) if layer_text else list(range(self.n_layers))
        if head in ("", "block", "layers"):
            if not layer_text and head == "":
                return []
            return [n for i in layers for n in self.block_tensors(i)]
        if head == "linears":
            return [n for i in layers for n in self.block_linears(i)]
        globals_ = {"embed": self.embed, "lm_head": self.lm_head, "final_norm": self.final_norm,
                    "pos_embed": self.pos_embed}
        if head in globals_:
            if layer_text:
                raise SurgeonError(f"selector {item!r}: {head} is not a per-layer role")
            return [globals_[head]] if globals_[head] else []
        roles = [r for r in self.roles() if fnmatch.fnmatchcase(r, head)]
        if not roles:
            return []
        return [n for i in layers for r in roles if (n := self._lookup(i, r)) is not None]

    def _parse_layers(self, item: str, text: str) -> list[int]:
        body = text[1:-1].strip()
        bad = SurgeonError(f"selector {item!r}: layer set must be a half-open range `[a, b)` or a list `[1, 3]` "
                           f"of layers in 0..{self.n_layers - 1}")
        try:
            if text.endswith(")"):
                a_s, b_s = body.split(",")
                a, b = int(a_s), int(b_s)
                if not 0 <= a < b <= self.n_layers:
                    raise bad
                return list(range(a, b))
            out = [int(x) for x in body.split(",") if x.strip()]
        except ValueError:
            raise bad from None
        if not out or any(not 0 <= x < self.n_layers for x in out):
            raise bad
        return out


def _resolve_global(layout_value: str | list[str] | None, names: set[str], comp: str) -> str | None:
    if layout_value is None:
        return None
    for pat in [layout_value] if isinstance(layout_value, str) else layout_value:
        for cand in _name_candidates(pat):
            if comp + cand in names:
                return comp + cand
    return None


def _detect_family(config: dict[str, Any], names: list[str]) -> tuple[str, str]:
    """(family name as reported, layout key in FAMILIES); layout key "" when nothing fits."""
    mt = config.get("model_type") or _text_config(config).get("model_type") or config.get("_class_name") or ""
    if mt in FAMILIES:
        return mt, mt
    alias = ALIASES.get(mt, "")
    if alias:
        return alias, alias
    if not mt and any(n.endswith("attn2.to_k.weight") for n in names):
        return "unet", "unet"
    # unknown model_type: borrow the known layout that explains the most layer-0 tensors (many families copy
    # llama's names); roles it does not explain fail later, naming the role.
    best, best_hits = "", 0
    name_set = set(names)
    for key, lay in FAMILIES.items():
        if not isinstance(lay["layers"], list):
            continue
        for tmpl in lay["layers"]:
            hits = sum(1 for suf in lay["roles"].values()
                       if any(c in name_set for c in _name_candidates(tmpl.format(i=0) + suf)))
            if hits > best_hits:
                best, best_hits = key, hits
    return (mt or "unknown"), (best if best_hits >= 4 else "")


def _component_of(names: list[str], layout_key: str) -> str:
    """Pipeline graphs name tensors ``component/name``; find the component prefix that carries the layers."""
    if layout_key == "unet":
        for n in names:
            if n.endswith("attn2.to_k.weight"):
                return n[: n.index("/") + 1] if "/" in n else ""
    return ""


class LayerCountError(SurgeonError):
    """config.json counts fewer layers than the tensors hold: every op would silently use a truncated model."""


def _layout_with_overrides(family: str, key: str, overrides: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(family, table key, layout): the family's table with the recipe's ``arch:`` overrides applied."""
    if "family" in overrides:
        family = str(overrides.pop("family"))
        wanted = ALIASES.get(family) or family
        if wanted in FAMILIES:
            key = wanted
    layout: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in FAMILIES.get(key, {}).items()}
    layout.setdefault("roles", {})
    for k, v in overrides.items():
        if k == "layers":
            layout["layers"] = [str(v)]
        elif k == "transposed":
            layout["transposed"] = list(v) if not isinstance(v, str) else [v]
        elif k in GLOBAL_ROLES:
            layout[k] = str(v) if v is not None else None
        elif k in ("n_layers", "tied"):
            layout[k] = v
        elif isinstance(v, str) and "." in k:
            layout["roles"][k] = v
            layout.get("fused", {}).pop(k, None)
        else:
            raise SurgeonError(f"arch: unknown key {k!r} (expected family, layers, n_layers, tied, transposed, "
                               f"{', '.join(GLOBAL_ROLES)}, or a role such as attn.q)")
    return family, key, layout


def _layer_template(family: str, templates: list[str], names: list[str], comp: str) -> str:
    """The first layer-prefix template (with or without the base prefix) that some tensor starts with."""
    if not templates:
        raise SurgeonError(
            f"model type {family!r}: unknown architecture (known: {', '.join(sorted(FAMILIES))}); "
            "supply the layer prefix and roles in the recipe, e.g. "
            "`arch: {layers: \"model.layers.{i}.\", attn.q: \"self_attn.q_proj.weight\", ...}`")
    for tmpl in templates:
        for cand in _name_candidates(tmpl):
            p0 = comp + cand.format(i=0)
            if any(n.startswith(p0) for n in names):
                return comp + cand
    raise SurgeonError(f"{family} model: no tensor starts with the layer prefix "
                       f"{templates[0].format(i=0)!r}; supply it as `arch: {{layers: \"<prefix with {{i}}>\"}}`")


def _layer_prefixes(family: str, layout: dict[str, Any], config: dict[str, Any], names: list[str], comp: str,
                    n_layers_given: bool) -> list[str]:
    """One prefix per layer: UNet blocks with cross-attention, or the layer template for layers 0..n-1 (the
    config's count, checked against the tensors present)."""
    if layout.get("layers") == "attn2-blocks":
        return sorted({n[: -len("attn2.to_k.weight")] for n in names if n.endswith("attn2.to_k.weight")},
                      key=_natural_key)
    chosen = _layer_template(family, layout.get("layers") or [], names, comp)
    n_cfg = layout.get("n_layers") or _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    head, _, tail = chosen.partition("{i}")
    layer_re = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    present = {int(m.group(1)) for n in names if (m := layer_re.match(n))}
    found = 0
    while found in present:
        found += 1
    n_layers = int(n_cfg) if n_cfg else found
    if found < n_layers:
        raise SurgeonError(f"{family} model: config says {n_layers} layers but tensors exist for {found} "
                           f"(prefix {chosen!r})")
    extra = _cfg(config, "num_nextn_predict_layers", default=0) or 0  # DeepSeek-style MTP layers follow
    top = max(present) + 1
    if not n_layers_given and top > n_layers + int(extra):
        raise LayerCountError(
            f"{family} model: config.json says num_hidden_layers={n_layers} but the tensors hold layers "
            f"0..{top - 1} ({top} layers, prefix {chosen!r}); transformers would silently drop the extra "
            f"layers: fix num_hidden_layers in config.json, or drop the extra layers' tensors")
    return [chosen.format(i=i) for i in range(n_layers)]


def roles_for(config: dict[str, Any], names: list[str], overrides: dict[str, Any] | None = None) -> Roles:
    """Resolve roles for a model with this ``config`` and these tensor names.

    ``overrides`` (the recipe's ``arch:`` mapping) may set ``family``, ``layers`` (prefix template with ``{i}``),
    ``n_layers``, any role (suffix after the layer prefix, or a full name containing ``{i}``), ``embed``,
    ``lm_head``, ``final_norm``, ``pos_embed``, ``tied`` and ``transposed`` (list of roles).
    """
    config = config or {}
    names = list(names)
    overrides = dict(overrides or {})
    family, key = _detect_family(config, names)
    n_layers_given = "n_layers" in overrides
    family, key, layout = _layout_with_overrides(family, key, overrides)
    name_set = set(names)
    comp = _component_of(names, key)
    prefixes = _layer_prefixes(family, layout, config, names, comp, n_layers_given)
    embed = _resolve_global(layout.get("embed"), name_set, comp)
    lm_head = _resolve_global(layout.get("lm_head"), name_set, comp)
    tie_cfg = layout.get("tied")
    if tie_cfg is None:
        tie_cfg = _cfg(config, "tie_word_embeddings", default=layout.get("tie_default", False))
    tied = bool(embed) and (lm_head is None or bool(tie_cfg))
    if tied:
        lm_head = None
    return Roles(family=family, n_layers=len(prefixes), layout=layout, config=config, names=names,
                 prefixes=prefixes, embed=embed, lm_head=lm_head,
                 final_norm=_resolve_global(layout.get("final_norm"), name_set, comp),
                 pos_embed=_resolve_global(layout.get("pos_embed"), name_set, comp), tied=tied,
                 _name_set=name_set)


def known_families() -> list[str]:
    return sorted(FAMILIES)


def iter_layer_roles(r: Roles, roles: Iterable[str] | None = None) -> Iterable[tuple[int, str, str]]:
    """``(layer, role, tensor name)`` for every present role of every layer (fused roles map to their tensor)."""
    for i in range(r.n_layers):
        for role in roles or r.roles():
            name = r._lookup(i, role)
            if name is not None:
                yield i, role, name
