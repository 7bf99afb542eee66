"""mergekit YAML configs run as they are (`surgeon run config.yml -o OUT`).

Real-world style configs (the shapes people post on model cards) on a tiny Llama family: the translation is
checked against hand-written recipes, every config runs, and, where mergekit 0.1.5 is installed in its own venv
(``/tmp/mk/bin/python`` or ``$MERGEKIT_PYTHON``), the deterministic ones equal mergekit's outputs.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from surgeon.errors import SurgeonError
from surgeon.mergekit_config import translate
from surgeon.recipe import execute_recipe, load_recipe
from tests.conftest import save_tiny_llama, save_word_tokenizer
from tests.test_merge_helpers import perturbed_copy, state

MERGEKIT_PY = os.environ.get("MERGEKIT_PYTHON", "/tmp/mk/bin/python")

CONFIGS = {
    # the classic SLERP of two fine-tunes with per-filter gradients (slices form)
    "slerp": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "ties": """
models:
  - model: {base}
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.3
      weight: [0.2, 0.8]
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "dare_ties": """
models:
  - model: {base}
  - model: {a}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {b}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: float32
""",
    "model_stock": """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {base}
dtype: float32
""",
    "della": """
models:
  - model: {a}
    parameters:
      weight: 1.0
  - model: {b}
    parameters:
      weight: 0.5
merge_method: della
base_model: {base}
parameters:
  density: 0.6
  epsilon: 0.1
  lambda: 1.0
dtype: float32
""",
    "breadcrumbs": """
models:
  - model: {a}
    parameters:
      weight: 0.6
      density: 0.9
      gamma: 0.01
  - model: {b}
    parameters:
      weight: 0.4
      density: 0.8
      gamma: 0.02
merge_method: breadcrumbs_ties
base_model: {base}
dtype: float32
""",
    "passthrough": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
    "linear_gradient": """
models:
  - model: {a}
    parameters:
      weight:
        - filter: mlp
          value: [1, 0]
        - value: 0.5
  - model: {b}
    parameters:
      weight:
        - filter: mlp
          value: [0, 1]
        - value: 0.5
merge_method: linear
dtype: float32
""",
    "task_arithmetic": """
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
parameters:
  lambda: [0.5, 1.0]
dtype: float32
""",
    "tokenizer_union": """
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {v}
    parameters: {{weight: 0.5}}
merge_method: linear
tokenizer_source: union
dtype: float32
""",
}
DETERMINISTIC = ["slerp", "ties", "model_stock", "breadcrumbs", "passthrough", "linear_gradient", "task_arithmetic",
                 "tokenizer_union"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mkfamily")
    base = save_tiny_llama(root / "base", layers=4, hidden=32, vocab=104)
    save_word_tokenizer(base)
    out = {"base": base}
    for k, seed in (("a", 1), ("b", 2), ("c", 3)):
        out[k] = perturbed_copy(base, root / k, seed=seed)
    for k in ("a", "b", "c"):
        for f in base.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (out[k] / f.name).write_bytes(f.read_bytes())
    # a model whose vocabulary differs: 100 words of which the last 10 are new, in another order
    from tests.conftest import WORDS

    v = perturbed_copy(base, root / "v", seed=4)
    words = [w for w in WORDS[:90]][::-1] + [f"new{i}" for i in range(10)]
    save_word_tokenizer(v, words)
    out["v"] = v
    return out


def _write(tmp_path: Path, name: str, family: dict[str, Path]) -> Path:
    p = tmp_path / f"{name}.yml"
    p.write_text(CONFIGS[name].format(**{k: str(v) for k, v in family.items()}))
    return p


def test_slerp_translation_is_the_recipe_we_would_write(family, tmp_path):
    raw = yaml.safe_load(CONFIGS["slerp"].format(**{k: str(v) for k, v in family.items()}))
    assert translate(raw) == {
        "models": {"base": str(family["base"]), "a": str(family["a"])},
        "base": "base",
        "steps": [{"merge.passthrough": {"dtype": "float32", "slices": [{
            "sources": [{"model": "base", "layers": [0, 4]}, {"model": "a", "layers": [0, 4]}],
            "method": "slerp", "base": "base",
            "params": {"t": {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}}}]}}],
    }


def test_ties_translation_per_model_values(family):
    raw = yaml.safe_load(CONFIGS["ties"].format(**{k: str(v) for k, v in family.items()}))
    step = translate(raw)["steps"][0]["merge.ties"]
    assert step == {"models": ["a", "b"], "base": "base", "normalize": True, "dtype": "float32",
                    "per_model": {"a": {"weight": 0.5, "density": 0.5}, "b": {"weight": [0.2, 0.8], "density": 0.3}}}
    raw = yaml.safe_load(CONFIGS["dare_ties"].format(**{k: str(v) for k, v in family.items()}))
    step = translate(raw)["steps"][0]["merge.dare"]
    assert step == {"models": ["a", "b"], "base": "base", "weights": [0.4, 0.3], "density": 0.53,
                    "consensus": "ties", "rescale_norm": "l1", "dtype": "float32"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_runs_with_surgeon_run(family, tmp_path, name):
    cfg = _write(tmp_path, name, family)
    out = tmp_path / f"out_{name}"
    res = execute_recipe(load_recipe(cfg), output=str(out), quiet=True)
    got = state(out)
    ref = state(family["a"])
    assert res["output"] and len(got) == len(ref) + (18 if name == "passthrough" else 0)  # 6 layers, not 4
    if name == "passthrough":
        sa, sb = ref, state(family["b"])
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
        assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], sa["model.layers.2.mlp.up_proj.weight"])
        assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"])
    if name == "linear_gradient":
        sa, sb = ref, state(family["b"])
        n = "model.layers.0.mlp.up_proj.weight"  # mlp gradient at layer 0: a 1, b 0
        assert torch.allclose(got[n], sa[n])
        n = "model.layers.3.mlp.up_proj.weight"  # layer 3 (last): a 0, b 1
        assert torch.allclose(got[n], sb[n])
        n = "model.layers.1.self_attn.q_proj.weight"
        assert torch.allclose(got[n], 0.5 * sa[n] + 0.5 * sb[n], atol=1e-6)
    if name == "dare_ties":
        base = state(family["base"])
        n = "model.layers.1.mlp.down_proj.weight"
        kept = float(((got[n] - base[n]) != 0).float().mean())
        assert 0.5 < kept < 0.9  # two 53 % random masks, union ~78 %


