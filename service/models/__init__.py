"""Models on disk and in memory: the repository, ONNX Runtime sessions, the registry of served versions."""
