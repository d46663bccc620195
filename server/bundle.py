"""Edit bundles: the artifacts of some edits with their facts and the base model's fingerprint,
to move edits between servers and environments without recomputing them.

A bundle is an uncompressed POSIX tar (safetensors do not compress; tar is readable with any
tool): ``manifest.json`` first, then ``artifacts/<n>.safetensors`` for each edit, the files
exactly as journaled, so an artifact's sha256 is the same in every environment it reaches.
Reading is strict, since a bundle comes from outside: only those names, only regular files,
no duplicates, every size bounded, every manifest field typed, every file matching its
sha256. Nothing is extracted to disk by the name found in the archive.

Imports neither torch nor gRPC.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass

from editserve.editing.errors import InvalidRequest, PreconditionFailed
from editserve.editing.registry import METHODS, ArtifactKind

FORMAT = "editserve-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_BUNDLE_EDITS = 10_000
_ARTIFACT_NAME = re.compile(r"artifacts/(\d{1,6})\.safetensors")


@dataclass(frozen=True)
class BundledEdit:
    """One edit of a bundle: what the journal needs to record it again, and its bytes."""

    source_edit_id: str
    method: str
    kind: str
    facts: list[dict]
    options: dict
    layers: list[int]
    parameters: list[str]
    delta_norm: float
    compute_seconds: float
    description: str
    sha256: str
    data: bytes


def write_bundle(model: str, fingerprint: str, revision: int, edits: list[BundledEdit]) -> bytes:
    """The bundle's bytes (held in memory: bounded by the import limit on the other side)."""
    manifest = {
        "format": FORMAT, "version": VERSION, "model": model, "model_fingerprint": fingerprint,
        "exported_at": time.time(), "exported_revision": revision,
        "edits": [{"source_edit_id": e.source_edit_id, "method": e.method, "kind": e.kind, "facts": e.facts,
                   "options": e.options, "layers": e.layers, "parameters": e.parameters, "delta_norm": e.delta_norm,
                   "compute_seconds": e.compute_seconds, "description": e.description, "sha256": e.sha256,
                   "artifact": f"artifacts/{i}.safetensors"} for i, e in enumerate(edits)],
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, MANIFEST, json.dumps(manifest, indent=1).encode())
        for i, edit in enumerate(edits):
            _add(tar, f"artifacts/{i}.safetensors", edit.data)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def read_bundle(data: bytes, fingerprint: str) -> tuple[dict, list[BundledEdit]]:
    """The manifest and the edits of a bundle, checked; InvalidRequest for a malformed one,
    PreconditionFailed for one of another base model."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile() or member.name in files or not (
                        member.name == MANIFEST or _ARTIFACT_NAME.fullmatch(member.name)):
                    raise InvalidRequest(f"bundle: unexpected entry {member.name!r} (a bundle holds {MANIFEST} and "
                                         "artifacts/<n>.safetensors regular files, each once)")
                if member.name == MANIFEST and member.size > MAX_MANIFEST_BYTES:
                    raise InvalidRequest(f"bundle: {MANIFEST} is over {MAX_MANIFEST_BYTES} bytes")
                files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as error:
        raise InvalidRequest(f"bundle: not a readable tar archive ({error})") from None
    if MANIFEST not in files:
        raise InvalidRequest(f"bundle: no {MANIFEST}")
    try:
        manifest = json.loads(files[MANIFEST])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"bundle: {MANIFEST} is not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InvalidRequest(f"bundle: not an {FORMAT} version {VERSION} manifest")
    if manifest.get("model_fingerprint") != fingerprint:
        raise PreconditionFailed(f"bundle: exported from another base model (fingerprint "
                                 f"{manifest.get('model_fingerprint')!r} of {manifest.get('model')!r}; this server's "
                                 f"is {fingerprint!r}): its edits would not mean the same here")
    entries = manifest.get("edits")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_BUNDLE_EDITS:
        raise InvalidRequest(f"bundle: edits must be a list of 1 to {MAX_BUNDLE_EDITS} entries")
    used = set()
    edits = [_edit(i, entry, files, used) for i, entry in enumerate(entries)]
    unused = set(files) - used - {MANIFEST}
    if unused:
        raise InvalidRequest(f"bundle: files no edit refers to: {sorted(unused)}")
    return manifest, edits


_FIELDS = {"source_edit_id": str, "method": str, "kind": str, "facts": list, "options": dict, "layers": list,
           "parameters": list, "delta_norm": (int, float), "compute_seconds": (int, float), "description": str,
           "sha256": str, "artifact": str}


def _edit(i: int, entry: object, files: dict[str, bytes], used: set[str]) -> BundledEdit:
    where = f"bundle: edits[{i}]"
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where} is not an object")
    for name, kind in _FIELDS.items():
        if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
            raise InvalidRequest(f"{where}.{name} is missing or not a {getattr(kind, '__name__', 'number')}")
    if entry["method"] not in METHODS:
        raise InvalidRequest(f"{where}.method {entry['method']!r} is not a method this server knows")
    if entry["kind"] not in {k.value for k in ArtifactKind}:
        raise InvalidRequest(f"{where}.kind {entry['kind']!r} is not an artifact kind")
    name = entry["artifact"]
    if name not in files or name in used:
        raise InvalidRequest(f"{where}.artifact {name!r} is missing from the bundle or used twice")
    used.add(name)
    data = files[name]
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InvalidRequest(f"{where}: {name} does not match its sha256 (damaged in transit?)")
    return BundledEdit(entry["source_edit_id"], entry["method"], entry["kind"], entry["facts"], entry["options"],
                       entry["layers"], entry["parameters"], float(entry["delta_norm"]),
                       float(entry["compute_seconds"]), entry["description"], entry["sha256"], data)
