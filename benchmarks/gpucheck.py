"""`make gpu-check`: prove or disprove the CUDA path on the first GPU that appears, in about five minutes.

On a host with an NVIDIA GPU (`nvidia-smi -L` lists one) it runs, in order:

1. the CUDA tests (`tests/service/test_gpu_cuda.py`, which skip without a GPU);
2. builds the GPU image (the Dockerfile's default CUDA + cuDNN runtime base);
3. starts it as the manifests run it: CONVSERVE_REQUIRE_GPU=true, read-only root, /tmp a tmpfs, no
   capabilities, one GPU (GPU_CHECK_DEVICE, default 0), and waits until it is ready (warmed);
4. checks which provider serves the model (`convserve_model_info`), then the CUDA-versus-CPU logits
   on real photos: the served logits against ONNX Runtime on the CPU running the same file, copied
   out of the container;
5. measures img/s at 32 clients (closed loop, JPEG uploads to /predict) while sampling the GPU's
   utilisation with `nvidia-smi`;

and prints one summary line. Without a GPU, or with GPU_CHECK_DRY=1, it runs the same steps in a dry
mode that needs no Docker: the CUDA tests skip, the image build and the GPU utilisation are skipped
with one line each, and a local `python -m service` on the CPU stands in for the container, so that
the parity and throughput code runs end to end. The exit status is 1 when any step failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.http as triton
from PIL import Image
from skimage import data as skimage_data

from benchmarks.common.corpus import build_corpus
from benchmarks.common.loadgen import Window, closed_loop
from benchmarks.common.processes import LOOPBACK, ServerProcess, free_port, python_module_command
from modelcontract import MODEL_FILENAME, EvalTransform, ModelMetadata, complete_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = "tests/service/test_gpu_cuda.py"
IMAGE_TAG = "convserve:gpu-check"
CLIENTS = 32
PARITY_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
LOGIT_TOLERANCE = 0.01
"""Largest |served - CPU| logit accepted, as a fraction of the largest |CPU logit|. cuDNN's
convolutions differ from the CPU's in summation order, and on Ampere and later GPUs ONNX Runtime lets
them use TF32 (10-bit mantissa) by default: differences of about a thousandth of the logits' scale
are normal, a wrong kernel, layout or preprocessing moves them by their whole scale."""
START_TIMEOUT_S = 600.0
"""Longest the container may take to become ready: CUDA context, cuDNN, the probe and the warmup."""


@dataclass
class Report:
    """The steps' lines as they happen, and the figures of the summary line."""

    dry: bool
    failed: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    def line(self, status: str, step: str, detail: str) -> None:
        if status == "FAILED":
            self.failed.append(step)
        print(f"gpu-check: {status:<7} {step}: {detail}", flush=True)

    def summary(self) -> str:
        verdict = "FAIL" if self.failed else "DRY" if self.dry else "PASS"
        figures = " ".join(f"{key}={value}" for key, value in self.figures.items())
        failed = f" failed={','.join(self.failed)}" if self.failed else ""
        return f"gpu-check summary: {verdict} {figures}{failed}"


def gpu_name() -> str | None:
    """The first GPU `nvidia-smi -L` lists, or None without a driver or a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=30)
    lines = [line for line in done.stdout.splitlines() if line.startswith("GPU ")]
    return lines[0] if done.returncode == 0 and lines else None


PYTEST_NOTHING_RAN = 5
"""pytest's exit status when no test ran: without a GPU the CUDA test module skips at collection."""
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$")


def run_cuda_tests(report: Report) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", CUDA_TESTS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines() or ["no output"]
    outcome = lines[-1].strip("= ")
    report.figures["tests"] = outcome.split(" in ")[0].replace(" ", "_").replace(",", "")
    if done.returncode not in (0, PYTEST_NOTHING_RAN):
        report.line("FAILED", "cuda-tests", f"{outcome}\n{done.stdout[-3000:]}{done.stderr[-1000:]}")
    elif "passed" not in outcome:
        reasons = sorted({match[1] for line in lines if (match := _SKIPPED.match(line))})
        report.line("skipped", "cuda-tests", f"{outcome}: {'; '.join(reasons)}")
    else:
        report.line("ok", "cuda-tests", outcome)


def docker(*args: str, timeout_s: float = 120.0) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"docker {args[0]} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


@dataclass(frozen=True)
class Served:
    """A ready server under check and the model file it serves."""

    url: str
    model_file: Path


