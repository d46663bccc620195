"""Seed a cache volume with the model cache baked into the image.

Kubernetes mounts a PersistentVolumeClaim (or an emptyDir) over a path *without* copying the
image's files there, as Docker does for a fresh named volume, so the pod's init container runs

    python /opt/editserve/seed_cache.py /cache /seed

with the volume mounted at /seed (the image's own /cache stays visible to it). Only files the
volume lacks are copied, so statistics the server estimated at run time are never replaced and a
restart copies nothing. Each file is written under a temporary name, flushed and renamed, so an
interrupted seed never leaves a truncated model file behind (the next start copies it again)
and pods seeding one shared (ReadWriteMany) volume at once cannot tear each other's files.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

PARTIAL_SUFFIX = ".seed-partial"
STALE_PARTIAL_SECONDS = 3600  # left by a pod killed mid-copy; a live copy is never this old


def seed(source: Path, target: Path) -> tuple[int, int]:
    """Copy what ``target`` lacks from ``source``; returns (files copied, files already there)."""
    copied = present = 0
    tag = f"{socket.gethostname()}.{os.getpid()}"
    for root, dirs, files in os.walk(source):
        dirs.sort()
        here = target / Path(root).relative_to(source)
        here.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            destination = here / name
            if destination.exists():
                present += 1
                continue
            partial = here / f".{name}.{tag}{PARTIAL_SUFFIX}"
            shutil.copyfile(Path(root) / name, partial)
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, destination)
            copied += 1
    now = time.time()
    for leftover in target.rglob(f"*{PARTIAL_SUFFIX}"):
        try:
            if now - leftover.stat().st_mtime > STALE_PARTIAL_SECONDS:
                leftover.unlink()
        except FileNotFoundError:  # another pod removed it first
            pass
    return copied, present


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: seed_cache.py SOURCE TARGET", file=sys.stderr)
        return 2
    source, target = Path(argv[0]), Path(argv[1])
    if not source.is_dir():
        print(f"seed_cache: {source} is not a directory: nothing to seed", file=sys.stderr)
        return 0
    started = time.perf_counter()
    copied, present = seed(source, target)
    print(f"seed_cache: {copied} file(s) copied into {target}, {present} already there "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
