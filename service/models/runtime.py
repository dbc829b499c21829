"""ONNX Runtime: one inference session for one model, GPU first and CPU as the fallback.

This module knows nothing about batching or HTTP: it loads a file, says which execution provider is
really active (ORT falls back silently, so `service.models.providers` probes a GPU provider first,
with one real inference, and the session is asked), and runs NCHW batches of the dtype its metadata
says (`input_dtype`: normalized float32 rows, or uint8 pixels the graph normalizes). A graph whose
batch axis is a fixed number (an imported model exported for batch 1, say) is served too: it says the
largest batch it takes (`batch_limit`) and pads a smaller batch to its size. On a GPU it also says
which batch sizes to form (`batch_sizes`, see `service.models.gpu`), and it notices a session that
leaves the GPU while serving instead of letting ORT switch it to the CPU unseen.

Besides the logits, a model may have the named outputs its metadata declares (`extra_outputs`): its
last feature map (`explain_output`) and its image embedding (`embedding_output`). A run fetches those
it is asked for (`run(batch, extra={...})`), which the graph computes on its way to the logits anyway;
a run that asks for none fetches only the logits, as it always did. An explainable model also
keeps the head's weights, read from the file's initializer at load, to turn a feature map into class
activation maps (`class_maps`).

On CUDA a batch goes through ONNX Runtime's IO binding (`_BoundInputs`): the input is copied into a
device OrtValue kept per thread and batch shape, and the outputs are bound to the CPU. On the CPU,
`session.run` is kept: it reads the numpy batch in place, so binding has nothing to save there.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

from modelcontract import FLOAT32, UINT8, MetadataError, ModelMetadata, class_activation_maps
from service.errors import InvalidInputError, StartupError
from service.models.gpu import GpuOptions, gpu_batch_sizes, refusal
from service.models.providers import probe_providers
from service.priority import yield_to_the_event_loop
from service.settings import CPU_PROVIDER, CUDA_PROVIDER, GPU_PROVIDERS

logger = logging.getLogger(__name__)

_ORT_INPUT_TYPES = {FLOAT32: "tensor(float)", UINT8: "tensor(uint8)"}
"""ONNX Runtime's name of the input element type each metadata `input_dtype` promises."""


def provider_options(name: str, device_id: int = 0) -> dict[str, Any]:
    """Options for one execution provider, chosen so the first requests do not stall."""
    if name == CUDA_PROVIDER:
        return {
            "device_id": device_id,
            # The default EXHAUSTIVE search benchmarks every cuDNN algorithm on each new input shape:
            # hundreds of ms for the first request of each batch size. HEURISTIC picks one at once.
            "cudnn_conv_algo_search": "HEURISTIC",
            # Grow the GPU memory arena by what is asked, not by powers of two, so memory tracks need.
            "arena_extend_strategy": "kSameAsRequested",
        }
    return {}


_shared_arena_lock = threading.Lock()


def share_cpu_arena() -> None:
    """Register one CPU memory arena for the whole process, which every session then allocates from.

    By default each session grows an arena of its own to its largest batch (the batch-32 warmup of
    EfficientNet-Lite0: ~290 MB) and never gives it back, so every extra model or version cost that
    much again, idle or not. Sessions that opt into the shared arena (`session.use_env_allocators`)
    reuse one, which grows only to what runs at once: measured with 4 copies of that model, ~20 MB per
    extra model instead of ~290; in interleaved A/B runs of the service the throughput at 32 clients
    stayed within 2 % and the p99 at 1 and 32 clients did not rise.
    The arena grows by what is asked (not by powers of two), so memory tracks the largest batch. Safe to
    call more than once; ONNX Runtime's arena is shared by threads and sessions alike.
    """
    with _shared_arena_lock:  # two threads loading models at once must not both register it
        _register_shared_arena()


@functools.cache
def _register_shared_arena() -> None:
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"arena_extend_strategy": 1}))


def session_options(intra_op_threads: int, spin: bool = False) -> ort.SessionOptions:
    """Session options for a server, on the process's shared CPU arena.

    `spin`: the intra-op threads wait for the next operator spinning rather than asleep, and stop
    when the run returns: for the session a lone batch runs on (`service.models.threads`)."""
    share_cpu_arena()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    # ORT's worker threads spin after each operator by default; on a small CPU that spinning steals
    # the cores image decoding needs between batches. A lone batch has nothing to steal from, and
    # waking a sleeping thread ~60 times per image cost it 1.1 ms of 5.2 (EfficientNet-Lite0, 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:  # not after the run: the next batches and the decode threads get the cores back at once
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


