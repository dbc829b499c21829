"""The KServe V2 gRPC API's server: `grpc.aio` on the worker's event loop, beside uvicorn.

Started by the lifespan of every worker (`service.lifecycle`) on HOST:GRPC_PORT (0 = no gRPC). With
WORKERS > 1 every worker binds the same port (`SO_REUSEPORT`) and the kernel spreads connections
over them, as it does for the HTTP port; a single worker binds it alone, so a port another server
holds stops the start instead of silently sharing that server's traffic. The limits are the REST ones:

- memory: gRPC reads a whole message before the service sees it, so the budget REST bodies share
  (MAX_BODY_BYTES_IN_FLIGHT) is kept by bounding both factors before any byte is read: a message is
  at most GRPC_MAX_MESSAGE_BYTES (and MAX_UPLOAD_BYTES; gRPC answers RESOURCE_EXHAUSTED beyond it as
  soon as the message's length prefix arrives), and at most MAX_BODY_BYTES_IN_FLIGHT / that many
  calls run at once per worker (64 by default; never more than MAX_CONNECTIONS); gRPC refuses calls
  beyond it with RESOURCE_EXHAUSTED before reading their message. So the messages one worker holds
  never exceed MAX_BODY_BYTES_IN_FLIGHT, whatever clients send. Neither refusal reaches the service,
  so neither is in its metrics or log. Call metadata is at most MAX_HEADER_BYTES, like a request
  head. Replies are bounded by the codec's response budget (`service.protocols.v2codec`).
- TLS, and mutual TLS, with TLS_CERTFILE, TLS_KEYFILE and TLS_CLIENT_CA.

Graceful shutdown: when the HTTP side begins its drain (`ServiceState.draining`), or at the latest
when the lifespan ends, the service refuses every new RPC with UNAVAILABLE ("shutting down") while
the admitted ones finish, within the grace period uvicorn gives HTTP requests, and for
`REFUSAL_LINGER_S` more; then gRPC stops listening. The lifespan awaits that before the model
versions close, so no admitted RPC loses its model. Refusing in the service first, rather than
stopping gRPC at once, matters: gRPC's own stop resets the calls it has received but not yet handed
to the service, and their clients see CANCELLED, which they do not retry; the linger lets calls
already on the wire reach the service and get their UNAVAILABLE. A call that races the final stop
can still end CANCELLED; it was never admitted.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from pathlib import Path

import grpc

from service.errors import StartupError
from service.protocols.v2grpc_calls import CallRunner
from service.protocols.v2grpc_service import InferenceServicer, method_handlers
from service.protocols.v2proto import SERVICE_NAME
from service.settings import Settings
from service.state import ServiceState
from service.transport.access import Credentials
from service.transport.server import uvicorn_options

logger = logging.getLogger(__name__)

REFUSAL_LINGER_S = 1.0
"""How long the service keeps refusing new calls (UNAVAILABLE) after the admitted ones have finished,
before gRPC stops listening, in seconds: calls clients sent meanwhile get a status they retry."""


def message_limit(settings: Settings) -> int:
    """The largest request message a call may carry, in bytes."""
    return min(settings.grpc_max_message_bytes, settings.max_upload_bytes)


def max_concurrent_calls(settings: Settings) -> int:
    """Calls one worker runs at once: as many largest messages as MAX_BODY_BYTES_IN_FLIGHT holds."""
    return max(1, min(settings.max_connections, settings.max_body_bytes_in_flight // message_limit(settings)))


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC core options for `settings` (see the module docstring)."""
    return [
        ("grpc.max_receive_message_length", message_limit(settings)),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        # gRPC's default on Linux is on; only sibling workers may share the port.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when TLS_CERTFILE is set (mutual TLS with TLS_CLIENT_CA); None for plain gRPC."""
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    client_ca = settings.tls_client_ca
    try:
        key, chain = Path(settings.tls_keyfile).read_bytes(), Path(settings.tls_certfile).read_bytes()
        roots = Path(client_ca).read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise StartupError(f"cannot read the TLS files for gRPC: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=roots, require_client_auth=client_ca is not None
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcApi:
    """One worker's running gRPC server; `stop()` drains it (idempotent)."""

    def __init__(
        self, server: grpc.aio.Server, calls: CallRunner, grace_s: float, draining: asyncio.Event
    ) -> None:
        self._server = server
        self._calls = calls
        self._grace_s = grace_s
        self._stopping: asyncio.Future[None] | None = None
        self._watcher = asyncio.create_task(self._stop_when_draining(draining), name="convserve-grpc-drain")

    @classmethod
    async def start(cls, state: ServiceState) -> GrpcApi:
        """Bind HOST:GRPC_PORT and serve; `StartupError` if the port cannot be bound."""
        settings = state.settings
        server = grpc.aio.server(
            options=server_options(settings), maximum_concurrent_rpcs=max_concurrent_calls(settings)
        )
        calls = CallRunner(state.metrics, Credentials.from_settings(settings), settings.client_error_delay_s)
        handlers = method_handlers(InferenceServicer(state, calls))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        # As generated servers do: gRPC core then matches these paths itself, without a Python lookup.
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        address = _address(settings.host, settings.grpc_port)
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        else:
            reason = "the address is in use or not local"
        if not bound:
            raise StartupError(
                f"cannot listen for gRPC on {address} ({reason}); free the port, choose another with "
                "CONVSERVE_GRPC_PORT, or set CONVSERVE_GRPC_PORT=0 to turn gRPC off"
            )
        await server.start()
        logger.info("gRPC (KServe V2) on %s://%s", "grpcs" if credentials else "grpc", address)
        grace_s = float(uvicorn_options(settings)["timeout_graceful_shutdown"])  # HTTP's own grace
        return cls(server, calls, grace_s, state.draining)

    async def _stop_when_draining(self, draining: asyncio.Event) -> None:
        await draining.wait()
        await self.stop()

    async def stop(self) -> None:
        """Refuse new RPCs, let admitted ones finish (within the grace period), then return."""
        if self._stopping is None:
            logger.info("gRPC: draining (up to %.0f s for calls in progress)", self._grace_s)
            self._stopping = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._stopping)
        if self._watcher is not asyncio.current_task():
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace_s
        self._calls.closing = True
        with suppress(TimeoutError):
            async with asyncio.timeout(self._grace_s):
                await self._calls.wait_idle()
        await asyncio.sleep(REFUSAL_LINGER_S)
        # Returns once the calls still running (refusals, by now) end; those still running after the
        # grace period are cancelled.
        await self._server.stop(max(1.0, deadline - loop.time()))
        logger.info("gRPC: stopped")
