"""The checkout's top-level `ops/` and `kernels/` never shadow another distribution's top-level package.

Both folders are installed as `surgeon.ops` / `surgeon.kernels`. Hugging Face's `kernels` is a transformers
dependency, imported by transformers' model code; PyPI also has an `ops`. With the repository root on `sys.path`
(`python` or `python -m pytest` started there) a regular package in the root would win over the installed one.
These tests start fresh interpreters in the root, the way a user does, so they fail if either folder regains an
`__init__.py`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_in_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_transformers_hub_kernels_import_and_tiny_llama_in_repo_root():
    pytest.importorskip("kernels", reason="transformers of this install does not use Hugging Face's kernels")
    r = _python_in_root("""
        import transformers.integrations.hub_kernels  # imports `from kernels import CUDAProperties, ...`
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)
        logits = LlamaForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits
        print(tuple(logits.shape))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(1, 3, 32)"


def test_surgeon_kernels_and_hugging_face_kernels_in_one_process():
    pytest.importorskip("kernels", reason="Hugging Face's kernels is not installed")
    r = _python_in_root("""
        import kernels
        import surgeon.kernels.select
        import surgeon.ops.basic
        from pathlib import Path
        root = Path.cwd().resolve()
        assert hasattr(kernels, "CUDAProperties"), kernels.__file__
        assert Path(kernels.__file__).resolve().parent != root / "kernels", kernels.__file__
        assert Path(surgeon.kernels.select.__file__).resolve().parent.name == "kernels"
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"


def test_installed_top_level_packages_win_over_checkout_folders(tmp_path):
    """Any installed regular package named `ops` or `kernels` wins over the checkout's folders."""
    for name in ("ops", "kernels"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"ORIGIN = 'distribution {name}'\n")
    r = _python_in_root("""
        import ops, kernels
        import surgeon.ops.basic, surgeon.kernels.linalg
        print(ops.ORIGIN, '|', kernels.ORIGIN)
    """, extra_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "distribution ops | distribution kernels"


def test_checkout_folders_have_no_init():
    """The mechanism itself: PEP 420 folders lose to any regular package on sys.path."""
    assert not (ROOT / "ops" / "__init__.py").exists()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def _lock_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split(";", 1)[0].strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    """A dependency added to pyproject.toml must be in the lock too, at a version its range admits."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("test", "dev", "ray"):
        declared += project["optional-dependencies"][extra]
    pins = _lock_pins()
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in requirements/lock.txt"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (name, pins[name])


def test_lock_pins_the_local_cpu_torch():
    assert _lock_pins()["torch"].startswith("2.13.0")


def test_every_code_folder_is_a_declared_package():
    """A new op family or framework sub-package must be in pyproject's ``packages``, or wheels miss it."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = {"surgeon": ROOT / "surgeon", "surgeon.ops": ROOT / "ops", "surgeon.kernels": ROOT / "kernels"}
    found = set()
    for prefix, folder in mapping.items():
        for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
            if any(sub.glob("*.py")) and "__pycache__" not in sub.parts:
                rel = sub.relative_to(folder).parts
                found.add(".".join([prefix, *rel]))
    assert found - declared == set(), f"add to pyproject [tool.setuptools] packages: {sorted(found - declared)}"
