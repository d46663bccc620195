"""The method registry is the one declaration: the proto, the servicer, the client, the CLI
and the hyperparameter classes must all agree with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from editserve.client import convert
from editserve.client._pb import editing_pb2 as pb
from editserve.editing.hparams import hyperparams_class
from editserve.editing.registry import METHODS, ArtifactKind, method
from editserve.server import editing_service
from editserve.server.methods import unavailable_reason


def test_proto_enum_and_registry_agree():
    enum_names = {v.name for v in pb.EditMethod.DESCRIPTOR.values} - {"EDIT_METHOD_UNSPECIFIED"}
    assert enum_names == {spec.proto_enum for spec in METHODS.values()}
    oneof = {f.name for f in pb.EditRequest.DESCRIPTOR.oneofs_by_name["options"].fields}
    assert oneof == {spec.options_field for spec in METHODS.values()}
    assert editing_service.METHOD_NAMES == {pb.EditMethod.Value(s.proto_enum): n for n, s in METHODS.items()}
    assert convert.METHODS == {n: pb.EditMethod.Value(s.proto_enum) for n, s in METHODS.items()}
    assert editing_service.OPTION_FIELDS == convert.OPTION_FIELDS


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.implemented])
def test_every_request_option_is_a_hyperparameter(name):
    spec = METHODS[name]
    cls = hyperparams_class(spec.hparams_table)
    accepted = set(cls.option_names()) | set(cls.aliases)
    fields = set(pb.EditRequest.DESCRIPTOR.fields_by_name[spec.options_field].message_type.fields_by_name)
    assert fields <= accepted, fields - accepted
    assert callable(spec.load_compute())
    assert spec.artifact.value in spec.requires  # a host must declare the kind it hosts


def test_unavailable_methods_say_why():
    weights = frozenset({ArtifactKind.WEIGHT_DELTA.value})
    assert unavailable_reason("memit", weights) is None
    assert "routing" in unavailable_reason("serac", weights)
    assert "unknown edit method" in unavailable_reason("nope", weights)
    assert "capabilities" in unavailable_reason("rome", frozenset())
    assert "ffn_neurons" in unavailable_reason("t_patcher", weights)
    with pytest.raises(ValueError, match="known"):
        method("nope")


def test_cli_choices_come_from_the_registry():
    from editserve.client.cli import main

    edit = main.commands["edit"]
    choice = next(p for p in edit.params if p.name == "method")
    assert sorted(choice.type.choices) == sorted(METHODS)


def test_the_client_imports_neither_torch_nor_the_server():
    code = ("import sys, editserve.client, editserve.client.cli, editserve.client.eval_target; "
            "bad = [m for m in sys.modules if m == 'torch' or m == 'transformers' or m.startswith('editserve.server')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_statistics_sources_are_named_never_paths(tmp_path):
    from editserve.editing.errors import InvalidRequest
    from editserve.server.config import ServeConfig
    from editserve.server.methods import resolve_statistics_source

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text")
    sources = {"wiki": str(corpus)}
    assert resolve_statistics_source({"stats_source": "wiki", "steps": 5}, sources) == {
        "stats_source": str(corpus), "steps": 5}
    assert resolve_statistics_source({"stats_source": "default"}, sources) == {"stats_source": "default"}
    assert resolve_statistics_source({"steps": 5}, {}) == {"steps": 5}
    for bad in ("/etc/passwd", str(corpus), "nope"):
        with pytest.raises(InvalidRequest, match="paths are not accepted"):
            resolve_statistics_source({"stats_source": bad}, sources)
    assert resolve_statistics_source({"stats_source": "/local"}, None) == {"stats_source": "/local"}  # in-process
    assert ServeConfig(statistics_sources=sources).statistics_sources == sources
    with pytest.raises(ValueError, match="serac_encoder"):
        ServeConfig(serac_encoder=str(tmp_path / "no-such-encoder"))
    assert ServeConfig(serac_encoder=str(tmp_path)).serac_encoder == str(tmp_path)
    for bad_map in ({"wiki": str(tmp_path / "missing")}, {"default": str(corpus)}, {"": str(corpus)}):
        with pytest.raises(ValueError, match="statistics_sources"):
            ServeConfig(statistics_sources=bad_map)
