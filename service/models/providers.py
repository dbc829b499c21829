"""Which requested ONNX Runtime execution providers work here, and ORT's reason when one does not.

ORT falls back from a provider it cannot create (CUDA without its libraries, or without a GPU) to the
next one silently. It says why in two places: its native log on file descriptor 2, and, when creating
the provider raised, its Python wrapper's "EP Error" lines printed to stdout. Redirecting the server's
descriptors to read them would swallow whatever every other thread writes meanwhile (a hot swap
happens while requests are served and logged), so a short-lived child process creates a session with
the requested providers instead, runs one batch of one zero image through it, and both of its
streams are read. The inference matters: cuDNN is loaded lazily, so a session without it still
reports CUDA and only its first convolution fails. The child imports only onnxruntime and numpy
(~0.5 s); its answer is cached per provider list for the life of the process, since whether CUDA
works does not change between model loads. A child that crashes or hangs counts as the GPU being
unusable, so a broken driver takes down the probe, not the server; a child that could not create or
run any session (an unreadable file, a graph that fails on the CPU too) says nothing about the
providers and is not cached.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import GPU_PROVIDERS

PROBE_TIMEOUT_S = 120.0
"""Longest a provider probe may take (CUDA initialisation included) before it counts as a failure."""
NO_REASON = "ONNX Runtime logged no reason (is a GPU visible to this process?)"

# The child's whole program: it creates the session, runs one image through it with ORT's own
# run-time fallback off (so a provider failure raises instead of silently retrying on the CPU), and
# prints the providers it really got and the run's error as its last stdout line.
_PROBE = """
import json, sys
import numpy as np
import onnxruntime as ort
requested = [tuple(entry) for entry in json.loads(sys.argv[2])]
session = ort.InferenceSession(sys.argv[1], providers=requested)
session.disable_fallback()
run_error = None
image = session.get_inputs()[0]
dtypes = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}  # the input dtypes convserve serves
if image.type in dtypes:
    shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in image.shape]
    try:
        session.run(None, {image.name: np.zeros(shape, dtypes[image.type])})
    except Exception as exc:
        run_error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"active": session.get_providers(), "run_error": run_error}))
"""

# ORT's native log lines (onnxruntime 1.27-1.31) look like
#   "\x1b[0;93m<timestamp> [W:onnxruntime:Default, file.cc:12 fn] message\x1b[m"
# and errors put the C++ location first: "/src/x.cc:12 fn() [ONNXRuntimeError] : 1 : FAIL : message".
# tests/service/test_runtime.py fails when this no longer yields a clean reason.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_LOG_PREFIX = re.compile(r"^.*?\[[EW]:onnxruntime:[^\]]*\]\s*")
_ORT_ERROR_PREFIX = re.compile(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ")


# ORT's Python wrapper (onnxruntime 1.27-1.31) prints a provider that raised while being created as
#   "EP Error <the exception> when using [<providers>]" between two rows of asterisks, on stdout.
_EP_ERROR = re.compile(r"^EP Error:? (?P<reason>.*)$")


def failure_reason(log_text: str) -> str | None:
    """ORT's errors and provider-creation failures in its log text (native log or the wrapper's stdout
    lines), prefixes removed, or None."""
    lines = [line.strip() for line in _ANSI.sub("", log_text).splitlines() if line.strip()]
    reasons = []
    for line in lines:
        wrapper = _EP_ERROR.match(line)
        if wrapper:
            reasons.append(wrapper["reason"])
        elif "[E:" in line or "Failed to" in line or "EP device" in line:  # the last names the device id
            reasons.append(_ORT_ERROR_PREFIX.sub("", _ORT_LOG_PREFIX.sub("", line)))
    return " | ".join(reasons) or None


@dataclass(frozen=True)
class ProviderProbe:
    """What a session asking for the requested providers gets in this environment."""

    active: tuple[str, ...]
    """The providers such a session runs with, in order (never a GPU provider the probe could not create)."""
    failure: str | None
    """Why the first requested provider is not among them (ORT's own words), or None if it is."""
    conclusive: bool = True
    """False when the child could not create a session at all: the file, not the providers, failed."""


_probed: dict[str, ProviderProbe] = {}
_probe_lock = threading.Lock()


def probe_providers(path: Path, requested: Sequence[tuple[str, dict[str, Any]]]) -> ProviderProbe:
    """The providers a session of `path` gets when asking for `requested`, probed once per provider list.

    Without a GPU provider among `requested` there is nothing to probe: they are all taken as usable.
    """
    if not GPU_PROVIDERS & {name for name, _ in requested}:
        return ProviderProbe(tuple(name for name, _ in requested), None)
    key = json.dumps([[name, options] for name, options in requested])
    # One probe at a time, keyed by the provider list only: any model file is as good a probe as another.
    with _probe_lock:
        if key not in _probed:
            probe = run_probe(path, key)
            if not probe.conclusive:
                return probe
            _probed[key] = probe
        return _probed[key]


def run_probe(path: Path, requested_json: str) -> ProviderProbe:
    """Create a session in a child process, run one image, report its providers (uncached)."""
    requested = [name for name, _ in json.loads(requested_json)]
    without_gpu = tuple(name for name in requested if name not in GPU_PROVIDERS)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), requested_json],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ProviderProbe(without_gpu, f"creating {requested[0]} took over {PROBE_TIMEOUT_S:g} s")
    *printed, last_line = done.stdout.strip().splitlines() or [""]
    reason = failure_reason("\n".join([*printed, done.stderr]))
    report = _child_report(last_line) if done.returncode == 0 else None
    if report is None:
        tail = reason or done.stderr.strip()[-500:] or NO_REASON
        failure = f"the provider probe failed (exit code {done.returncode}): {tail}"
        # Exit code 1 is a Python exception (an unreadable file, say); a signal or a hang is the driver.
        return ProviderProbe(without_gpu, failure, conclusive=done.returncode != 1)
    active, run_error = report
    if run_error is not None:
        if active[0] in GPU_PROVIDERS:  # created, but unusable: cuDNN missing, a device fault
            return ProviderProbe(without_gpu, f"a test inference on {active[0]} failed: {run_error}")
        return ProviderProbe(active, f"a test inference failed on {active[0]}: {run_error}", conclusive=False)
    return ProviderProbe(active, None if active[0] == requested[0] else reason or NO_REASON)


def _child_report(line: str) -> tuple[tuple[str, ...], str | None] | None:
    """The child's providers and run error, from its last stdout line; None if it printed no report."""
    try:
        report = json.loads(line)
        active = tuple(str(name) for name in report["active"])
        run_error = report["run_error"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return (active, None if run_error is None else str(run_error)) if active else None
