"""Build hook: generate the gRPC/protobuf stubs from protos/ at build time.

The stubs are never committed; they are written into client/_pb (git-ignored) by grpcio-tools
whenever the package is built or installed (editable installs included).
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "client" / "_pb"


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    OUT.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    tmp = OUT / "_gen"
    tmp.mkdir(exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    # flatten editserve/v1/x_pb2.py into client/_pb and make cross-imports package-relative
    for generated in tmp.rglob("*.py*"):
        text = generated.read_text()
        text = re.sub(r"^from editserve\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
        (OUT / generated.name).write_text(text)
    for generated in sorted(tmp.rglob("*"), reverse=True):
        generated.unlink() if generated.is_file() else generated.rmdir()
    tmp.rmdir()
    (OUT / "__init__.py").write_text('"""Stubs generated from protos/ by setup.py; do not edit."""\n')


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


# setuptools checks package directories before any command runs, so the stubs are generated
# as soon as the build backend loads this file (grpcio-tools is a build requirement).
generate_stubs()
setup(cmdclass={"build_py": BuildWithStubs})
