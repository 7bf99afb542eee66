"""Push an output folder to the Hub (``create_repo(exist_ok=True)`` + ``upload_folder``).

The API object is injectable so tests check the calls offline. Tokens come from the usual places
(``HF_TOKEN``, ``huggingface-cli login``) and are never printed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, dry_run: bool = False, api: Any = None) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not any(folder.glob("**/*.safetensors")):
        raise SurgeonError(f"{folder}: not a surgeon output (expected README.md and *.safetensors)")
    if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise SurgeonError(f"{repo_id!r}: a Hub repo id looks like owner/name")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    message = commit_message or "Upload checkpoint made with surgeon"
    plan = {"repo_id": repo_id, "private": private, "revision": revision, "files": files, "dry_run": dry_run}
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # delete_patterns removes stale shards left by an earlier push with a different shard count
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, delete_patterns=["*.safetensors", "*.index.json"])
    except SurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 (network/auth errors: one line, never the token)
        raise SurgeonError(f"push to {repo_id} failed: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None
    plan["url"] = str(getattr(info, "commit_url", info))
    return plan