@contextlib.contextmanager
def gpu_container(report: Report, device: str, workdir: Path) -> Iterator[Served]:
    """The GPU image, run as the manifests run it, ready; removed afterwards."""
    docker("build", "-t", IMAGE_TAG, str(REPO_ROOT), timeout_s=3600.0)
    report.line("ok", "gpu-image", f"built {IMAGE_TAG}")
    name, port = f"convserve-gpu-check-{uuid.uuid4().hex[:8]}", free_port()
    command = ["run", "-d", "--name", name, "--gpus", f"device={device}", "--read-only", "--tmpfs", "/tmp"]
    command += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-p", f"{LOOPBACK}:{port}:8000"]
    command += ["-e", "CONVSERVE_REQUIRE_GPU=true", "-e", "CONVSERVE_PROVIDERS=cuda,cpu"]
    started = time.monotonic()
    docker(*command, IMAGE_TAG)
    try:
        url = f"http://{LOOPBACK}:{port}"
        while not _ready(url):
            running = docker("inspect", "--format", "{{.State.Running}}", name)
            if running != "true" or time.monotonic() - started > START_TIMEOUT_S:
                raise RuntimeError(
                    f"the container never became ready:\n{docker('logs', '--tail', '40', name)}"
                )
            time.sleep(1.0)
        report.figures["startup_s"] = f"{time.monotonic() - started:.1f}"
        report.line("ok", "serve", f"REQUIRE_GPU=true, read-only root, device {device}: ready")
        docker("cp", f"{name}:/opt/convserve/models", str(workdir))
        yield Served(url, _newest_model_file(workdir / "models"))
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


@contextlib.contextmanager
def cpu_process(report: Report, repository: Path, workdir: Path) -> Iterator[Served]:
    """Dry mode: `python -m service` on the CPU stands in for the container."""
    port = free_port()
    env = {
        "CONVSERVE_MODEL_REPOSITORY": str(repository),
        "CONVSERVE_PROVIDERS": "cpu",
        "CONVSERVE_PORT": str(port),
        "CONVSERVE_HOST": LOOPBACK,
        "CONVSERVE_GRPC_PORT": "0",
        "CONVSERVE_MAX_QUEUE_SIZE": str(max(256, 4 * CLIENTS)),
    }
    command = python_module_command("service")
    with ServerProcess("convserve", command, env, port, workdir / "service.log", cwd=REPO_ROOT) as server:
        report.figures["startup_s"] = f"{server.startup_s:.1f}"
        report.line("skipped", "serve", "no GPU: a local CPU process stands in for the REQUIRE_GPU container")
        yield Served(server.url, _newest_model_file(repository))


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _newest_model_file(repository: Path) -> Path:
    for model in sorted(path for path in repository.iterdir() if path.is_dir()):
        versions = complete_versions(model)
        if versions:
            return model / str(versions[-1]) / MODEL_FILENAME
    raise RuntimeError(f"no model with a complete version in {repository}")