@dataclass
class OnnxModel:
    """A loaded model: its session, the provider actually running it, and its metadata."""

    session: ort.InferenceSession
    metadata: ModelMetadata
    path: Path
    input_name: str
    output_name: str
    provider_failure: str | None
    """Why the first requested provider is not active (ORT's own words), or None if it is."""
    fixed_batch_size: int | None = None
    """The batch size the graph's input is fixed to, or None when its batch axis is symbolic."""
    gpu: GpuOptions = field(default_factory=GpuOptions)
    gpu_lost: str | None = None
    """Why this model refuses every batch (its GPU failed while serving, under REQUIRE_GPU), or None."""
    left_gpu: str | None = None
    """ONNX Runtime's reason when the session failed on the GPU while serving, or None."""
    explain_weights: np.ndarray | None = field(default=None, repr=False)
    """The head's weights [num_classes, C] when the graph outputs its feature map, else None."""
    lone_session: ort.InferenceSession | None = field(default=None, repr=False)
    """A second CPU session of the file, on every core with spinning threads, for a batch that runs
    alone (`run(batch, alone=True)`); None: every batch runs on `session`."""
    bind_device: str | None = None
    """ONNX Runtime device ("cuda", or "cpu" to test the path) batches are bound to (`_BoundInputs`),
    or None to run them with `session.run`; `load_model` sets "cuda" for a session on CUDA."""
    _fallback_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bound: _BoundInputs | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bind_device is not None:
            self._bound = _BoundInputs(self.bind_device, self.gpu.device_id)

    @property
    def active_provider(self) -> str:
        return str(self.session.get_providers()[0])

    @property
    def on_gpu(self) -> bool:
        return self.active_provider in GPU_PROVIDERS

    def batch_limit(self, max_batch_size: int) -> int:
        """The largest batch to form for this model: `max_batch_size`, or less if the graph's is fixed."""
        return min(max_batch_size, self.fixed_batch_size or max_batch_size)

    def batch_sizes(self, max_batch_size: int) -> tuple[int, ...] | None:
        """The only batch sizes to form for this model, or None for any size up to the limit.

        On a GPU: `gpu_batch_sizes`, so every shape run was warmed. A fixed batch axis runs one shape
        whatever the batch (`run` pads), and a CPU does not care, so neither restricts the sizes.
        """
        if not self.on_gpu or self.fixed_batch_size is not None:
            return None
        return gpu_batch_sizes(self.batch_limit(max_batch_size))

    @property
    def explainable(self) -> bool:
        return self.explain_weights is not None

    def check_explainable(self) -> None:
        """`InvalidInputError` (4xx) saying why, when this model cannot make class activation maps."""
        if self.explain_weights is None:
            raise InvalidInputError(
                f"model {self.label} ({self.metadata.backbone}) has no feature-map output, so it "
                "cannot explain its answers; re-export it with `python -m training export` (models "
                "imported with `convserve import`, and LeNet-5, have none), or use /predict"
            )

    def class_maps(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The class activation maps [len(classes), h, w] of one image's feature map [C, h, w]."""
        self.check_explainable()
        assert self.explain_weights is not None
        return class_activation_maps(features, self.explain_weights, classes)

    @property
    def label(self) -> str:
        """The model and version this file is served as (its repository directories), for messages."""
        return f"{self.path.parent.parent.name!r} version {self.path.parent.name}"

    @overload
    def run(self, batch: np.ndarray, extra: None = None, alone: bool = False) -> np.ndarray: ...
    @overload
    def run(
        self, batch: np.ndarray, extra: Collection[str], alone: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...
    def run(
        self, batch: np.ndarray, extra: Collection[str] | None = None, alone: bool = False
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Outputs [N, num_classes] for a batch [N, C, H, W] of the metadata's `input_dtype`; blocking,
        call it off the event loop.

        `extra` names outputs of `extra_outputs` to fetch too: (outputs, {name: rows [N, ...]});
        `InvalidInputError` (before any work) for a name this model lacks.
        `alone=True`: nothing else is computing, so the batch may take every core (`lone_session`).
        """
        wanted = [] if extra is None else sorted(extra)
        check_outputs(self.metadata, wanted, f"model {self.label}")
        rows = len(batch)
        fixed = self.fixed_batch_size
        if fixed is not None and rows != fixed:
            if rows > fixed:
                raise ValueError(f"{self.path} takes batches of at most {fixed} rows, got {rows}")
            # ONNX Runtime refuses any other size on a fixed axis: fill the rest with zero rows.
            padded = np.zeros((fixed, *batch.shape[1:]), dtype=batch.dtype)
            padded[:rows] = batch
            batch = padded
        if self.gpu_lost is not None:
            raise RuntimeError(self.gpu_lost)
        names = [self.output_name, *wanted]
        session = self.lone_session if alone and self.lone_session is not None else self.session
        try:
            if self._bound is not None and session is self.session and self.left_gpu is None:
                fetched = self._bound.run(session, self.input_name, batch, names)
            else:
                fetched = session.run(names, {self.input_name: batch})
        except EPFail as exc:  # only a GPU session raises it: ORT's own fallback is off (load_model)
            self.leave_gpu(f"{type(exc).__name__}: {exc}")
            fetched = self.session.run(names, {self.input_name: batch})
        outputs = np.asarray(fetched[0])[:rows]
        if extra is None:
            return outputs
        return outputs, {
            name: np.asarray(part)[:rows] for name, part in zip(wanted, fetched[1:], strict=True)
        }

    def leave_gpu(self, reason: str) -> None:
        """The GPU failed while serving: log and count it, then refuse (REQUIRE_GPU) or carry on on the CPU.

        ORT would retry a failed run on the CPU by itself and print why to stdout, where no log
        shipper sees it; its fallback is turned off so the decision, and the reason, are made here.
        Raises RuntimeError under REQUIRE_GPU, for this batch and every later one.
        """
        with self._fallback_lock:  # several instances may fail at once: one switch, one log line
            if self.gpu_lost is None and self.left_gpu is None:
                previous = self.active_provider
                logger.error("%s left %s while serving: %s", self.path, previous, reason)
                self.left_gpu = reason
                if self.gpu.on_fallback is not None:
                    self.gpu.on_fallback(reason)
                if self.gpu.require:
                    self.gpu_lost = refusal(
                        f"{previous} failed while serving; this model refuses the CPU", reason
                    )
                else:
                    self.session.set_providers([CPU_PROVIDER])
                    self.provider_failure = reason
                    logger.warning("%s now runs on %s", self.path, self.active_provider)
        if self.gpu_lost is not None:
            raise RuntimeError(self.gpu_lost)

    def warmup(self, batch_sizes: Iterable[int], cancel: threading.Event | None = None) -> float:
        """Run each batch size once so allocations and kernel choices happen before traffic; seconds.

        Setting `cancel` stops after the current size (a shutdown during warmup need not wait for it).
        """
        start = time.perf_counter()
        channels, height, width = self.metadata.input_shape
        runs = [(size, False) for size in batch_sizes]
        if runs and self.lone_session is not None:
            runs.append((1, True))
        for size, alone in runs:
            if cancel is not None and cancel.is_set():
                break
            self.run(np.zeros((size, channels, height, width), dtype=self.metadata.input_dtype), alone=alone)
        return time.perf_counter() - start


class _BoundInputs:
    """Runs a batch through `session.io_binding()`: the input copied into an OrtValue on `device`, kept
    per thread and batch shape and refilled in place, and every output bound to CPU memory.

    Why an OrtValue on the device and not pinned host memory: ONNX Runtime's Python `OrtDevice.make`
    (onnxruntime 1.31) knows device types ("cpu", "cuda", ...) and always gives them their default
    memory, so a 'cuda_pinned' OrtValue cannot be asked for by name; page-locked host memory is only
    reachable through an execution-provider device's `memory_info(OrtDeviceMemoryType.HOST_ACCESSIBLE)`
    (`OrtValue.ortvalue_from_shape_and_type(..., memory_info=...)`, the plugin-EP device API), which
    this does not use until it is measured on a GPU. `OrtValue.update_inplace(batch)` copies the host
    batch into the device OrtValue (one host->device copy, as `session.run` makes), and the binding
    (`IOBinding.bind_ortvalue_input`) runs on it without a further copy or allocation; reusing the
    OrtValue per shape spares a device allocation per batch. On a GPU the batcher forms only
    O(log max) batch sizes (`gpu_batch_sizes`), so the buffers stay few. Per thread, because several
    batches may run at once (`DynamicBatcher` instances) and each needs its own buffer while it runs.
    """

    def __init__(self, device: str, device_id: int) -> None:
        self.device = device
        self.device_id = device_id
        self._local = threading.local()

    def _buffer(self, batch: np.ndarray) -> ort.OrtValue:
        buffers: dict[tuple[tuple[int, ...], str], ort.OrtValue] | None = getattr(
            self._local, "by_shape", None
        )
        if buffers is None:
            buffers = self._local.by_shape = {}
        key = (batch.shape, batch.dtype.str)
        value = buffers.get(key)
        if value is None:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(batch.shape), batch.dtype.type, self.device, self.device_id
            )
            buffers[key] = value
        return value

    def run(
        self, session: ort.InferenceSession, input_name: str, batch: np.ndarray, names: list[str]
    ) -> list[np.ndarray]:
        """`session.run(names, {input_name: batch})`, through the binding."""
        value = self._buffer(batch)
        value.update_inplace(np.ascontiguousarray(batch))
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return [np.asarray(output) for output in binding.copy_outputs_to_cpu()]


def extra_outputs(metadata: ModelMetadata) -> dict[str, tuple[int, str]]:
    """The named outputs `metadata` declares besides the logits, each with its rank and what it holds;
    `load_model` checks the graph has them, so a loaded model can fetch every one."""
    declared = ((metadata.explain_output, 4, "feature map"), (metadata.embedding_output, 2, "embedding"))
    return {name: (rank, what) for name, rank, what in declared if name is not None}


def check_outputs(metadata: ModelMetadata, names: Iterable[str], model: str) -> None:
    """`InvalidInputError` (422) naming `model` ("model 'x' version 1") and the way out, when it lacks
    one of `names`."""
    have = extra_outputs(metadata)
    missing = sorted(set(names) - set(have))
    if missing:
        others = f"besides the logits it has {sorted(have)}" if have else "it has only the logits"
        raise InvalidInputError(
            f"model {model} ({metadata.backbone}) has no {' or '.join(map(repr, missing))} output "
            f"({others}); re-export it with `python -m training export` to get one (models imported with "
            "`convserve import` have none, and LeNet-5 has no feature map)"
        )


def check_gpu(model: OnnxModel, require_gpu: bool) -> None:
    """Refuse to serve on CPU when a GPU was required, quoting why ONNX Runtime fell back."""
    if require_gpu and not model.on_gpu:
        raise StartupError(
            refusal(f"ONNX Runtime is running on {model.active_provider}", model.provider_failure)
        )


def warmup_sizes(model: OnnxModel, max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes worth running before traffic on the active provider.

    On a GPU the CUDA provider picks kernels (cuDNN algorithms) per input shape, so every size the
    batcher can form is run once: `OnnxModel.batch_sizes`, O(log max) of them. On the CPU nothing
    depends on the batch size beyond the memory arena, so the smallest and the largest batch are
    enough: the largest grows the arena to its peak once, the smallest covers the single-image path.
    Measured on EfficientNet-Lite0 here (2 cores): sizes 1 and 32 warm in 1.4 s against 17.8 s for
    1..32, and a batch size that was not warmed (7) runs no slower the first time than the second. A
    graph with a fixed batch runs one shape whatever the batch (`OnnxModel.run` pads), so one size
    warms it.
    """
    largest = model.batch_limit(max_batch_size)
    if model.fixed_batch_size is not None:
        return (largest,)
    return model.batch_sizes(max_batch_size) or tuple(sorted({1, largest}))


_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(count: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas; call before threads start. No-op off glibc.

    Every loaded version brings new threads (its inference thread, ONNX Runtime's intra-op pool),
    and glibc gives threads their own arenas (up to 8 per core), so memory a released version freed
    in one arena is not reused by the next version's threads: RSS climbed ~25 % over 20 swaps here.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, count)


def return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS (after a session is released).

    ONNX Runtime frees a released session's arena with `free`, but glibc keeps most of it in its
    own pools; without this, RSS would only ever grow across model swaps. No-op off glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_model(
    path: Path,
    providers: list[str],
    intra_op_threads: int = 0,
    gpu: GpuOptions | None = None,
    lone_threads: int = 0,
) -> OnnxModel:
    """Create the session (preferring `providers` in order), check the graph against the metadata.

    A GPU provider the probe could not create or run is left out of the request, so ORT does not log
    the same failure again at every load; `provider_failure` keeps the probe's reason for REQUIRE_GPU.
    With `lone_threads` > 1, a model that runs on the CPU gets its `lone_session` on that many threads.
    Call it from a worker thread: that thread, and the session's own threads, run at compute priority.
    """
    yield_to_the_event_loop()
    gpu = gpu or GpuOptions()
    options = session_options(intra_op_threads)
    requested = [(name, provider_options(name, gpu.device_id)) for name in providers]
    probe = probe_providers(path, requested)
    usable = [(name, opts) for name, opts in requested if name in probe.active] or requested[-1:]
    try:
        session = ort.InferenceSession(str(path), options, providers=usable)
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid files
        raise StartupError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    try:
        metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, str(path))
    except MetadataError as exc:
        raise StartupError(str(exc)) from exc
    input_name, output_name, fixed_batch_size = _check_signature(session, metadata, path)
    active = session.get_providers()[0]
    failure = None
    if active != providers[0]:
        failure = probe.failure or (
            f"{providers[0]} was created in a probe process but not for this session; ONNX Runtime's log "
            "on stderr says why"
        )
        logger.warning("%s runs on %s instead of %s: %s", path, active, providers[0], failure)
    if active in GPU_PROVIDERS:
        session.disable_fallback()  # a provider failure while serving reaches OnnxModel.run
    weights = _explain_weights(path, metadata, session) if metadata.explainable else None
    bind_device = "cuda" if active == CUDA_PROVIDER else None
    lone = None
    if active == CPU_PROVIDER and lone_threads > 1:
        lone = ort.InferenceSession(str(path), session_options(lone_threads, spin=True), providers=[active])
    return OnnxModel(
        session,
        metadata,
        path,
        input_name,
        output_name,
        failure,
        fixed_batch_size,
        gpu,
        explain_weights=weights,
        lone_session=lone,
        bind_device=bind_device,
    )


def _explain_weights(path: Path, metadata: ModelMetadata, session: ort.InferenceSession) -> np.ndarray:
    """The head's weights [num_classes, C] the metadata names, checked against the feature map's channels.

    ONNX Runtime does not hand out initializers, so the file is read again with `onnx` (at load, once).
    """
    proto = onnx.load(str(path), load_external_data=False)
    found = [init for init in proto.graph.initializer if init.name == metadata.explain_weights]
    weights = np.asarray(numpy_helper.to_array(found[0]), dtype=np.float32) if found else None
    features = next(o for o in session.get_outputs() if o.name == metadata.explain_output)
    channels = features.shape[1] if len(features.shape) == 4 else None
    if (
        weights is None
        or weights.shape[0] != metadata.num_classes
        or (isinstance(channels, int) and weights.shape[1:] != (channels,))
    ):
        shape = None if weights is None else list(weights.shape)
        raise StartupError(
            f"{path}: the metadata's explain_weights {metadata.explain_weights!r} must be an initializer of "
            f"shape [{metadata.num_classes}, {channels}] (classes x feature channels), got {shape}"
        )
    return weights


def _check_signature(
    session: ort.InferenceSession, metadata: ModelMetadata, path: Path
) -> tuple[str, str, int | None]:
    """The input and output names, and the fixed batch size (None: a symbolic batch axis)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    declared = extra_outputs(metadata)  # besides the logits, each with the rank it promises
    found = {o.name: len(o.shape) for o in outputs}
    for name, (rank, what) in declared.items():
        if found.get(name) != rank:
            raise StartupError(
                f"{path} has outputs {sorted(found)}; its metadata promises a rank-{rank} {what} {name!r}"
            )
    outputs = [o for o in outputs if o.name not in declared]
    if len(inputs) != 1 or len(outputs) != 1:
        raise StartupError(
            f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; expected one image input and one "
            "logits output"
        )
    dims = list(inputs[0].shape)
    expected = list(metadata.input_shape)
    fixed_batch = dims[0] if len(dims) == 4 and isinstance(dims[0], int) else None
    dtype = metadata.input_dtype
    if inputs[0].type != _ORT_INPUT_TYPES[dtype]:
        other = next(
            (name for name, ort_type in _ORT_INPUT_TYPES.items() if ort_type == inputs[0].type), None
        )
        fix = (
            f"the graph takes {other}: re-export it so its metadata says input_dtype {other!r}"
            if other
            else "the service serves float32 or uint8 inputs only"
        )
        raise StartupError(
            f"{path} input {inputs[0].name!r} is {inputs[0].type}, but its metadata's input_dtype says "
            f"{dtype} ({_ORT_INPUT_TYPES[dtype]}); {fix}"
        )
    if len(dims) != 4 or dims[1:] != expected or (fixed_batch is not None and fixed_batch < 1):
        raise StartupError(
            f"{path} input {inputs[0].name!r} is {inputs[0].type} {dims}; the metadata promises {dtype} "
            f"[batch, {expected[0]}, {expected[1]}, {expected[2]}] (batch axis: symbolic or a positive size)"
        )
    classes = outputs[0].shape[-1] if outputs[0].shape else None
    if isinstance(classes, int) and classes != metadata.num_classes:
        raise StartupError(f"{path} outputs {classes} classes but its metadata lists {metadata.num_classes}")
    return inputs[0].name, outputs[0].name, fixed_batch