def test_dry_run_prints_the_translation(family, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli import app

    cfg = _write(tmp_path, "slerp", family)
    r = CliRunner().invoke(app, ["run", str(cfg), "-o", str(tmp_path / "o"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["recipe"]["steps"][0]["merge.passthrough"]["slices"][0]["method"] == "slerp"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, key", [
    ("merge_method: linear\nmodels: [{model: A}]\nmodules: {}\n", "'modules'"),
    ("merge_method: linear\nmodels: [{model: A}]\nfoo: 1\n", "'foo'"),
    ("merge_method: arcee_fusion\nmodels: [{model: A}]\n", "'arcee_fusion'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A, parameters: {weight: 1, bar: 2}}]\n", "'bar'"),
    ("merge_method: linear\nmodels: [{model: A+lora, parameters: {weight: 1}}]\n", "'A+lora'"),
    ("merge_method: linear\nmodels: [{model: A, parameters: {weight: 1}}]\ndtype: int8\n", "'int8'"),
    ("merge_method: passthrough\nslices: [{sources: [{model: A, layer_range: [0, 2]}]}]\ntokenizer_source: union\n",
     "'tokenizer_source'"),
])
def test_unsupported_keys_fail_in_one_line_naming_them(tmp_path, text, key):
    p = tmp_path / "c.yml"
    p.write_text(text)
    with pytest.raises(SurgeonError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


@pytest.mark.skipif(not Path(MERGEKIT_PY).exists(), reason="mergekit 0.1.5 venv not installed (MERGEKIT_PYTHON)")
def test_deterministic_configs_equal_mergekit(family, tmp_path):
    jobs, outs = [], {}
    for name in DETERMINISTIC:
        cfg = _write(tmp_path, name, family)
        outs[name] = (tmp_path / f"mk_{name}", tmp_path / f"s_{name}")
        jobs.append((str(cfg), str(outs[name][0])))
        execute_recipe(load_recipe(cfg), output=str(outs[name][1]), quiet=True)
    script = ("import sys, json, yaml\nfrom mergekit.config import MergeConfiguration\n"
              "from mergekit.merge import run_merge\nfrom mergekit.options import MergeOptions\n"
              "for c, o in json.loads(sys.argv[1]):\n"
              "    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(c))), o, MergeOptions())\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    subprocess.run([MERGEKIT_PY, "-c", script, json.dumps(jobs)], check=True, env=env, capture_output=True)
    from tokenizers import Tokenizer

    for name, (mk, ours) in outs.items():
        a, b = state(mk), state(ours)
        if name == "tokenizer_union":  # mergekit numbers the new tokens in hash-map order: compare per token
            mv = Tokenizer.from_file(str(mk / "tokenizer.json")).get_vocab(True)
            ov = Tokenizer.from_file(str(ours / "tokenizer.json")).get_vocab(True)
            # (and without base_model it takes the first model of a Python set as the base tokenizer)
            assert set(mv) == set(ov) and len(ov) == 114  # 104 + 10 new words
            order = sorted(mv, key=mv.get)
            perm = torch.tensor([ov[t] for t in order])
            b = {k: (v[perm] if v.shape[0] == 114 else v) for k, v in b.items()}
        assert set(a) == set(b), name
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        print(f"{name}: max |diff| vs mergekit = {worst:.3g}")
        assert worst <= 1e-6, name
    assert json.loads((outs["tokenizer_union"][1] / "config.json").read_text())["vocab_size"] == 114


# ---- vocabularies ----------------------------------------------------------------------------------------


def _vocab(folder: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(True)


def test_different_vocabularies_are_refused_without_a_tokenizer_source(family):
    from surgeon.ops.merge import classic

    from tests.test_merge_helpers import context_for

    graph, ctx = context_for({"a": family["a"], "v": family["v"]})
    with pytest.raises(SurgeonError, match="vocabularies of 'a' and 'v' differ.*tokenizer_source"):
        classic.merge_linear(graph, classic.LinearParams(), ctx)
    graph, ctx = context_for({"a": family["a"], "b": family["b"]})  # same tokenizer: fine
    classic.merge_linear(graph, classic.LinearParams(), ctx)


@pytest.mark.parametrize("source", ["base", "union", "v"])
def test_tokenizer_source_rows_follow_tokens(family, tmp_path, source):
    from surgeon.api import run_op

    out = tmp_path / f"tok_{source}"
    run_op("merge.linear", {"a": str(family["a"]), "v": str(family["v"])},
           weights=[0.5, 0.5], tokenizer_source=source, output=str(out), quiet=True)
    va, vv, vo = _vocab(family["a"]), _vocab(family["v"]), _vocab(out)
    sa, sv, so = state(family["a"]), state(family["v"]), state(out)
    expect = {"base": va, "v": vv}.get(source)
    if expect is not None:
        assert vo == expect
    else:
        assert set(vo) == set(va) | set(vv) and all(vo[t] == i for t, i in va.items())
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vo)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        e = so[name]
        assert e.shape[0] == len(vo)
        for tok in ("w5", "w80", "<s>"):  # in both: the mean of the two models' rows of that token
            assert torch.allclose(e[vo[tok]], 0.5 * sa[name][va[tok]] + 0.5 * sv[name][vv[tok]], atol=1e-6)
        for tok in ("new3", "w95"):  # in one model only: that model's row (mergekit fills the other's with it)
            if tok in vo:
                donor, dv = (sv, vv) if tok in vv else (sa, va)
                assert torch.allclose(e[vo[tok]], donor[name][dv[tok]], atol=1e-6)


def test_chat_template_written(family, tmp_path):
    from surgeon.api import run_op

    out = tmp_path / "ct"
    run_op("merge.linear", {"a": str(family["a"]), "b": str(family["b"])}, chat_template="chatml",
           output=str(out), quiet=True)
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
