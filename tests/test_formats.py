"""Outputs that look loadable load correctly or not at all (issue 24, item 6).

A packed ShiftAdd output and a compact recursive (tie) output carry a surgeon model type in config.json:
after ``import surgeon`` transformers' ``AutoModelForCausalLM.from_pretrained`` returns surgeon's model for
them (same logits as surgeon's own loader and as the dense equivalent); without surgeon, transformers refuses
them instead of loading random weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgeon.context import Context
from surgeon.formats import BASE_TYPE_KEY, RECURSIVE_MODEL_TYPE, SHIFTADD_MODEL_TYPE, from_disk, to_disk
from surgeon.writer import write_graph

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def _graph(path: Path):
    from surgeon.graph import Graph
    from surgeon.sources import open_checkpoint

    return Graph.from_checkpoint(open_checkpoint(path))


def _write(op: str, src: Path, out: Path, **kw) -> Path:
    from surgeon.pipeline import validate_step

    spec, params = validate_step(op, kw)
    ctx = Context(quiet=True)
    write_graph(spec.apply(_graph(src), params, ctx), out, ctx=ctx)
    return out


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(IDS).logits


@pytest.fixture
def outputs(tiny_llama, tmp_path):
    return {
        "packed": _write("shiftadd", tiny_llama, tmp_path / "packed", bits=3, group_size=32, rounds=2),
        "packed_dense": _write("shiftadd", tiny_llama, tmp_path / "packed_dense", bits=3, group_size=32, rounds=2,
                               materialize=True),
        "compact": _write("tie", tiny_llama, tmp_path / "compact", rank=8),
        "compact_dense": _write("tie", tiny_llama, tmp_path / "compact_dense", rank=8, materialize=True),
    }


def test_config_json_names_a_surgeon_model_type_and_surgeon_reads_the_base_type(outputs):
    from surgeon.sources import open_checkpoint

    for key, kind in (("packed", SHIFTADD_MODEL_TYPE), ("compact", RECURSIVE_MODEL_TYPE)):
        cfg = json.loads((outputs[key] / "config.json").read_text())
        assert cfg["model_type"] == kind and cfg[BASE_TYPE_KEY] == "llama"
        assert open_checkpoint(outputs[key]).config["model_type"] == "llama"
        assert BASE_TYPE_KEY not in open_checkpoint(outputs[key]).config
    for key in ("packed_dense", "compact_dense"):  # dense outputs stay plain transformers checkpoints
        assert json.loads((outputs[key] / "config.json").read_text())["model_type"] == "llama"


def test_to_disk_and_from_disk_are_inverse():
    packed = {"model_type": "qwen2", "quantization_config": {"quant_method": "shiftadd"}}
    compact = {"model_type": "llama", "recursion": {"loops": 2}}
    for cfg in (packed, compact, {"model_type": "llama"}):
        assert from_disk(to_disk(cfg)) == cfg
        assert to_disk(to_disk(cfg)) == to_disk(cfg)
    assert to_disk(packed)["model_type"] == SHIFTADD_MODEL_TYPE


def test_automodel_loads_packed_shiftadd_after_import_surgeon(outputs):
    from transformers import AutoModelForCausalLM

    import surgeon  # noqa: F401 - the registration this test is about
    from surgeon.formats.shiftadd import ShiftAddLinear, load_shiftadd

    auto = AutoModelForCausalLM.from_pretrained(outputs["packed"])
    assert isinstance(auto.model.layers[0].mlp.down_proj, ShiftAddLinear)
    own = load_shiftadd(outputs["packed"])
    dense = AutoModelForCausalLM.from_pretrained(outputs["packed_dense"], dtype=torch.float32)
    a = _logits(auto)
    assert torch.equal(a, _logits(own))
    assert (a - _logits(dense)).abs().max().item() < 1e-4  # the dequantised weights, written densely
    out = auto.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    ref = dense.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)


def test_automodel_loads_compact_recursive_after_import_surgeon(outputs):
    from transformers import AutoModelForCausalLM

    import surgeon  # noqa: F401
    from surgeon.formats.recursive import load_recursive

    auto = AutoModelForCausalLM.from_pretrained(outputs["compact"])
    own = load_recursive(str(outputs["compact"]))
    dense = AutoModelForCausalLM.from_pretrained(outputs["compact_dense"], dtype=torch.float32)
    a = _logits(auto)
    assert torch.equal(a, _logits(own))
    assert (a - _logits(dense)).abs().max().item() < 1e-4  # the materialised W_shared + BA
    shared = auto.model.layers[0].mlp.down_proj.base.weight
    assert any(auto.model.layers[i].mlp.down_proj.base.weight is shared for i in range(1, 4))


def _plain_transformers(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter that never imports surgeon (isolated: no PYTHONPATH, started outside the repo)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-c", code], check=False, capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_transformers_without_surgeon_refuses_instead_of_loading_random_weights(outputs, tmp_path):
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        AutoModelForCausalLM.from_pretrained(p)\n"
            "    except ValueError as e:\n        print('REFUSED', p, str(e).splitlines()[0])\n"
            "    else:\n        print('LOADED', p)\n"
            "print('surgeon' in sys.modules)\n")
    r = _plain_transformers(code.replace("sys.argv[1:]", repr([str(outputs["packed"]), str(outputs["compact"]),
                                                               str(outputs["compact_dense"])])), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"REFUSED {outputs['packed']}") and f"`{SHIFTADD_MODEL_TYPE}`" in lines[0]
    assert lines[1].startswith(f"REFUSED {outputs['compact']}") and f"`{RECURSIVE_MODEL_TYPE}`" in lines[1]
    assert lines[2] == f"LOADED {outputs['compact_dense']}" and lines[3] == "False"


def test_registration_also_works_when_transformers_was_imported_first(outputs, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(repo)!r})\n"
            "from transformers import AutoModelForCausalLM\n"
            "import surgeon\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(outputs['packed'])!r})\n"
            "print(type(m.model.layers[0].mlp.down_proj).__name__)\n")
    r = _plain_transformers(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ShiftAddLinear", r.stderr[-2000:]


def test_import_surgeon_imports_neither_torch_nor_transformers(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); import surgeon\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = _plain_transformers(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
