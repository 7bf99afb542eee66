"""Reliability sweep over every operation: bad input never leaves output and never touches inputs; the same
recipe, inputs and seed give byte-identical outputs.

Each op gets a minimal valid invocation on tiny models; the bad inputs are derived from it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_llama_with_tokenizer, word_text
from safetensors.torch import load_file, save_file

from surgeon.cli import main
from surgeon.registry import OP_INDEX


@dataclass
class Case:
    op: str
    args: list[str]  # CLI options after the model(s), with {data} {requests} {base} placeholders
    n_models: int = 1
    data_flag: str | None = None  # the option naming a data file (missing/empty-file checks)
    arch_aware: bool = True
    extra_models_from_base: bool = False
    writes: bool = True
    fixture: str = "llama"
    skip_nan: bool = False
    tags: set[str] = field(default_factory=set)
    model_key: str = "base"  # which input a one-model case reads (nearswap: one model besides --base)


CASES: dict[str, Case] = {
    "cast": Case("cast", ["--dtype", "float16"], arch_aware=False),
    "drop": Case("drop", ["--pattern", "lm_head"], arch_aware=False),
    "rename": Case("rename", ["--pattern", "^lm_head", "--replacement", "output_head"], arch_aware=False),
    "eval": Case("eval", ["--perplexity", "{data}", "--seqlen", "16"], data_flag="--perplexity", writes=False),
    "merge.linear": Case("merge.linear", [], n_models=2),
    "merge.task-arithmetic": Case("merge.task-arithmetic", ["--base", "{base}"], n_models=2),
    "merge.ties": Case("merge.ties", ["--base", "{base}", "--density", "0.5"], n_models=2),
    "merge.dare": Case("merge.dare", ["--base", "{base}", "--density", "0.5"], n_models=2),
    "merge.opcm": Case("merge.opcm", ["--base", "{base}"], n_models=2),
    "merge.slerp": Case("merge.slerp", ["--base", "{base}"], model_key="other"),
    "merge.nuslerp": Case("merge.nuslerp", [], n_models=2),
    "merge.multislerp": Case("merge.multislerp", [], n_models=2),
    "merge.karcher": Case("merge.karcher", [], n_models=2),
    "merge.model-stock": Case("merge.model-stock", ["--base", "{base}"], n_models=2),
    "merge.nearswap": Case("merge.nearswap", ["--base", "{base}"], model_key="other"),
    "merge.breadcrumbs": Case("merge.breadcrumbs", ["--base", "{base}"], n_models=2),
    "merge.breadcrumbs-ties": Case("merge.breadcrumbs-ties", ["--base", "{base}"], n_models=2),
    "merge.della": Case("merge.della", ["--base", "{base}"], n_models=2),
    "merge.della-linear": Case("merge.della-linear", ["--base", "{base}"], n_models=2),
    "merge.sce": Case("merge.sce", ["--base", "{base}"], n_models=2),
    "edit.rome": Case("edit.rome", ["--requests", "{requests}", "--stats-data", "{data}", "--steps", "5",
                                    "--no-stats-cache", "--layer", "1"], data_flag="--stats-data"),
    "edit.emmet": Case("edit.emmet", ["--requests", "{requests}", "--stats-data", "{data}", "--steps", "5",
                                      "--no-stats-cache", "--layer", "1"], data_flag="--stats-data"),
    "edit.memit": Case("edit.memit", ["--requests", "{requests}", "--stats-data", "{data}", "--steps", "5",
                                      "--no-stats-cache", "--layers", "0,1"], data_flag="--stats-data"),
    "edit.alphaedit": Case("edit.alphaedit", ["--requests", "{requests}", "--stats-data", "{data}", "--steps", "5",
                                              "--no-stats-cache", "--layers", "0,1", "--nullspace-threshold", "1e9"],
                           data_flag="--stats-data"),
    "prune.magnitude": Case("prune.magnitude", ["--sparsity", "0.5"]),
    "prune.wanda": Case("prune.wanda", ["--data", "{data}", "--seqlen", "16", "--n-windows", "4"],
                        data_flag="--data"),
    "prune.sparsegpt": Case("prune.sparsegpt", ["--data", "{data}", "--seqlen", "16", "--n-windows", "4"],
                            data_flag="--data"),
    "prune.layers": Case("prune.layers", ["--remove", "1", "--data", "{data}", "--seqlen", "16", "--n-windows", "4"],
                         data_flag="--data"),
    "retrain.perp": Case("retrain.perp", ["--data", "{data}", "--steps", "2", "--seqlen", "16", "--batch-size", "2",
                                          "--max-windows", "8"], data_flag="--data"),
    "shiftadd": Case("shiftadd", ["--bits", "2", "--group-size", "32", "--rounds", "3", "--data", "{data}",
                                  "--seqlen", "16", "--max-windows", "4"], data_flag="--data"),
    "tie": Case("tie", ["--loops", "2", "--rank", "4"]),
    "recover": Case("recover", ["--stages", "4", "--lost", "1"], skip_nan=True),
    "erase.uce": Case("erase.uce", ["--concept", "cat", "--target", "dog"], fixture="sd"),
    "erase.rece": Case("erase.rece", ["--concept", "cat", "--target", "dog", "--epochs", "1"], fixture="sd"),
}
# ops whose inputs are special folders (LoRA adapters, a run's checkpoints, an RMM output) are swept in their
# own test files: merge.mwa (tests/test_merge_mwa.py), merge.rmm and merge.revert (tests/test_merge_rmm.py)
# merge.passthrough needs slices naming its inputs: tests/test_merge_methods.py and tests/test_mergekit_configs.py
# retrain.distill needs a tie output and a teacher: tests/test_distill.py (forms, refusals, CLI exit code 2)
SPECIAL = {"merge.mwa", "merge.rmm", "merge.revert", "merge.passthrough", "retrain.distill"}


def test_every_op_is_swept():
    assert set(OP_INDEX) == set(CASES) | SPECIAL


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel")
    base = save_tiny_llama_with_tokenizer(root / "base", seed=0)
    other = root / "other"
    shutil.copytree(base, other)
    sd = load_file(other / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    third = root / "third"
    shutil.copytree(base, third)
    sd = {k: v - 0.01 * torch.randn(v.shape, generator=g) for k, v in load_file(base / "model.safetensors").items()}
    save_file(sd, third / "model.safetensors", metadata={"format": "pt"})
    data = root / "data.txt"
    data.write_text(word_text(800))
    empty = root / "empty.txt"
    empty.write_text("")
    requests = root / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "w1 w2 w3 is", "subject": "w2 w3", "target": " w50"}) + "\n")
    out = {"base": base, "other": other, "third": third, "data": data, "empty": empty, "requests": requests,
           "root": root}
    try:
        from test_erase_helpers import save_tiny_sd

        out["sd"] = save_tiny_sd(root / "sd")
    except Exception:  # noqa: BLE001, S110 (diffusers missing: the erase cases skip)
        pass
    return out


def _argv(case: Case, inputs: dict[str, Path], out: Path | None, **subst: str) -> list[str]:
    if case.fixture == "sd":
        if "sd" not in inputs:
            pytest.skip("diffusers is not installed")
        models = [str(subst.get("model", inputs["sd"]))]
    elif case.n_models == 1:
        models = [str(subst.get("model", inputs[case.model_key]))]
    else:
        models = [str(subst.get("model", inputs["other"])), str(subst.get("model2", inputs["third"]))]
    values = {"data": str(subst.get("data", inputs["data"])), "requests": str(inputs["requests"]),
              "base": str(subst.get("base", inputs["base"]))}
    args = [a.format(**values) for a in case.args]
    argv = [*case.op.split("."), *models, *args, "-q"]
    if case.writes and out is not None:
        argv += ["-o", str(out)]
    return argv


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    files = sorted(dst.rglob("*.safetensors"))
    unet = [p for p in files if p.parent.name == "unet"]
    f = unet[0] if unet else files[0]  # diffusers pipelines: corrupt the UNet
    raw = f.read_bytes()
    if how == "truncate":
        f.write_bytes(raw[: len(raw) - 64])
    elif how == "offsets":
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8: 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, len(raw) * 2]
        new = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    elif how == "nan":
        sd = load_file(f)
        name = next(k for k in sd if k.endswith("mlp.down_proj.weight") or "attn2.to_k" in k)
        sd[name][0, 0] = float("nan")
        save_file(sd, f, metadata={"format": "pt"})
    elif how == "arch":
        sd = load_file(f)
        save_file({f"encoder.block{i}.w": v for i, v in enumerate(sd.values())}, f, metadata={"format": "pt"})
        cfg = json.loads((f.parent / "config.json").read_text())
        cfg["model_type"] = "mystery"
        cfg["architectures"] = ["MysteryModel"]
        (f.parent / "config.json").write_text(json.dumps(cfg))
    elif how == "shape":
        sd = load_file(f)
        name = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
        sd[name] = sd[name][:-1]
        save_file(sd, f, metadata={"format": "pt"})
    return dst


def _expect_refusal(argv: list[str], out: Path, protected: list[Path], capsys, what: str) -> None:
    before = [_tree_hash(p) for p in protected]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, f"{what}: exit {rc}, stderr: {err[-3:]}"
    assert err and err[-1].startswith("error:"), f"{what}: {err[-3:]}"
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp-*")), what
    assert [_tree_hash(p) for p in protected] == before, f"{what}: an input changed"


BAD_SOURCES = ["truncate", "offsets", "nan", "arch", "shape"]


@pytest.mark.parametrize("op", sorted(CASES))
def test_bad_input_refused_without_output(op, inputs, tmp_path, capsys):
    case = CASES[op]
    src = inputs["sd"] if case.fixture == "sd" and "sd" in inputs else inputs[case.model_key]
    if case.n_models > 1:
        src = inputs["other"]
    tried = []
    for how in BAD_SOURCES:
        if how == "nan" and case.skip_nan:
            continue
        if how == "arch" and not case.arch_aware:
            continue
        if how == "shape" and (case.n_models == 1 or case.fixture == "sd"):
            continue
        bad = _corrupt_copy(src, tmp_path / f"bad-{how}", how)
        out = tmp_path / f"out-{how}"
        argv = _argv(case, inputs, out, model=bad)
        if not case.writes and how == "nan":
            continue  # eval of a NaN model reports NaN perplexity; nothing is written
        _expect_refusal(argv, out, [bad, inputs["base"]], capsys, f"{op}/{how}")
        tried.append(how)
    if case.data_flag:
        for how, path in (("missing", tmp_path / "no-such-file.txt"), ("empty", inputs["empty"])):
            out = tmp_path / f"out-{how}"
            _expect_refusal(_argv(case, inputs, out, data=path), out, [inputs["base"]], capsys, f"{op}/{how}")
            tried.append(how)
    # an unknown key in a recipe step
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(src), "steps": [{op: {"no_such_knob": 1}}],
                                      "output": str(tmp_path / "out-recipe")}))
    _expect_refusal(["run", str(recipe)], tmp_path / "out-recipe", [src], capsys, f"{op}/recipe-key")
    assert tried or not case.arch_aware


@pytest.mark.parametrize("op", sorted(CASES))
def test_same_inputs_and_seed_give_identical_bytes(op, inputs, tmp_path, capsys):
    case = CASES[op]
    outputs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        argv = _argv(case, inputs, out) + ["--json"]
        rc = main(argv)
        captured = capsys.readouterr()
        assert rc == 0, captured.err[-2000:]
        if case.writes:
            prov = json.loads((out / "surgeon.json").read_text())
            (out / "surgeon.json").unlink()  # timings and dates differ by design
            card = (out / "README.md").read_text()
            (out / "README.md").unlink()
            assert prov["steps"][0]["op"] == op and "surgeon" in card
            outputs.append(_tree_hash(out))
        else:
            res = json.loads(captured.out)
            outputs.append(json.dumps(res["results"], sort_keys=True, default=str).replace(
                str(res.get("seconds")), ""))
    if not case.writes:
        strip = [json.loads(o) for o in outputs]
        for r in strip:
            for item in r:
                item.pop("seconds", None)
                item.pop("time_s", None)
        outputs = [json.dumps(r, sort_keys=True) for r in strip]
    assert outputs[0] == outputs[1], f"{op}: outputs differ between two identical runs"
