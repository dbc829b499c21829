"""convserve's inference service: FastAPI + ONNX Runtime with dynamic batching (`python -m service`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("convserve")
except PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "0.0.0+unknown"
