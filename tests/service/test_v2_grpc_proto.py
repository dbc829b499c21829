"""The gRPC protocol definition: wire-compatible with Triton's, and the committed generated code current.

Our messages live in a package of their own (`convserve.v2`), Triton's in `inference`; the wire
carries field numbers and types, never message names, so they are compared by name within their
package. Importing both generated modules here, in one process, is itself part of the check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from service.protocols.v2grpc_service import InferenceServicer, method_handlers
from service.protocols.v2proto import PROTO_SERVICE, SERVICE_NAME, method_path
from service.protocols.v2proto import grpc_service_pb2 as pb
from tests.liveserver import REPO_ROOT

PROTO = "service/protocols/v2proto/grpc_service.proto"
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2.pyi")
FieldKey = tuple[str, int, int, str, str, str]


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


def as_proto(descriptor: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return proto


@pytest.fixture(scope="module")
def ours() -> descriptor_pb2.FileDescriptorProto:
    return as_proto(pb.DESCRIPTOR)


def tritons() -> list[descriptor_pb2.FileDescriptorProto]:
    return [as_proto(module.DESCRIPTOR) for module in (service_pb2, model_config_pb2)]


def local(type_name: str, package: str) -> str:
    """`.convserve.v2.InferParameter` -> `InferParameter`: a type's name within its package."""
    prefix = f".{package}."
    assert type_name.startswith(prefix), f"{type_name} is not of package {package}"
    return type_name.removeprefix(prefix)


def messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of `file` (nested ones and map entries too) by its name within the package."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(f"{name}.", nested)

    for message in file.message_type:
        walk("", message)
    return found


def fields(message: descriptor_pb2.DescriptorProto, package: str) -> dict[str, FieldKey]:
    """Per field: name, number, type, label, type name (within `package`) and oneof, which together
    decide its wire form."""
    return {
        f.name: (
            f.name,
            f.number,
            f.type,
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            local(f.type_name, package) if f.type_name else "",
            message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else "",
        )
        for f in message.field
    }


def test_our_messages_have_a_package_of_their_own(ours: descriptor_pb2.FileDescriptorProto) -> None:
    assert ours.package == "convserve.v2"
    assert {file.package for file in tritons()} == {"inference"}
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "convserve.v2.ModelInferRequest"
    assert service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"


def test_every_message_field_matches_tritons(ours: descriptor_pb2.FileDescriptorProto) -> None:
    theirs: dict[str, descriptor_pb2.DescriptorProto] = {}
    their_fields: dict[str, dict[str, FieldKey]] = {}
    for file in tritons():
        for name, message in messages(file).items():
            theirs[name] = message
            their_fields[name] = fields(message, file.package)
    mine = messages(ours)
    assert len(mine) >= 30  # the walk found the nested messages and map entries too
    for name, message in mine.items():
        assert name in theirs, f"{name} is not a message of Triton's protocol"
        assert message.options.map_entry == theirs[name].options.map_entry, name
        for field_name, key in fields(message, ours.package).items():
            twin = their_fields[name].get(field_name)
            assert key == twin, f"{name}.{field_name}: ours {key}, Triton's {twin}"


def test_every_enum_value_matches_tritons(ours: descriptor_pb2.FileDescriptorProto) -> None:
    theirs = {enum.name: enum for file in tritons() for enum in file.enum_type}
    assert ours.enum_type
    for enum in ours.enum_type:
        assert {v.name: v.number for v in enum.value}.items() <= {
            v.name: v.number for v in theirs[enum.name].value
        }.items(), enum.name


def test_every_rpc_served_is_tritons_with_its_request_and_response(
    ours: descriptor_pb2.FileDescriptorProto,
) -> None:
    (service,) = ours.service
    (theirs,) = [s for s in tritons()[0].service if s.name == service.name]
    assert service.name == PROTO_SERVICE
    # Served under Triton's name, which is what the method paths carry.
    assert f"{tritons()[0].package}.{theirs.name}" == SERVICE_NAME
    their_methods = {m.name: m for m in theirs.method}
    for method in service.method:
        twin = their_methods[method.name]
        assert (local(method.input_type, ours.package), local(method.output_type, ours.package)) == (
            local(twin.input_type, "inference"),
            local(twin.output_type, "inference"),
        ), method.name
        assert (method.client_streaming, method.server_streaming) == (
            twin.client_streaming,
            twin.server_streaming,
        ), method.name
    declared = {m.name for m in service.method}
    assert declared == {
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
    # The server registers exactly the declared methods, each with the proto's own messages.
    servicer = InferenceServicer(cast(Any, None), cast(Any, None))  # only its methods are read
    handlers = method_handlers(servicer)
    assert set(handlers) == declared
    infer = handlers["ModelInfer"]
    assert infer.request_deserializer == pb.ModelInferRequest.FromString
    assert infer.response_serializer == pb.ModelInferResponse.SerializeToString
    assert method_path("ModelInfer") == "/inference.GRPCInferenceService/ModelInfer"


def test_the_committed_generated_code_is_what_make_proto_generates(tmp_path: Path) -> None:
    protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}")
    folder = Path(PROTO).parent
    for name in GENERATED:
        generated = (tmp_path / folder / name).read_text()
        committed = (REPO_ROOT / folder / name).read_text()
        assert committed == generated, f"{folder / name} differs from what `make proto` generates; run it"
    # `make proto` generates no service classes: the server and the client name Triton's paths.
    assert sorted(p.name for p in (REPO_ROOT / folder).glob("*_pb2*")) == sorted(GENERATED)
