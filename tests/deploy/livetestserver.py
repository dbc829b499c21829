"""The real service, made tiny: a LeNet-5 exported with the training exporter, served by uvicorn on loopback.

Used by the dashboard and healthcheck tests, which need what a running server really exposes.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import skimage.data
import uvicorn
from PIL import Image

from tests.tinymodel import TINY_SPEC, export_tiny, free_port

TINY_LABELS = ("cat", "coffee", "astronaut", "rocket", "camera")
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LiveServer:
    """A running service and what a client needs to talk to it."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def jpeg_photos() -> tuple[bytes, bytes]:
        """scikit-image's cat and coffee photos as JPEG files."""
        return _jpeg(skimage.data.chelsea()), _jpeg(skimage.data.coffee())

    @staticmethod
    def zero_tensor(rows: int) -> list[list[list[list[float]]]]:
        """A preprocessed batch of `rows` images of the tiny model's shape, as nested lists."""
        height, width = TINY_SPEC.input_size
        return np.zeros((rows, 3, height, width), dtype=np.float32).tolist()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def export_tiny_model(repository: Path) -> Path:
    """Export the tiny LeNet-5 into `repository/tiny/1/model.onnx`."""
    return export_tiny(repository / "tiny" / "1", TINY_LABELS)


def _wait_until_ready(server: LiveServer, thread: threading.Thread) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the service exited during start-up; see the captured log above")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{server.url}/readyz did not return 200 within {READY_TIMEOUT_S:.0f} s")


@contextmanager
def serve(repository: Path) -> Iterator[LiveServer]:
    """Run `create_app(Settings(...))` under uvicorn in a thread until the block ends."""
    from service.app import create_app
    from service.settings import Settings

    port = free_port()
    settings = Settings(
        model_repository=repository,
        host="127.0.0.1",
        port=port,
        providers=["cpu"],
        max_batch_size=4,
        max_queue_size=16,
        intra_op_threads=1,
    )
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, name="convserve-live-test", daemon=True)
    thread.start()
    live = LiveServer(host="127.0.0.1", port=port)
    try:
        _wait_until_ready(live, thread)
        yield live
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)
