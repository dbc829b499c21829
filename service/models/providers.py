"""Which requested ONNX Runtime execution providers can be created here, and ORT's reason when not.

ORT falls back from a provider it cannot create (CUDA without its libraries, or without a GPU) to the
next one silently, and says why only in its native log on file descriptor 2. Redirecting the server's
fd 2 to read that line would swallow whatever every other thread writes meanwhile (a hot swap happens
while requests are served and logged), so a short-lived child process creates a session with the
requested providers instead, and its stderr is read. The child imports only onnxruntime (~0.5 s);
its answer is cached per provider list for the life of the process, since whether CUDA can be created
does not change between model loads. A child that crashes or hangs counts as the GPU being unusable,
so a broken driver takes down the probe, not the server; a child that could not create any session
(an unreadable file) says nothing about the providers and is not cached.
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

# The child's whole program: it creates the session and prints the providers it really got.
_PROBE = """
import json, sys
import onnxruntime as ort
requested = [(name, options) for name, options in json.loads(sys.argv[2])]
session = ort.InferenceSession(sys.argv[1], providers=requested)
print(json.dumps(session.get_providers()))
"""

# ORT's native log lines (onnxruntime 1.27-1.31) look like
#   "\x1b[0;93m<timestamp> [W:onnxruntime:Default, file.cc:12 fn] message\x1b[m"
# and errors put the C++ location first: "/src/x.cc:12 fn() [ONNXRuntimeError] : 1 : FAIL : message".
# tests/service/test_runtime.py fails when this no longer yields a clean reason.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_LOG_PREFIX = re.compile(r"^.*?\[[EW]:onnxruntime:[^\]]*\]\s*")
_ORT_ERROR_PREFIX = re.compile(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ")


def failure_reason(log_text: str) -> str | None:
    """ORT's errors and provider-creation failures in its native log text, prefixes removed, or None."""
    lines = [line for line in _ANSI.sub("", log_text).splitlines() if line.strip()]
    reasons = [
        _ORT_ERROR_PREFIX.sub("", _ORT_LOG_PREFIX.sub("", line))
        for line in lines
        if "[E:" in line or "Failed to" in line
    ]
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
    """Create a session in a child process and report its providers (uncached)."""
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
    reason = failure_reason(done.stderr)
    last_line = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    try:
        active = tuple(str(name) for name in json.loads(last_line[0])) if last_line else ()
    except json.JSONDecodeError:
        active = ()
    if not active:
        tail = reason or done.stderr.strip()[-500:] or NO_REASON
        failure = f"the provider probe failed (exit code {done.returncode}): {tail}"
        # Exit code 1 is a Python exception (an unreadable file, say); a signal or a hang is the driver.
        return ProviderProbe(without_gpu, failure, conclusive=done.returncode != 1)
    return ProviderProbe(active, None if active[0] == requested[0] else reason or NO_REASON)
