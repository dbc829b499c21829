"""The BentoML peer: the server a user would pick instead of convserve, written as BentoML 1.4 wants.

One `@bentoml.service` class loads the ONNX model once; one `@bentoml.api(batchable=True)` endpoint
receives the same multipart upload the load generator sends to the service (`POST /predict`, field
`file`, `image/jpeg`) and BentoML's adaptive batcher (its "cork" dispatcher) hands it a list of the
queued uploads. The endpoint decodes them with Pillow, applies the model's own eval transform (read
from the model's contract metadata, as the service does) and runs ONNX Runtime once on the batch;
each upload gets a top-5 JSON answer shaped like the service's. Same ONNX file, same ONNX Runtime and
Pillow versions, same preprocessing quality: the comparison is about serving.

It runs from its own virtualenv (`make peers`, benchmarks/peers/bentoml-requirements.txt) with the
repository root on PYTHONPATH, from the repository root:

    PEER_MODEL_FILE=models/<name>/<version>/model.onnx \\
        .venv/peers/bentoml/bin/bentoml serve benchmarks.peers.bento_service:ImageClassifier \\
        --host 127.0.0.1 --port 3000

The benchmark starts it that way (`benchmarks.performance.subjects.bento_process`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
from PIL import Image

from benchmarks.peers.onnx_classifier import OnnxClassifier, answer
from benchmarks.peers.peer_venv import MODEL_FILE_VARIABLE

MAX_BATCH_SIZE = 32
"""The service's default `CONVSERVE_MAX_BATCH_SIZE`: both batch at most as many images."""
MAX_LATENCY_MS = 5_000
"""BentoML's latency budget. It is also the dispatcher's shedding bound (a queued request whose
estimated finish passes it gets a 503) and scales the waits it trains itself with at start-up: 1 s
would shed at 64 clients on two cores (~0.7 s of queue), its 60 s default holds start-up requests for
seconds. The service sheds nothing before its 30 s deadline, so the peer must not either at the
levels measured."""


# One worker (BentoML's default) and one thread for the batched call: ONNX Runtime already spreads a
# batch over every core, as in the service's default. BentoML's maintainers advise against a worker per
# core when the framework threads over all cores itself: on two cores a second worker would load a
# second model, batch on its own (half the batch size under load) and run two intra-op pools on the
# same two cores. The 60 s timeout is the load generator's own, so neither side gives up first.
@bentoml.service(workers=1, threads=1, traffic={"timeout": 60})
class ImageClassifier:
    def __init__(self) -> None:
        self.classifier = OnnxClassifier.load(Path(os.environ[MODEL_FILE_VARIABLE]))
        # Warm the sizes a batch can take at both ends, so the first requests measure serving, not
        # ONNX Runtime's first-run allocations (the service warms its model before it is ready too).
        height, width = self.classifier.metadata.eval_spec.input_size
        for size in (1, MAX_BATCH_SIZE):
            self.classifier.classify([Image.new("RGB", (width, height))] * size)

    # The parameter is named `file` because it is the multipart field name; with batchable=True BentoML
    # passes the queued uploads as one list and expects one answer per upload, in order. Each client
    # gets its slice of the batch: a one-element JSON list holding the service-shaped answer. Decoding
    # happens here (Pillow opens uploads lazily), in the batch's thread: that is where BentoML puts it
    # for a user who writes the obvious endpoint.
    @bentoml.api(
        route="/predict", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS
    )
    def predict(self, file: list[Image.Image]) -> list[dict[str, Any]]:
        predictions = self.classifier.classify(file)
        return [answer(row, self.classifier.model) for row in predictions]
