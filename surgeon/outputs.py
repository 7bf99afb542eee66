"""Checks on an output folder that need no tensor (and no torch): run before any work, so that a mistake in
``-o``/``--force``/``--max-shard-size`` is refused in a fraction of a second."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from surgeon.errors import SurgeonError

AUTO_SHARD_SIZE = "auto"
SHARD_SIZE_HELP = ("Largest safetensors shard, e.g. 5GB or 500MB; auto: the input's shard size when it is sharded "
                   "(at most 5GB), else 5GB.")


def parse_shard_size(text: str | int) -> int | None:
    """``--max-shard-size`` in bytes, or None for ``auto`` (resolved against the inputs by the writer); a value
    that is neither is refused."""
    if str(text).strip().lower() == AUTO_SHARD_SIZE:
        return None
    return parse_size(text, flag="--max-shard-size", forms="5GB or 500MB, or auto")


def parse_size(text: str | int, flag: str = "--max-shard-size", forms: str = "5GB or 500MB") -> int:
    """``5GB`` / ``500MB`` / ``1.5GiB`` / plain bytes -> bytes (decimal units like huggingface_hub)."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise SurgeonError(f"{flag}: expected a size like {forms}, got {text!r}") from None


def check_output_location(out: Path, sources: list[Path], force: bool) -> None:
    """Refuse before any work: OUT inside/equal to an input, an input inside OUT, a non-empty OUT without
    force, or a parent that cannot be written."""
    out = Path(out).resolve()
    for src in sources:
        s = Path(src).resolve()
        s_dir = s if s.is_dir() else s.parent
        if out == s_dir or out == s or s_dir in out.parents or out in s_dir.parents:
            raise SurgeonError(f"output {out} overlaps the input {src}; choose another folder")
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"output {out} exists and is not a folder")
    refuse_to_replace(out, force)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SurgeonError(f"output {out}: folder {parent} is not writable")
    try:  # a real probe: root passes os.access everywhere, and /proc or /sys refuse new folders anyway
        os.rmdir(tempfile.mkdtemp(prefix=".surgeon-probe-", dir=parent))
    except OSError as e:
        raise SurgeonError(f"output {out}: cannot create a folder in {parent} ({e.strerror or e})") from None


def refuse_to_replace(out: Path, force: bool) -> None:
    """A non-empty ``out`` is replaced only with ``force`` and only when a previous surgeon run wrote it (it
    holds ``surgeon.json``): ``--force`` never deletes a folder that surgeon did not write."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise SurgeonError(f"output {out} is not empty (pass --force to replace it)")
    if not (out / "surgeon.json").is_file():
        raise SurgeonError(f"output {out} is not empty and was not written by surgeon (no surgeon.json); "
                           "--force only replaces surgeon outputs: remove it yourself or choose another folder")
