"""The gRPC protocol definition: wire-compatible with Triton's, and the committed generated code current.

Our `grpc_service.proto` is read through protoc into a descriptor pool of its own: its message
classes and tritonclient's claim the same `inference.*` names, so the two cannot share protobuf's
default pool (this test session imports tritonclient.grpc), and the comparison needs no import of
the generated module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from tests.liveserver import REPO_ROOT

PROTO = "service/protocols/v2proto/grpc_service.proto"
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py")
FieldKey = tuple[str, int, int, str, str]


def protoc(*arguments: str) -> None:
    """grpcio-tools' protoc, run from the repository root as `make proto` runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *arguments, PROTO],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path_factory.mktemp("descriptor") / "set.pb"
    protoc(f"--descriptor_set_out={out}")
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert [f.name for f in files] == [PROTO]
    return files[0]


def tritons() -> list[descriptor_pb2.FileDescriptorProto]:
    files = []
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def messages(
    file: descriptor_pb2.FileDescriptorProto,
) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of `file` (nested ones and map entries too) by full name."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for message in file.message_type:
        walk(f".{file.package}", message)
    return found


def fields(message: descriptor_pb2.DescriptorProto) -> dict[str, FieldKey]:
    """Per field: name, number, type, label, type name and oneof, which together decide its wire form."""
    return {
        f.name: (
            f.name,
            f.number,
            f.type,
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            f.type_name,
            message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else "",
        )
        for f in message.field
    }


def test_every_message_field_matches_tritons(ours: descriptor_pb2.FileDescriptorProto) -> None:
    assert ours.package == "inference"
    theirs: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in tritons():
        theirs.update(messages(file))
    mine = messages(ours)
    assert len(mine) >= 30  # the walk found the nested messages and map entries too
    for name, message in mine.items():
        assert name in theirs, f"{name} is not a message of Triton's protocol"
        assert message.options.map_entry == theirs[name].options.map_entry, name
        their_fields = fields(theirs[name])
        for field_name, key in fields(message).items():
            assert key == their_fields.get(field_name), (
                f"{name}.{field_name}: ours {key}, Triton's {their_fields.get(field_name)}"
            )


def test_every_enum_value_matches_tritons(ours: descriptor_pb2.FileDescriptorProto) -> None:
    theirs = {enum.name: enum for file in tritons() for enum in file.enum_type}
    assert ours.enum_type
    for enum in ours.enum_type:
        assert {v.name: v.number for v in enum.value}.items() <= {
            v.name: v.number for v in theirs[enum.name].value
        }.items(), enum.name


def test_every_rpc_has_tritons_request_and_response(ours: descriptor_pb2.FileDescriptorProto) -> None:
    (service,) = ours.service
    (theirs,) = [s for s in tritons()[0].service if s.name == service.name]
    assert service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in theirs.method}
    for method in service.method:
        twin = their_methods[method.name]
        assert (method.input_type, method.output_type) == (twin.input_type, twin.output_type), method.name
        assert (method.client_streaming, method.server_streaming) == (
            twin.client_streaming,
            twin.server_streaming,
        ), method.name
    assert {m.name for m in service.method} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }


def test_the_committed_generated_code_is_what_make_proto_generates(tmp_path: Path) -> None:
    protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    folder = Path(PROTO).parent
    for name in GENERATED:
        generated = (tmp_path / folder / name).read_text()
        committed = (REPO_ROOT / folder / name).read_text()
        assert committed == generated, f"{folder / name} differs from what `make proto` generates; run it"
