"""Edit requests: what to rewrite, read from JSONL/YAML or given inline, validated before any tensor is read.

A request names a prompt that contains its subject (literally, or as a ``{}`` placeholder), and the new
object (``target``, with its leading space, e.g. ``" Rome"``). Optional fields feed the metrics:
``target_true`` (the old answer; otherwise the unedited model's greedy answer is used), ``paraphrases``
(prompts that should now give the target) and ``neighborhood`` (prompts about other subjects whose answers
must not move).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgeon.errors import SurgeonError


class Request(BaseModel):
    """One fact to rewrite: ``prompt`` (with the subject or ``{}``) → ``target``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str = Field(description="Prompt ending where the object should follow; contains the subject or '{}'.")
    subject: str = Field(description="The subject whose fact changes (must occur in the prompt).")
    target: str = Field(validation_alias="target_new", description="New object, usually with a leading space.")
    target_true: str | None = Field(None, description="Old object (for metrics); default: the model's greedy answer.")
    paraphrases: list[str] = Field(default_factory=list, description="Other phrasings that should give the target.")
    neighborhood: list[str] = Field(default_factory=list, description="Prompts whose answers must stay unchanged.")

    @model_validator(mode="before")
    @classmethod
    def _accept_both_target_names(cls, data: Any) -> Any:
        # ROME/CounterFact files call it target_new (sometimes {"str": ...}); ours call it target.
        if isinstance(data, dict):
            data = dict(data)
            for key in ("target", "target_new", "target_true"):
                if isinstance(data.get(key), dict) and "str" in data[key]:
                    data[key] = data[key]["str"]
            if "target" in data and "target_new" in data:
                raise ValueError("give either 'target' or 'target_new', not both")
            if "target" in data:
                data["target_new"] = data.pop("target")
        return data

    @field_validator("subject")
    @classmethod
    def _subject_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("subject is empty")
        return v

    @field_validator("target")
    @classmethod
    def _target_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("target is empty (an edit needs a new object)")
        return v

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> Request:
        if "{}" in self.prompt:
            if self.prompt.count("{}") != 1:
                raise ValueError(f"prompt {self.prompt!r} has more than one '{{}}' placeholder")
        elif self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r} "
                             "(write it literally or as '{}')")
        for p in self.paraphrases:
            if "{}" not in p and self.subject not in p:
                raise ValueError(f"paraphrase {p!r} does not contain the subject {self.subject!r} or '{{}}'")
        return self

    @property
    def template(self) -> str:
        """The prompt with its (first) subject occurrence as ``{}``."""
        return self.prompt if "{}" in self.prompt else self.prompt.replace(self.subject, "{}", 1)

    @property
    def text(self) -> str:
        """The prompt with the subject written out."""
        return self.template.replace("{}", self.subject)

    def paraphrase_texts(self) -> list[str]:
        return [p.replace("{}", self.subject) for p in self.paraphrases]


def _request(obj: Any, where: str) -> Request:
    if not isinstance(obj, dict):
        raise SurgeonError(f"{where}: expected an object with prompt, subject, target; got {type(obj).__name__}")
    try:
        return Request.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ())) or "request"
        raise SurgeonError(f"{where}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SurgeonError(f"{where}:{line}: not UTF-8 text (byte {e.start})") from None


def _parse_jsonl(text: str, where: str) -> list[Request]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SurgeonError(f"{where}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        out.append(_request(obj, f"{where}:{lineno}"))
    return out


def _parse_document(text: str, where: str, suffix: str) -> list[Request]:
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SurgeonError(f"{where}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise SurgeonError(f"{where}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if isinstance(data, dict) and "requests" in data:
        data = data["requests"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise SurgeonError(f"{where}: expected a list of requests")
    return [_request(obj, f"{where}: item {i}") for i, obj in enumerate(data, 1)]


def parse_requests(raw: bytes, where: str) -> list[Request]:
    """Requests from a file's bytes: ``.jsonl`` (one object per line), ``.json`` (a list) or ``.yaml``/``.yml``
    (a list), by the suffix of ``where`` (the path, which errors name with the line or item)."""
    suffix = Path(where).suffix
    if suffix not in (".jsonl", ".json", ".yaml", ".yml"):
        raise SurgeonError(f"--requests {where}: unknown file type {suffix!r} (expected .jsonl, .json, .yaml)")
    text = _utf8(raw, where)
    out = _parse_jsonl(text, where) if suffix == ".jsonl" else _parse_document(text, where, suffix)
    if not out:
        raise SurgeonError(f"{where}: no requests found")
    return out


def load_requests(path: str | Path, ctx: Any) -> list[Request]:
    """Read the requests file ``path`` through ``ctx`` (see :func:`parse_requests`)."""
    p = Path(path).expanduser()
    return parse_requests(ctx.read(str(p), what="--requests"), str(p))


def resolve_requests(spec: list[Request] | str, ctx: Any) -> list[Request]:
    """``spec`` is a file path or an inline list (recipes)."""
    if isinstance(spec, str):
        return load_requests(spec, ctx)
    if not spec:
        raise SurgeonError("requests: the list is empty")
    return list(spec)


def with_leading_space(requests: list[Request]) -> list[Request]:
    """Targets (new and old) that start without whitespace get a space, as ``kmeng01/rome``'s ``rome_main.py``
    and the MEMIT/EMMET ``execute_*`` functions do before tokenising (CounterFact's ``{"str": "Sweden"}`` would
    otherwise be read glued to the prompt: "located inSweden"). A prompt that itself ends in whitespace keeps its
    target as given (the reference would write two spaces)."""
    out = []
    for r in requests:
        if r.text[-1:].isspace():
            out.append(r)
            continue
        update = {f: " " + v for f in ("target", "target_true")
                  if (v := getattr(r, f)) is not None and not v[:1].isspace()}
        out.append(r.model_copy(update=update) if update else r)
    return out


def duplicate_subjects(requests: list[Request]) -> dict[str, int]:
    """Subjects occurring more than once (an EMMET batch with two targets for one key is singular)."""
    seen: dict[str, int] = {}
    for r in requests:
        seen[r.subject] = seen.get(r.subject, 0) + 1
    return {s: n for s, n in seen.items() if n > 1}


def subject_batches(requests: list[Request], max_batch: int) -> list[list[Request]]:
    """Split into consecutive batches of at most ``max_batch`` requests with unique subjects.

    A repeated subject starts a new batch, so its later request is applied on top of the earlier one
    (sequential editing) instead of making one batch's system singular.
    """
    batches: list[list[Request]] = [[]]
    subjects: set[str] = set()
    for r in requests:
        if len(batches[-1]) >= max_batch or r.subject in subjects:
            batches.append([])
            subjects = set()
        batches[-1].append(r)
        subjects.add(r.subject)
    return [b for b in batches if b]
