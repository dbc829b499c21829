"""Embeddings served: `/predict?embedding=true`, the V2 `embedding` output over REST and gRPC, and the
predictor's `embed_images`, all through the one dynamic batcher, from the real tiny model.

The tiny LeNet-5 is exported by the real exporter, so it carries the `embedding` output; `plain` is
the same file with that output and its metadata removed, as a model exported before embeddings (or
imported) is, and stands for every model without one. Expected rows come from `OnnxModel.run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from modelcontract import EMBEDDING_NAME, FEATURES_NAME, MODEL_FILENAME
from service.errors import BadRequestError, InvalidInputError
from service.inference.batching import DynamicBatcher
from service.inference.predictor import Inputs, ModelOutputs, NamedImage, Predictor
from service.inference.preprocessing import ImagePreprocessor
from service.metrics import Metrics
from service.models.runtime import OnnxModel, load_model
from service.protocols.predict import check_response_budget
from service.protocols.predict import response_bound as predict_bound
from service.protocols.v2codec import (
    FLOAT_JSON_BYTES,
    RequestedOutput,
    TensorSpec,
    encode_infer_response,
    finish_request,
    output_tensors,
    parse_infer_request,
    response_bound,
)
from tests.explainmodel import export_explainable
from tests.liveserver import LiveServer, live_server
from tests.photos import encode, jpeg, photo
from tests.tinymodel import MODEL_NAME, TINY_LABELS, export_tiny_model, tiny_settings
from training.feature_output import drop_output
from training.modelfile import read_metadata, set_metadata

PLAIN = "plain"
"""The tiny model without its embedding output."""
PHOTOS = ("chelsea", "coffee", "astronaut")
HANG_GUARD_S = 30.0  # only stops a broken batcher from hanging the suite; never a speed check


def export_without_embedding(source: Path, version_dir: Path) -> Path:
    """`source` with its embedding output and the metadata's three embedding fields removed."""
    proto = onnx.load(str(source))
    metadata = read_metadata(source)
    drop_output(proto, str(metadata.embedding_output))
    set_metadata(
        proto,
        dataclasses.replace(metadata, embedding_output=None, embedding_size=None, embedding_normalized=None),
    )
    version_dir.mkdir(parents=True)
    onnx.save(proto, str(version_dir / MODEL_FILENAME))
    return version_dir / MODEL_FILENAME


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` (with an embedding) and `plain` (without), version 1 each."""
    root = tmp_path_factory.mktemp("embedding-models")
    source = export_tiny_model(root)
    export_without_embedding(source, root / PLAIN / "1")
    return root


@pytest.fixture(scope="module")
def tiny(repository: Path) -> OnnxModel:
    return load_model(repository / MODEL_NAME / "1" / MODEL_FILENAME, ["CPUExecutionProvider"], 1)


@pytest.fixture(scope="module")
def plain(repository: Path) -> OnnxModel:
    return load_model(repository / PLAIN / "1" / MODEL_FILENAME, ["CPUExecutionProvider"], 1)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(repository, model_name=MODEL_NAME, max_batch_size=4, max_queue_size=16)
    with live_server(settings, grpc=True) as live:
        yield live


@pytest.fixture
def grpc_client(server: LiveServer) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(url=server.grpc_url)
    yield client
    client.close()


def payloads() -> list[bytes]:
    return [jpeg("chelsea"), encode(photo("coffee"), "PNG"), jpeg("astronaut", quality=60)]


def uploads(files: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(files)]


def expected_embeddings(model: OnnxModel, files: list[bytes]) -> np.ndarray:
    """The model's own unit embeddings of the files, preprocessed as the service does."""
    preprocess = ImagePreprocessor.from_metadata(model.metadata)
    _, extra = model.run(np.stack([preprocess(data) for data in files]), {EMBEDDING_NAME})
    return model.metadata.unit_embeddings(extra[EMBEDDING_NAME])


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32)).astype(np.float32)


# ---- /predict ----------------------------------------------------------------------------------------


def test_predict_with_embedding_answers_unit_rows_of_the_declared_size_equal_to_the_models(
    server: LiveServer, tiny: OnnxModel
) -> None:
    files = payloads()
    answer = httpx.post(f"{server.url}/predict?embedding=true&top_k=2", files=uploads(files))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    embeddings = np.asarray(body["embeddings"], dtype=np.float32)
    assert embeddings.shape == (len(files), tiny.metadata.embedding_size)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embeddings, expected_embeddings(tiny, files), atol=1e-5)
    # Each row is its own image's: a different order of the same files reorders the rows.
    swapped = httpx.post(f"{server.url}/predict?embedding=true", files=uploads(files[::-1])).json()
    np.testing.assert_allclose(np.asarray(swapped["embeddings"]), embeddings[::-1], atol=1e-6)

    without = [
        httpx.post(f"{server.url}/predict?top_k=2{flag}", files=uploads(files))
        for flag in ("", "&embedding=false")
    ]
    for plain_answer in without:
        assert plain_answer.status_code == 200
        assert set(plain_answer.json()) == {"model", "predictions"}
        assert plain_answer.json()["predictions"] == body["predictions"]


def test_predict_with_embedding_takes_tensor_rows_too(server: LiveServer, tiny: OnnxModel) -> None:
    tensor = rows(3, seed=4)
    answer = httpx.post(f"{server.url}/predict?embedding=true", json={"inputs": tensor.tolist()})
    assert answer.status_code == 200, answer.text
    _, extra = tiny.run(tensor, {EMBEDDING_NAME})
    np.testing.assert_allclose(np.asarray(answer.json()["embeddings"]), extra[EMBEDDING_NAME], atol=1e-5)


def test_the_predict_bound_holds_for_a_real_answer_with_embeddings(
    server: LiveServer, tiny: OnnxModel
) -> None:
    files = payloads()
    answer = httpx.post(f"{server.url}/predict?embedding=true&top_k=3", files=uploads(files))
    size = tiny.metadata.embedding_size
    assert size is not None
    bound = predict_bound(len(files), 3, TINY_LABELS, size) + len(MODEL_NAME)
    assert len(answer.content) <= bound
    extra = predict_bound(1, 1, TINY_LABELS, size) - predict_bound(1, 1, TINY_LABELS)
    assert extra == 2 + size * FLOAT_JSON_BYTES
    # An embedding wide next to the model's input (4096 floats as JSON, 98 kB, for 12 kB of tensor):
    # refused before inference, saying what to leave out; the same rows without it pass.
    with pytest.raises(InvalidInputError, match=r"embedding=true for 1 rows.*leave out the embeddings"):
        check_response_budget(1, 1, 4096, tiny.metadata)
    check_response_budget(1, 1, 0, tiny.metadata)


def test_a_model_without_an_embedding_refuses_embedding_requests_and_serves_the_rest(
    server: LiveServer, plain: OnnxModel
) -> None:
    refused = httpx.post(f"{server.url}/predict?model={PLAIN}&embedding=true", files=uploads(payloads()[:1]))
    assert refused.status_code == 422
    message = refused.json()["error"]
    assert "'embedding'" in message and "python -m training export" in message
    served = httpx.post(f"{server.url}/predict?model={PLAIN}", files=uploads(payloads()[:1]))
    assert served.status_code == 200 and set(served.json()) == {"model", "predictions"}

    with pytest.raises(
        InvalidInputError, match=r"model 'plain' version 1 .*no 'embedding' output.*re-export"
    ):
        plain.run(rows(1), {EMBEDDING_NAME})


# ---- V2 REST and gRPC ------------------------------------------------------------------------------------


def test_v2_metadata_lists_the_embedding_output_only_for_a_model_that_has_one(
    server: LiveServer,
    tiny: OnnxModel,
    triton_client: Callable[[LiveServer], triton.InferenceServerClient],
    grpc_client: triton_grpc.InferenceServerClient,
) -> None:
    declared = {"name": EMBEDDING_NAME, "datatype": "FP32", "shape": [-1, tiny.metadata.embedding_size]}
    client = triton_client(server)
    assert declared in client.get_model_metadata(MODEL_NAME)["outputs"]
    assert [o["name"] for o in client.get_model_metadata(PLAIN)["outputs"]] == ["logits"]
    over_grpc = grpc_client.get_model_metadata(MODEL_NAME, as_json=True)["outputs"]
    assert {
        "name": EMBEDDING_NAME,
        "datatype": "FP32",
        "shape": [str(d) for d in declared["shape"]],
    } in over_grpc
    config = client.get_model_config(MODEL_NAME)["output"]
    assert {
        "name": EMBEDDING_NAME,
        "data_type": "TYPE_FP32",
        "dims": [tiny.metadata.embedding_size],
    } in config


@pytest.mark.parametrize("binary", [True, False])
def test_v2_rest_answers_the_embedding_asked_for_by_name(
    server: LiveServer,
    tiny: OnnxModel,
    triton_client: Callable[[LiveServer], triton.InferenceServerClient],
    binary: bool,
) -> None:
    tensor = rows(2, seed=1)
    logits, extra = tiny.run(tensor, {EMBEDDING_NAME})
    infer_input = triton.InferInput("input", list(tensor.shape), "FP32")
    infer_input.set_data_from_numpy(tensor, binary_data=binary)
    client = triton_client(server)
    outputs = [
        triton.InferRequestedOutput(EMBEDDING_NAME, binary_data=binary),
        triton.InferRequestedOutput("logits", binary_data=binary),
    ]
    result = client.infer(MODEL_NAME, [infer_input], outputs=outputs)
    np.testing.assert_allclose(result.as_numpy(EMBEDDING_NAME), extra[EMBEDDING_NAME], atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    only = client.infer(MODEL_NAME, [infer_input], outputs=outputs[:1])
    assert [o["name"] for o in only.get_response()["outputs"]] == [EMBEDDING_NAME]
    # Without `outputs`, the answer is what it always was: the class scores alone.
    default = client.infer(MODEL_NAME, [infer_input])
    assert [o["name"] for o in default.get_response()["outputs"]] == ["logits"]


def test_v2_rest_embedding_of_encoded_images_matches_predict(
    server: LiveServer, triton_client: Callable[[LiveServer], triton.InferenceServerClient]
) -> None:
    files = payloads()
    predicted = httpx.post(f"{server.url}/predict?embedding=true", files=uploads(files)).json()["embeddings"]
    images = triton.InferInput("image", [len(files)], "BYTES")
    images.set_data_from_numpy(np.array(files, dtype=np.object_))
    result = triton_client(server).infer(
        MODEL_NAME, [images], outputs=[triton.InferRequestedOutput(EMBEDDING_NAME)]
    )
    np.testing.assert_allclose(result.as_numpy(EMBEDDING_NAME), np.asarray(predicted), atol=1e-6)


def test_v2_grpc_answers_the_embedding_asked_for_by_name(
    grpc_client: triton_grpc.InferenceServerClient, tiny: OnnxModel
) -> None:
    tensor = rows(3, seed=2)
    _, extra = tiny.run(tensor, {EMBEDDING_NAME})
    infer_input = triton_grpc.InferInput("input", list(tensor.shape), "FP32")
    infer_input.set_data_from_numpy(tensor)
    result = grpc_client.infer(
        MODEL_NAME, [infer_input], outputs=[triton_grpc.InferRequestedOutput(EMBEDDING_NAME)]
    )
    np.testing.assert_allclose(result.as_numpy(EMBEDDING_NAME), extra[EMBEDDING_NAME], atol=1e-5)
    assert result.as_numpy("logits") is None  # exactly what was asked for


def test_v2_embedding_of_a_model_without_one_is_refused_over_rest_and_grpc(
    server: LiveServer,
    triton_client: Callable[[LiveServer], triton.InferenceServerClient],
    grpc_client: triton_grpc.InferenceServerClient,
) -> None:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}],
        "outputs": [{"name": EMBEDDING_NAME}],
    }
    refused = httpx.post(f"{server.url}/v2/models/{PLAIN}/infer", json=body)
    assert refused.status_code == 400
    assert "unknown output 'embedding'" in refused.json()["error"]
    assert "re-export" in refused.json()["error"]
    infer_input = triton_grpc.InferInput("input", [1, 3, 32, 32], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="unknown output 'embedding'") as caught:
        grpc_client.infer(PLAIN, [infer_input], outputs=[triton_grpc.InferRequestedOutput(EMBEDDING_NAME)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


# ---- the codec ---------------------------------------------------------------------------------------------

SPEC = TensorSpec(
    "input", (3, 2, 2), "logits", ("a", "b", "c"), max_rows=8, extra_outputs=((EMBEDDING_NAME, 5),)
)


def header(outputs: list[dict[str, Any]]) -> bytes:
    entry = {"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12}
    return json.dumps({"inputs": [entry], "outputs": outputs}).encode()


def test_outputs_are_asked_for_by_name_once_and_classification_only_ranks_classes() -> None:
    parsed = parse_infer_request(header([{"name": EMBEDDING_NAME}, {"name": "logits"}]), None, SPEC)
    assert [o.name for o in parsed.outputs] == [EMBEDDING_NAME, "logits"]
    assert parsed.inputs.outputs == {EMBEDDING_NAME}  # the model fetches it; the class scores always
    assert parse_infer_request(header([]), None, SPEC).inputs.outputs == frozenset()
    for outputs, message in (
        ([{"name": EMBEDDING_NAME}, {"name": EMBEDDING_NAME}], "requested twice"),
        ([{"name": EMBEDDING_NAME, "parameters": {"classification": 2}}], "classification ranks classes"),
        ([{"name": "features"}], "unknown output 'features'"),
    ):
        with pytest.raises(BadRequestError, match=message):
            parse_infer_request(header(outputs), None, SPEC)


def test_the_v2_budget_counts_the_embedding_width() -> None:
    wide = dataclasses.replace(SPEC, extra_outputs=((EMBEDDING_NAME, 5000),))
    inputs = Inputs(tensor=np.zeros((1, 3, 2, 2), np.float32))
    # 5000 values: 20 kB binary fits the 64 KiB slack; 120 kB of JSON does not.
    assert finish_request(None, inputs, [RequestedOutput(EMBEDDING_NAME, binary=True)], False, wide)
    with pytest.raises(InvalidInputError, match="binary_data"):
        finish_request(None, inputs, [RequestedOutput(EMBEDDING_NAME, binary=False)], False, wide)


@pytest.mark.parametrize("binary", [True, False])
def test_the_v2_bound_covers_an_embedding_of_the_longest_json_floats(binary: bool) -> None:
    extreme = np.full((2, 5), -1.1754944e-38, dtype=np.float32)  # the longest repr a float32 gets
    logits = np.zeros((2, 3), np.float32)
    outputs = [RequestedOutput(EMBEDDING_NAME, binary), RequestedOutput("logits", binary)]
    request = finish_request("x", Inputs(tensor=np.zeros((2, 3, 2, 2), np.float32)), outputs, False, SPEC)
    body, _ = encode_infer_response(
        model_name="tiny",
        model_version="1",
        request=request,
        outputs=output_tensors(request, ModelOutputs(logits, {EMBEDDING_NAME: extreme}), SPEC.labels),
    )
    assert len(body) <= response_bound(request, SPEC) + len("tiny1")


# ---- the batcher and the predictor -------------------------------------------------------------------------


def test_a_batch_mixing_plain_and_embedding_requests_fetches_it_once_and_gives_each_its_own(
    tiny: OnnxModel,
) -> None:
    """Three requests fill a batch of four at once (the delay is a minute away): one run fetching
    the embedding, the plain request receiving only its outputs; then a request of eight rows is
    split over two batches and its embedding reassembled in order."""
    runs: list[tuple[int, frozenset[str]]] = []

    def infer(batch: np.ndarray, extra: frozenset[str] = frozenset()) -> Any:
        runs.append((len(batch), extra))
        return tiny.run(batch, extra) if extra else tiny.run(batch)

    plain_rows, first_rows, second_rows, split_rows = rows(2, 1), rows(1, 2), rows(1, 3), rows(8, 4)

    async def scenario() -> tuple[Any, ...]:
        batcher = DynamicBatcher(infer, max_batch_size=4, max_queue_delay_s=60.0, max_queue_size=8)
        await batcher.start()
        deadline = time.monotonic() + HANG_GUARD_S
        wanted = frozenset({EMBEDDING_NAME})
        try:
            with batcher.reserve(2) as a, batcher.reserve(1) as b, batcher.reserve(1) as c:
                mixed = await asyncio.gather(
                    a.submit(plain_rows, deadline),
                    b.submit_with(first_rows, deadline, wanted),
                    c.submit_with(second_rows, deadline, wanted),
                )
            with batcher.reserve(8) as split:
                return (*mixed, await split.submit_with(split_rows, deadline, wanted))
        finally:
            await batcher.close(timeout_s=5)

    plain_out, first, second, split = asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))
    assert runs[0] == (4, frozenset({EMBEDDING_NAME}))
    assert runs[1:] == [(4, frozenset({EMBEDDING_NAME}))] * 2
    assert isinstance(plain_out, np.ndarray)
    np.testing.assert_allclose(plain_out, tiny.run(plain_rows), rtol=1e-5, atol=1e-5)
    for (outputs, extra), sent in ((first, first_rows), (second, second_rows), (split, split_rows)):
        assert set(extra) == {EMBEDDING_NAME}
        reference_logits, reference = tiny.run(sent, {EMBEDDING_NAME})
        np.testing.assert_allclose(outputs, reference_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(extra[EMBEDDING_NAME], reference[EMBEDDING_NAME], rtol=1e-5, atol=1e-5)


def test_a_batch_fetches_the_union_of_the_outputs_asked_for_and_each_request_gets_its_own(
    tmp_path: Path,
) -> None:
    seeing = load_model(export_explainable(tmp_path / "seeing" / "1"), ["CPUExecutionProvider"], 1)
    runs: list[frozenset[str]] = []

    def infer(batch: np.ndarray, extra: frozenset[str] = frozenset()) -> Any:
        runs.append(extra)
        return seeing.run(batch, extra) if extra else seeing.run(batch)

    asked: tuple[frozenset[str], ...] = (frozenset(), frozenset({FEATURES_NAME}), frozenset({EMBEDDING_NAME}))
    sent = [rows(1, seed) for seed in range(len(asked))]

    async def scenario() -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        batcher = DynamicBatcher(infer, max_batch_size=3, max_queue_delay_s=60.0, max_queue_size=3)
        await batcher.start()
        deadline = time.monotonic() + HANG_GUARD_S
        try:
            reservations = [batcher.reserve(1) for _ in asked]
            return await asyncio.gather(
                *(
                    r.submit_with(x, deadline, names)
                    for r, x, names in zip(reservations, sent, asked, strict=True)
                )
            )
        finally:
            await batcher.close(timeout_s=5)

    results = asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))
    assert runs == [frozenset({FEATURES_NAME, EMBEDDING_NAME})]
    for (logits, extra), x, names in zip(results, sent, asked, strict=True):
        assert set(extra) == names
        reference_logits, reference = seeing.run(x, names)
        np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-5)
        for name in names:
            np.testing.assert_allclose(extra[name], reference[name], rtol=1e-5, atol=1e-5)


def _embed(
    model: OnnxModel, repository: Path, images: list[NamedImage]
) -> tuple[np.ndarray | Exception, int]:
    """`Predictor.embed_images` of a predictor of `model`: the rows (or the error), and the images
    still admitted afterwards."""

    async def scenario() -> tuple[np.ndarray | Exception, int]:
        settings = tiny_settings(repository)
        metrics = Metrics(CollectorRegistry(), settings.max_batch_size).for_model("m", 1)
        with ThreadPoolExecutor(2) as decode:
            predictor = await Predictor.start(model.metadata, model.run, settings, metrics, decode)
            try:
                result: np.ndarray | Exception = await predictor.embed_images(images, time.monotonic() + 30)
            except InvalidInputError as exc:
                result = exc
            finally:
                await predictor.close()
            return result, predictor.batcher.queued_images

    return asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))


def test_embed_images_gives_unit_rows_in_order_and_refuses_what_it_cannot_embed(
    tiny: OnnxModel, plain: OnnxModel, repository: Path
) -> None:
    files = payloads()
    images = [NamedImage(f"{i}.img", data) for i, data in enumerate(files)]
    embedded, left = _embed(tiny, repository, images)
    assert isinstance(embedded, np.ndarray) and left == 0
    assert embedded.dtype == np.float32 and embedded.shape == (3, tiny.metadata.embedding_size)
    np.testing.assert_allclose(embedded, expected_embeddings(tiny, files), atol=1e-5)

    refused, left = _embed(plain, repository, images)
    assert isinstance(refused, InvalidInputError) and "no 'embedding' output" in str(refused) and left == 0
    broken, left = _embed(tiny, repository, [*images[:1], NamedImage("broken.jpg", b"not an image")])
    assert isinstance(broken, InvalidInputError) and "broken.jpg" in str(broken)
    assert left == 0  # the admitted room is given back when a decode fails