def check_provider(report: Report, served: Served) -> None:
    with urllib.request.urlopen(f"{served.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    providers = sorted(set(re.findall(r'convserve_model_info\{[^}]*provider="([^"]*)"', text)))
    report.figures["provider"] = ",".join(providers) or "none"
    if report.dry:
        report.line("ok", "provider", f"{report.figures['provider']} (dry mode: the CPU is expected)")
    elif providers == ["CUDAExecutionProvider"]:
        report.line("ok", "provider", "CUDAExecutionProvider")
    else:
        report.line("FAILED", "provider", f"expected CUDAExecutionProvider, the service reports {providers}")


def check_parity(report: Report, served: Served) -> None:
    """Served logits for real photos against ONNX Runtime on the CPU running the same file."""
    cpu = ort.InferenceSession(str(served.model_file), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(cpu.get_modelmeta().custom_metadata_map, str(served.model_file))
    transform = EvalTransform.from_spec(metadata.eval_spec, metadata.input_dtype)
    photos = [
        Image.fromarray(np.asarray(getattr(skimage_data, n)(), np.uint8)).convert("RGB")
        for n in PARITY_PHOTOS
    ]
    batch = np.stack([transform(photo) for photo in photos])
    expected = cpu.run([metadata.output_name], {cpu.get_inputs()[0].name: batch})[0]
    name, version = served.model_file.parent.parent.name, served.model_file.parent.name
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    try:
        model = client.get_model_metadata(name, version)
        tensor = triton.InferInput(
            model["inputs"][0]["name"], list(batch.shape), model["inputs"][0]["datatype"]
        )
        tensor.set_data_from_numpy(batch)
        answer = client.infer(name, [tensor], model_version=version)
        logits = answer.as_numpy(model["outputs"][0]["name"])
    finally:
        client.close()
    worst = float(np.max(np.abs(logits - expected)))
    allowed = LOGIT_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    same_top1 = int(np.sum(np.argmax(logits, 1) == np.argmax(expected, 1)))
    report.figures["max_abs_logit_diff"] = f"{worst:.2g}"
    report.figures["top1_agree"] = f"{same_top1}/{len(photos)}"
    detail = (
        f"{len(photos)} photos, max |served - CPU| = {worst:.3g} (<= {allowed:.3g}), "
        f"top-1 {same_top1}/{len(photos)}"
    )
    ok = worst <= allowed and same_top1 == len(photos)
    report.line("ok" if ok else "FAILED", "parity", detail)


class GpuSampler:
    """`nvidia-smi`'s utilisation of one GPU, sampled every half second on a thread."""

    def __init__(self, device: str) -> None:
        self._device = device
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        query = [
            "nvidia-smi",
            "-i",
            self._device,
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.wait(0.5):
            done = subprocess.run(query, capture_output=True, text=True, check=False, timeout=10)
            with contextlib.suppress(ValueError):
                self._samples.append(float(done.stdout.strip().splitlines()[0]))

    @property
    def mean(self) -> float | None:
        return sum(self._samples) / len(self._samples) if self._samples else None


def measure_throughput(report: Report, served: Served, seconds: float, device: str) -> None:
    window = Window(duration_s=seconds, warmup_s=min(5.0, seconds / 4))
    sampler = GpuSampler(device) if not report.dry else contextlib.nullcontext()
    with sampler:
        run = asyncio.run(closed_loop(f"{served.url}/predict", build_corpus(), CLIENTS, window))
    result = run.result()
    report.figures["img_per_s"] = f"{result.img_per_s:.1f}"
    report.figures["p99_ms"] = f"{result.latency_ms.get('p99_ms') or float('nan'):.0f}"
    status = "ok" if result.ok and not result.errors else "FAILED"
    report.line(
        status, "throughput", f"{CLIENTS} clients, {result.img_per_s:.1f} img/s, {result.errors} errors"
    )
    if isinstance(sampler, GpuSampler) and sampler.mean is not None:
        report.figures["gpu_util_pct"] = f"{sampler.mean:.0f}"
        report.line("ok", "gpu-utilization", f"{sampler.mean:.0f} % mean over the window")
    else:
        report.figures["gpu_util_pct"] = "n/a"
        report.line("skipped", "gpu-utilization", "no GPU to sample (dry mode)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpucheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("GPU_CHECK_SECONDS", "30")),
        help="measured window of the throughput step, in seconds (GPU_CHECK_SECONDS; default 30)",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=REPO_ROOT / "models",
        help="dry mode only: the repository the local CPU service serves (default: models/)",
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("GPU_CHECK_DEVICE", "0"),
        help="the GPU given to the container, as nvidia-smi numbers it (GPU_CHECK_DEVICE; default 0)",
    )
    args = parser.parse_args(argv)
    gpu = None if os.environ.get("GPU_CHECK_DRY") == "1" else gpu_name()
    report = Report(dry=gpu is None)
    report.figures["mode"] = "dry" if gpu is None else "gpu"
    report.line("ok", "host", gpu or "no GPU (or GPU_CHECK_DRY=1): dry mode, GPU steps are skipped")
    run_cuda_tests(report)
    if report.dry:
        report.line("skipped", "gpu-image", "no GPU: the GPU image is not built (dry mode needs no Docker)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        try:
            serving = (
                cpu_process(report, args.model_repository.resolve(), Path(tmp))
                if report.dry
                else gpu_container(report, args.device, Path(tmp))
            )
            with serving as served:
                check_provider(report, served)
                check_parity(report, served)
                measure_throughput(report, served, args.seconds, args.device)
        except Exception as exc:  # one visible line with the reason, then the summary: never a traceback only
            report.line("FAILED", "aborted", f"{type(exc).__name__}: {exc}")
    print(report.summary(), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
