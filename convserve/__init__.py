"""The `convserve` command: serve, import an ONNX classifier, predict from the command line, train."""
