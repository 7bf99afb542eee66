"""Recipes (schema, did-you-mean, --set, dry-run) and the CLI contract (exit codes, --json, no partial output)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _hash_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _recipe(tmp_path: Path, model: Path, steps, **extra) -> Path:
    r = {"model": str(model), "steps": steps, "output": str(tmp_path / "out"), **extra}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_cast_via_cli_keeps_norms_fp32(tiny_llama, tmp_path, capsys):
    out = tmp_path / "cast"
    rc = main(["cast", str(tiny_llama), "--dtype", "bfloat16", "--keep-dtype", "{norm: float32}", "-o", str(out),
               "--json", "-q"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["output"] == str(out.resolve())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.model.layers[0].mlp.up_proj.weight.dtype in (torch.bfloat16, torch.float32)


def test_bad_inputs_exit_2_with_one_line_and_no_output(tiny_llama, tmp_path, capsys):
    before = _hash_tree(tiny_llama)
    out = tmp_path / "o"
    cases = [
        ["cast", str(tiny_llama), "--dtype", "bf16", "-o", str(out)],
        ["cast", str(tmp_path / "missing"), "--dtype", "bfloat16", "-o", str(out)],
        ["cast", str(tiny_llama), "--dtype", "bfloat16", "-o", str(tiny_llama)],
        ["drop", str(tiny_llama), "--pattern", "nothing-matches-this", "-o", str(out)],
        ["rename", str(tiny_llama), "--pattern", "(", "--replacement", "x", "-o", str(out)],
    ]
    for argv in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (argv, err)
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert _hash_tree(tiny_llama) == before


def test_recipe_validation_did_you_mean(tiny_llama, tmp_path):
    p = _recipe(tmp_path, tiny_llama, [{"cats": {"dtype": "bfloat16"}}])
    with pytest.raises(SurgeonError, match="did you mean 'cast'"):
        load_recipe(p)
    p = _recipe(tmp_path, tiny_llama, [{"cast": {"dtyp": "bfloat16"}}])
    with pytest.raises(SurgeonError, match="did you mean 'dtype'"):
        load_recipe(p)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": str(tiny_llama), "stepz": [], "output": "x"}))
    with pytest.raises(SurgeonError, match="did you mean 'steps'"):
        load_recipe(p)
    p.write_text("model: [unclosed")
    with pytest.raises(SurgeonError, match="line 1"):
        load_recipe(p)


def test_set_overrides_and_missing_key(tiny_llama, tmp_path):
    p = _recipe(tmp_path, tiny_llama, [{"cast": {"dtype": "float16"}}])
    r = load_recipe(p, ["steps.0.cast.dtype=bfloat16"])
    assert r.steps[0]["cast"]["dtype"] == "bfloat16"
    r = load_recipe(p, ["steps.0.cast.keep=[norm]"])  # a valid field not in the file
    assert r.steps[0]["cast"]["keep"] == ["norm"]
    with pytest.raises(SurgeonError, match="--set steps.0.cast.colour: no key 'colour'"):
        load_recipe(p, ["steps.0.cast.colour=red"])
    p2 = _recipe(tmp_path, tiny_llama, [{"prune.magnitude": {"sparsity": 0.5}}])
    r = load_recipe(p2, ["steps.0.prune.magnitude.sparsity=0.7"])  # op names contain dots
    assert r.steps[0]["prune.magnitude"]["sparsity"] == 0.7
    with pytest.raises(SurgeonError, match="index '3' out of range"):
        load_recipe(p, ["steps.3.cast.dtype=float16"])


def test_run_recipe_and_dry_run(tiny_llama, tmp_path, capsys):
    p = _recipe(tmp_path, tiny_llama, [{"cast": {"dtype": "bfloat16"}}, {"drop": {"pattern": "lm_head"}}])
    assert main(["run", str(p), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and [s["op"] for s in plan["steps"]] == ["cast", "drop"]
    assert plan["input_bytes"] > 0 and plan["memory_estimate_bytes"] > plan["largest_tensor_bytes"]
    assert not (tmp_path / "out").exists()
    assert main(["run", str(p), "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    with safe_open(Path(res["output"]) / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    prov = json.loads((Path(res["output"]) / "surgeon.json").read_text())
    assert [s["op"] for s in prov["steps"]] == ["cast", "drop"] and prov["recipe"]["steps"][0]["cast"]
    assert main(["validate", str(p)]) == 0


def test_recipes_in_repo_all_validate():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    for r in recipes:
        raw = yaml.safe_load(r.read_text())
        # model paths in shipped recipes are placeholders; validation reads no tensor
        load_recipe(r)
        assert raw["steps"], r


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; import surgeon.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "surgeon.cli", "--help"], check=False, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "merge" in r.stdout and "prune" in r.stdout
    assert time.perf_counter() - t0 < 5  # generous: the machine is shared; measured in the README


def test_op_help_teaches(capsys):
    rc = main(["cast", "--help"])
    out = capsys.readouterr().out
    assert rc == 0 and "--dtype" in out and "--keep-dtype" in out and "--output" in out


def _big_checkpoint(tmp_path: Path) -> Path:
    """A 24-tensor fp32 checkpoint, big enough to make a 1 MB-sharded cast take seconds when slowed."""
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    save_file({f"w{i}": torch.randn(512, 512) for i in range(24)}, src / "model.safetensors")
    return src


def _slow_cast_process(src: Path, out: Path) -> subprocess.Popen:
    """A real `surgeon cast` process with each tensor's cast and write slowed down, so it can be signalled
    mid-write."""
    code = (
        "import signal, sys, time, torch; from surgeon.cli import main; import surgeon.ops.basic as b\n"
        # background shells start children with SIGINT ignored; a terminal user's Ctrl-C is not ignored
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "orig = b.cast_target\n"
        "def slow(*a):\n    time.sleep(0.2); return orig(*a)\n"
        "b.cast_target = slow\n"
        "import surgeon.executor as x\n"  # every write of every tensor goes through pwrite_all
        "o = x.pwrite_all\n"
        "def slow_write(*a):\n    time.sleep(0.1); return o(*a)\n"
        "x.pwrite_all = slow_write\n"
        f"sys.exit(main(['cast', {str(src)!r}, '--dtype', 'float16', '-o', {str(out)!r}, '--max-shard-size', '1MB', '-q']))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def test_sigint_during_write_leaves_no_output(tmp_path):
    """A real process writing a multi-shard checkpoint is interrupted; no OUT, no temp folder remain."""
    src = _big_checkpoint(tmp_path)
    out = tmp_path / "out"
    proc = _slow_cast_process(src, out)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("out.tmp-*")):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    assert rc == 130, proc.stderr.read()
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    # a rerun succeeds
    assert main(["cast", str(src), "--dtype", "float16", "-o", str(out), "-q"]) == 0


def test_sigkill_during_write_leaves_no_output_and_the_rerun_cleans_up(tmp_path):
    """SIGKILL cannot be caught: the temp folder stays, OUT never appears, the next write removes the leftover."""
    src = _big_checkpoint(tmp_path)
    before = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    out = tmp_path / "out"
    proc = _slow_cast_process(src, out)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("out.tmp-*/*.safetensors")):
        time.sleep(0.05)
    time.sleep(random.uniform(0.1, 0.8))
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    leftovers = list(tmp_path.glob("out.tmp-*"))
    assert not out.exists() and len(leftovers) == 1
    assert main(["cast", str(src), "--dtype", "float16", "-o", str(out), "-q"]) == 0
    assert out.is_dir() and not leftovers[0].exists() and not list(tmp_path.glob("out.tmp-*"))
    assert hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest() == before


def test_a_live_writers_temp_folder_is_never_removed(tmp_path):
    from surgeon.writer import _host_tag, remove_stale_temps

    out = tmp_path / "o"
    live = tmp_path / f"o.tmp-{_host_tag()}-{os.getpid()}-0123abcd"
    other_host = tmp_path / "o.tmp-ffffff-999999-0123abcd"
    dead = tmp_path / f"o.tmp-{_host_tag()}-{2 ** 22 + 7}-0123abcd"  # above Linux's pid_max default
    for p in (live, other_host, dead):
        p.mkdir()
    assert remove_stale_temps(out) == [dead]
    assert live.is_dir() and other_host.is_dir()


def test_file_size_limit_gives_clear_error_and_removes_temp(tmp_path):
    """A real size limit (RLIMIT_FSIZE, what `ulimit -f` sets): writes fail with EFBIG part-way through."""
    import resource

    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file({f"w{i}": torch.randn(256, 256) for i in range(16)}, src / "model.safetensors")
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", "cast", str(src), "--dtype", "float32", "-o",
                           str(out), "--max-shard-size", "2MB"], preexec_fn=limit, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "file size limit" in proc.stderr and proc.stderr.count("\n") <= 2
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_full_tmpfs_gives_clear_error(tmp_path):
    """A real full file system: a 1 MiB tmpfs (needs mount privileges; skipped where they are missing)."""
    from safetensors.torch import save_file

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no privileges)")
    try:
        src = tmp_path / "src"
        src.mkdir()
        save_file({f"w{i}": torch.randn(256, 256) for i in range(16)}, src / "model.safetensors")
        proc = subprocess.run([sys.executable, "-m", "surgeon.cli", "cast", str(src), "--dtype", "float32", "-o",
                               str(mnt / "out")], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "no space left" in proc.stderr
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def test_full_disk_gives_clear_error(tmp_path, monkeypatch, tiny_llama, capsys):
    import errno

    import surgeon.executor as x

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(x, "pwrite_all", full)  # every tensor's bytes are written through it
    rc = main(["cast", str(tiny_llama), "--dtype", "float16", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no space left" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))


def test_push_calls_api_offline(tiny_llama, tmp_path):
    from surgeon.hub import push_folder

    out = tmp_path / "o"
    assert main(["cast", str(tiny_llama), "--dtype", "float16", "-o", str(out), "-q"]) == 0
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))
            return type("Info", (), {"commit_url": "https://hub/x/commit/1"})()

    res = push_folder(out, "me/tiny", private=True, api=FakeApi())
    assert calls[0][0] == "create_repo" and calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["folder_path"] == str(out) and "*.safetensors" in calls[1][2]["delete_patterns"]
    assert res["url"].endswith("/commit/1")
    with pytest.raises(SurgeonError, match="owner/name"):
        push_folder(out, "bad", api=FakeApi())
    os.environ.pop("HF_TOKEN", None)
