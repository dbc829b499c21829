"""By hand, once the peer's venv exists (`make peers`): the real BentoML peer on the tiny model.

Not a pytest module: `make test` does not build the peer's venv, and a test that skips without it
would pass without checking anything. Run it after changing the peer or its pins:

    .venv/bin/python -m tests.benchmarks.check_bento_peer

It serves the tiny LeNet through `bentoml serve` from .venv/peers/bentoml (started by the suite's
launcher), uploads real photos as the load generator does, and checks each answer's status, shape,
top-1 and scores against the service's own preprocessing and ONNX Runtime run in this process. Exits
non-zero on the first mismatch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from benchmarks.peers import peer_venv
from benchmarks.peers.onnx_classifier import TOP_K
from modelcontract import ModelMetadata
from service.inference.preprocessing import ImagePreprocessor
from tests.liveserver import LOOPBACK, service_process
from tests.photos import jpeg, large_jpeg
from tests.tinymodel import TINY_LABELS, export_tiny_model

PHOTOS = ("chelsea", "coffee", "astronaut")
"""Sent as is, and upscaled to phone size (decoded at reduced size by both)."""


def expected_scores(model_file: Path, data: bytes) -> np.ndarray:
    """The class probabilities on the service's code path: its preprocessing, then ONNX Runtime."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, str(model_file))
    row = ImagePreprocessor.from_metadata(metadata)(data)
    (outputs,) = session.run([metadata.output_name], {metadata.input_name: row[np.newaxis]})
    return metadata.scores(outputs)[0]


def main() -> None:
    if not peer_venv.is_current(peer_venv.DEFAULT_VENV):
        raise SystemExit(f"{peer_venv.DEFAULT_VENV} is missing or stale: run `make peers` first")
    with tempfile.TemporaryDirectory(prefix="bento-peer-check-") as scratch:
        root = Path(scratch)
        model_file = export_tiny_model(root / "repo")
        with (
            service_process(
                peer_venv.serve_env(model_file, root / "bentoml-home"),
                command=lambda port: peer_venv.serve_command(peer_venv.DEFAULT_VENV, LOOPBACK, port),
                log_path=root / "bento.log",
            ) as peer,
            httpx.Client(base_url=peer.url, timeout=30.0) as client,
        ):
            for name, data in [(n, jpeg(n)) for n in PHOTOS] + [
                (f"{n}-large", large_jpeg(n)) for n in PHOTOS
            ]:
                response = client.post("/predict", files={"file": (f"{name}.jpg", data, "image/jpeg")})
                if response.status_code != 200:
                    raise SystemExit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
                (body,) = response.json()  # BentoML answers a batchable endpoint with the request's slice
                (predictions,) = body["predictions"]
                assert body["model"] == {"name": "tiny", "version": 1}, body["model"]
                assert len(predictions) == min(TOP_K, len(TINY_LABELS)), predictions
                expected = expected_scores(model_file, data)
                assert predictions[0]["index"] == int(expected.argmax()), (name, predictions, expected)
                for prediction in predictions:
                    assert abs(prediction["score"] - expected[prediction["index"]]) < 1e-5, (name, prediction)
                print(f"{name}: 200, top-1 {predictions[0]['label']}, every score as the service computes it")
    print("the BentoML peer answers like the service")


if __name__ == "__main__":
    main()
