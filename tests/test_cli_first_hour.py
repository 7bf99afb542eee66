"""Issue 24, items 3-5: a human dry-run plan, option help that shows defaults/required/flags, errors that name
the flags the user typed, did-you-mean over every command name, and trivial mistakes refused before torch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from surgeon.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("first") / "tiny", layers=2)


def _float_bytes_after_cast(folder: Path, width: int) -> int:
    """Oracle for a cast: every floating tensor at ``width`` bytes per element, the others unchanged."""
    total = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_slice(name)
            numel = 1
            for s in t.get_shape():
                numel *= s
            dtype = t.get_dtype()
            total += numel * (width if dtype.startswith(("F", "BF")) else {"I64": 8, "I32": 4}.get(dtype, 1))
    return total


# item 3 --------------------------------------------------------------------------------------------------------
def test_dry_run_without_json_prints_a_plan_for_a_person(model, tmp_path, capsys):
    out = tmp_path / "half"
    assert main(["cast", str(model), "--dtype", "float16", "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not text.lstrip().startswith("{")
    assert "step 1   cast: dtype=float16" in text
    assert "tensors  " in text and re.search(r"peak memory\s+about \d+\.\d\d GB", text)
    expected_mb = _float_bytes_after_cast(model, 2) / 1e6
    assert f"output   {out}: {expected_mb:.2f} MB" in text
    assert not out.exists()
    # the machine-readable plan carries the same number
    assert main(["cast", str(model), "--dtype", "float16", "-o", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["output_bytes"] == _float_bytes_after_cast(model, 2)
    assert plan["steps"][0]["given"] == {"dtype": "float16"}


def test_dry_run_says_when_the_output_size_is_only_known_by_running(model, tmp_path, capsys):
    assert main(["shiftadd", str(model), "-o", str(tmp_path / "s"), "--dry-run"]) == 0
    assert "unknown until run" in capsys.readouterr().out


# item 4 --------------------------------------------------------------------------------------------------------
def _help(argv: list[str], capsys) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_option_help_shows_defaults_ranges_required_and_bare_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = _help(["shiftadd"], capsys)
    assert re.search(r"--bits .*\[default: 3; ≥ 1 and ≤ 8\]", text)
    assert re.search(r"--materialize\s+--no-materialize\s+Write dense", text)  # no <bool> between
    assert "<bool>" not in text
    assert re.search(r"--force\s+Replace", text)
    rome = _help(["edit", "rome"], capsys)
    assert re.search(r"\*\s+--requests", rome) and "[required]" in rome
    prune = " ".join(_help(["prune", "magnitude"], capsys).replace("│", " ").split())  # unwrap the table
    assert "One of: layer, global. [default: layer]" in prune


@pytest.mark.parametrize("argv, flags, absent", [
    (["shiftadd", "{model}", "--bits", "0", "-o", "{out}"], ["--bits", "≥ 1"], ["steps.0", "shiftadd: bits"]),
    (["prune", "magnitude", "{model}", "--scope", "globl", "-o", "{out}"], ["--scope", "did you mean 'global'"],
     ["steps.0"]),
    (["prune", "magnitude", "{model}", "--nm", "2:4", "--scope", "global", "-o", "{out}"], ["--nm", "--scope"],
     ["steps.0", "Value error", "prune.magnitude:"]),
    (["prune", "magnitude", "{model}", "--nm", "3", "-o", "{out}"], ["--nm"], ["steps.0", "Value error"]),
])
def test_cli_errors_name_the_flags(argv, flags, absent, model, tmp_path, capsys):
    argv = [a.format(model=model, out=tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --"), err
    for f in flags:
        assert f in err, (f, err)
    for a in absent:
        assert a not in err, (a, err)


def test_recipe_errors_keep_recipe_paths_without_pydantic_prefixes(model, tmp_path):
    from surgeon.errors import SurgeonError
    from surgeon.recipe import load_recipe

    with pytest.raises(SurgeonError) as e:
        load_recipe({"model": str(model), "steps": [{"prune.magnitude": {"nm": "2:4", "scope": "global"}}]})
    assert "steps.0.prune.magnitude" in str(e.value) and "Value error" not in str(e.value)


@pytest.mark.parametrize("argv, suggestion", [
    (["prun"], "'prune'"), (["prune", "magnitud"], "'magnitude'"), (["shiftad"], "'shiftadd'"),
    (["merge", "tie"], "'ties'"), (["inspekt"], "'inspect'"),
])
def test_did_you_mean_covers_groups_ops_and_commands(argv, suggestion, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Did you mean" in err and suggestion in err, err


# item 5 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["cast", "{tmp}/no-such-model", "--dtype", "float16", "-o", "{tmp}/o"], ["no-such-model", "no such file"]),
    (["shiftadd", "{model}", "--bits", "0", "-o", "{tmp}/o"], ["--bits"]),
    (["prune", "magnitude", "{model}", "--sparsity", "1.5", "-o", "{tmp}/o"], ["--sparsity"]),
    (["prune", "magnitude", "{model}"], ["-o/--output"]),
    (["prune", "magnitude", "{model}", "-o", "{model}"], ["overlaps"]),
    (["merge", "ties", "{model}", "{tmp}/missing-b", "-o", "{tmp}/o"], ["missing-b"]),
    (["shiftadd", "{model}", "-o", "{tmp}/o", "--max-shard-size", "lots"], ["--max-shard-size"]),
    (["edit", "rome", "{model}", "-o", "{tmp}/o"], ["--requests"]),
])
def test_trivial_mistakes_are_refused_before_torch_is_imported(argv, words, model, tmp_path):
    argv = [a.format(model=model, tmp=tmp_path) for a in argv]
    code = ("import sys\nfrom surgeon.cli import main\nrc = main(sys.argv[1:])\n"
            "sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\nsys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "torch imported: False" in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert not (tmp_path / "o").exists()


def test_op_help_imports_no_torch():
    code = ("import sys\nfrom surgeon.cli import main\nrc = main(['shiftadd', '--help'])\n"
            "sys.exit(3 if 'torch' in sys.modules else rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0 and "--bits" in proc.stdout, proc.stderr[-2000:]
