"""The KServe V2 gRPC API's protocol definition, the message classes `make proto` generates from it,
and the name the service is reached by."""

SERVICE_NAME = "inference.GRPCInferenceService"
"""The service's name on the wire (`/inference.GRPCInferenceService/ModelInfer`), Triton's.

Not our proto's `convserve.v2.GRPCInferenceService`: the proto has a package of its own so that its
message classes and tritonclient.grpc's can live in one process (see grpc_service.proto), but a
client finds a method only by this path, so the server registers its handlers under it and the
client calls it, both from here."""

PROTO_SERVICE = "GRPCInferenceService"
"""The service's name inside grpc_service.proto, whose methods are the ones served."""


def method_path(method: str) -> str:
    """The gRPC path of one of the service's methods: `/inference.GRPCInferenceService/<method>`."""
    return f"/{SERVICE_NAME}/{method}"
