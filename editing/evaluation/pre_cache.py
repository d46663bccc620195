"""A disk cache of the unedited model's measurement of each case.

Why: every evaluation first measures each case on the unedited model (the "pre" record: its
teacher-forced scores, the locality argmaxes later edits are compared with, and with
``--by-generation`` what the model says). That measurement depends on the model and the case,
not on the editing method, yet each run paid for it again: a third to a half of a
non-sequential run's time, and 27 minutes before the first edit of a 1,000-case sequential
run on SmolLM2. With this cache, measuring a second method, resuming another curve, or
growing a run from 200 to 500 cases measures only what was never measured.

A record is reused only when all of these are equal, each part of its key:
- the target's identity (:meth:`EditTarget.unedited_identity`): model name, base-weight
  fingerprint and dtype, given only while the target holds no edit, so a record never
  describes an edited model;
- the case, every field (prompts, targets, probes), so another dataset file or version of the
  same case id misses;
- the measuring options (fluency prompts and tokens, generation tokens);
- the code that measures an unedited model: a digest of :data:`MEASURING_SOURCES` (the
  evaluation package, the in-process target, the model host and loader, the fact type) and
  of the torch and transformers versions, so a change to how anything is scored, prompted or
  generated misses rather than mixing old and new numbers. Until 2026-12-03 the digest covered
  every source file of editserve, so any commit (a server option, a bench tool) threw away
  every record and a 1,000-case run re-measured for ~30 minutes. Code outside the list that
  changes what an *unedited* model is measured to say must be added to it.
Torch's thread count is not part of the key: it changes float summation order at the 1e-6
level, which the teacher-forced metrics (argmax and probability comparisons) do not see.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path

from .datasets import EvalCase

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


SKIPPED_DIRS = frozenset({"tests", "bench", "build"})  # measure nothing; hidden ones (.venv) too

# what an unedited model's pre record depends on, relative to the package root: a folder
# stands for every .py file under it
MEASURING_SOURCES = ("editing/evaluation", "editing/facts.py", "server/eval_target.py", "server/host.py",
                     "server/models.py")


def code_digest(root: Path = PACKAGE_ROOT, sources: tuple[str, ...] = MEASURING_SOURCES) -> str:
    """sha256 over the ``.py`` files of ``sources`` under ``root`` (relative path and bytes, in
    path order) and the torch and transformers versions. A folder's walk prunes hidden and
    :data:`SKIPPED_DIRS` directories rather than filtering their files afterwards (a checkout's
    virtual environments hold tens of thousands of files)."""
    import torch
    import transformers

    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    files: list[Path] = []
    for source in sources:
        path = root / source
        if path.is_file():
            files.append(path)
            continue
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
            files += [Path(folder) / n for n in names if n.endswith(".py")]
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class PreMeasurementCache:
    """One JSON file per (target, case, options, code) key under ``directory``. Writes are
    atomic (a unique temporary file, then rename), so concurrent runs and a run killed
    mid-write leave only whole records; an unreadable record is measured again."""

    def __init__(self, directory: Path, *, code: str | None = None) -> None:
        self.directory = Path(directory)
        self.code = code if code is not None else code_digest()
        self.hits = 0
        self.misses = 0

    def key(self, identity: str, case: EvalCase, options: dict) -> str:
        material = {"identity": identity, "case": asdict(case), "options": options, "code": self.code}
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return record

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
