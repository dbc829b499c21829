"""The KServe V2 gRPC methods (`inference.GRPCInferenceService`), each a thin translation of its REST twin.

Models are resolved and leased as REST does (`ServiceState.registry`), inference runs through the
model version's predictor (admission, off-loop parsing, the deadline, validation, batching), the
metadata, configuration and repository answers are the dicts and functions REST returns, only
copied into protobuf (`service.protocols.v2grpc_messages`). Who may call which method, the status
of each error, metrics and logs are `service.protocols.v2grpc_calls`'. Health methods are open like
`/v2/health/*`; metadata, configuration and inference need the inference token; the repository
methods the admin token.

`method_handlers` registers every method grpc_service.proto declares, by the proto's own request and
response classes, under Triton's service name (`service.protocols.v2proto.SERVICE_NAME`), which
differs from the proto's package; methods of Triton's service the proto does not declare are
answered UNIMPLEMENTED by gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import message_factory

from service.errors import BadRequestError
from service.inference.predictor import InferenceRequest, Inputs
from service.models.registry import LoadedModel
from service.protocols import repository
from service.protocols.v2codec import InferRequest, output_tensors
from service.protocols.v2grpc_calls import Call, CallRunner
from service.protocols.v2grpc_messages import (
    infer_request,
    infer_response,
    model_config,
    model_metadata,
    repository_index,
)
from service.protocols.v2model import config_document, metadata_document, server_document, tensor_spec
from service.protocols.v2proto import PROTO_SERVICE
from service.protocols.v2proto import grpc_service_pb2 as pb
from service.state import ServiceState, parse_version
from service.transport.access import Role

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Reply = TypeVar("Reply")

# What GET /v2 answers (service.protocols.v2.server_metadata).


class InferenceServicer:
    """One coroutine per method grpc_service.proto declares, named as the method."""

    def __init__(self, state: ServiceState, calls: CallRunner) -> None:
        self.state = state
        self.calls = calls

    def _run(
        self, method: str, role: Role, context: Context, handler: Callable[[Call], Awaitable[Reply]]
    ) -> Awaitable[Reply]:
        return self.calls.run(method, role, context, handler)

    # ---- health (open) ---------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        async def live(call: Call) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._run("ServerLive", Role.OPEN, context, live)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        async def ready(call: Call) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.state.registry.ready)

        return await self._run("ServerReady", Role.OPEN, context, ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        async def ready(call: Call) -> pb.ModelReadyResponse:
            # As GET /v2/models/{name}[/versions/{v}]/ready: unknown model 404, known but not served false.
            ready = self.state.registry.model_ready(request.name, parse_version(request.version))
            return pb.ModelReadyResponse(ready=ready)

        return await self._run("ModelReady", Role.OPEN, context, ready)

    # ---- metadata (inference role) ------------------------------------------------------------------

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        async def metadata(call: Call) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(**server_document())

        return await self._run("ServerMetadata", Role.INFERENCE, context, metadata)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        async def metadata(call: Call) -> pb.ModelMetadataResponse:
            async with self._lease(call, request.name, request.version) as loaded:
                return model_metadata(metadata_document(self.state, loaded))

        return await self._run("ModelMetadata", Role.INFERENCE, context, metadata)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        async def config(call: Call) -> pb.ModelConfigResponse:
            async with self._lease(call, request.name, request.version) as loaded:
                return model_config(config_document(self.state, loaded))

        return await self._run("ModelConfig", Role.INFERENCE, context, config)

    # ---- inference (inference role) -----------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        async def infer(call: Call) -> pb.ModelInferResponse:
            async with self._lease(call, request.model_name, request.model_version) as loaded:
                spec = tensor_spec(self.state, loaded)
                deadline_s = context.time_remaining()

                async def receive() -> pb.ModelInferRequest:
                    return request  # gRPC has received the whole message (at most MAX_UPLOAD_BYTES)

                def parse(message: pb.ModelInferRequest) -> tuple[Inputs, InferRequest]:
                    return infer_request(message, spec, deadline_s)

                computed, parsed = await loaded.predictor.run(
                    InferenceRequest(call.arrived_at, receive, parse)
                )
            outputs = output_tensors(parsed, computed, spec.labels)
            return infer_response(loaded.name, str(loaded.version), parsed, outputs)

        return await self._run("ModelInfer", Role.INFERENCE, context, infer)

    # ---- model repository (admin role) --------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        async def index(call: Call) -> pb.RepositoryIndexResponse:
            return repository_index(repository.index_entries(self.state), request.ready)

        return await self._run("RepositoryIndex", Role.ADMIN, context, index)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        async def load(call: Call) -> pb.RepositoryModelLoadResponse:
            _no_parameters(request.parameters, "load")
            await repository.load_model(self.state, request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._run("RepositoryModelLoad", Role.ADMIN, context, load)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        async def unload(call: Call) -> pb.RepositoryModelUnloadResponse:
            _no_parameters(request.parameters, "unload", allowed={"unload_dependents"})
            await repository.unload_model(self.state, request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._run("RepositoryModelUnload", Role.ADMIN, context, unload)

    # ---- helpers --------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _lease(self, call: Call, name: str, version: str) -> AsyncIterator[LoadedModel]:
        """The model version a call names, held until the block ends (as `service.state.model_lease`)."""
        async with self.state.registry.acquire(name, parse_version(version)) as loaded:
            call.model = (loaded.name, str(loaded.version))  # labels the call's metrics and log line
            yield loaded


def method_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """A handler for every method grpc_service.proto declares, by method name, each reading and
    writing the proto's own messages; `AttributeError` for a declared method the servicer lacks."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name[PROTO_SERVICE].methods:
        if method.client_streaming or method.server_streaming:  # every V2 method served is unary
            raise TypeError(f"{method.full_name} streams; only unary methods are served")
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return handlers


def _no_parameters(parameters: Any, action: str, allowed: frozenset[str] | set[str] = frozenset()) -> None:
    # Triton's load parameters carry a model configuration or files to write into the repository;
    # this server loads only what the repository holds, so a client that sends them must not think it
    # worked. `unload_dependents` (tritonclient always sends it) has nothing to act on: no model here
    # depends on another.
    unsupported = sorted(set(parameters) - set(allowed))
    if unsupported:
        raise BadRequestError(
            f"{action} parameters ({', '.join(unsupported)}) are not supported; the server "
            "loads what the model repository holds, so send none"
        )
