"""A stopped `fit` leaves the checkpoint of its last completed epoch and no version; `resume`
continues it to exactly the result of a run that was never stopped.

The runs stop from `on_epoch_end`, which runs right after the epoch's checkpoint is written: one by
raising KeyboardInterrupt (what Ctrl-C raises), one by sending the process a real SIGTERM. Both
stop at a known epoch, so the comparison needs no timing. Augmentation and dropout stay on: the
resumed epochs must replay the same random crops and masks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from modelcontract import MODEL_FILENAME
from tests.training.images import write_image_folder
from training.checkpoint import CHECKPOINT_FILENAME
from training.config import RunConfig
from training.finetune import Progress
from training.pipeline import fit, resume

SETTINGS = {"backbone": "lenet5", "pretrained": False, "image_size": 32, "batch_size": 8,
            "frozen_epochs": 2, "unfrozen_epochs": 2, "unfreeze_blocks": 2, "patience": 5}  # fmt: skip


def _config(data: Path, out: Path) -> RunConfig:
    return RunConfig(data=str(data), out=str(out), **SETTINGS)  # type: ignore[arg-type]


def _history(version: Path) -> list[list[dict]]:
    phases = json.loads((version / "metrics.json").read_text())["phases"]
    return [[{k: v for k, v in e.items() if k != "seconds"} for e in p["epochs"]] for p in phases]


def _stop_after(epochs: int, how: str) -> Callable[[Progress], None]:
    def on_epoch_end(progress: Progress) -> None:
        if sum(len(phase.epochs) for phase in progress.phases) == epochs:
            if how == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: still this epoch
            else:
                raise KeyboardInterrupt

    return on_epoch_end


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("photos"), per_class=8)


@pytest.fixture(scope="module")
def uninterrupted(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit(_config(photo_folder, tmp_path_factory.mktemp("models") / "photos"))


@pytest.mark.parametrize(("epochs", "how"), [(1, "SIGTERM"), (3, "KeyboardInterrupt")])
def test_stopped_run_resumes_to_the_uninterrupted_result(
    epochs: int, how: str, uninterrupted: Path, photo_folder: Path, tmp_path: Path
) -> None:
    out, handler = tmp_path / "photos", signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(photo_folder, out), on_epoch_end=_stop_after(epochs, how))
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's SIGTERM handler is gone with it
    (run_dir,) = out.iterdir()  # no version, only the run directory
    assert run_dir.name.startswith(".run-") and [p.name for p in run_dir.iterdir()] == [CHECKPOINT_FILENAME]
    stored = torch.load(run_dir / CHECKPOINT_FILENAME, weights_only=True)["progress"]
    assert sum(len(phase["epochs"]) for phase in stored["phases"]) == epochs

    version = resume(run_dir)
    assert sorted(p.name for p in out.iterdir()) == ["1"]  # the run directory became the version
    assert _history(version) == _history(uninterrupted)
    resumed = torch.load(version / CHECKPOINT_FILENAME, weights_only=True)
    reference = torch.load(uninterrupted / CHECKPOINT_FILENAME, weights_only=True)
    assert all(
        torch.equal(resumed["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"]
    )
    assert resumed["progress"]["optimizer_state"] is None  # a finished run carries no optimizer


def test_resume_refuses_to_change_what_is_trained(uninterrupted: Path) -> None:
    with pytest.raises(ValueError, match=r"--batch-size 16 \(the run has 8\).*only --out, --workers"):
        resume(uninterrupted / CHECKPOINT_FILENAME, {"batch_size": 16, "workers": 0})


def test_cli_resumes_and_says_how_when_data_is_missing(uninterrupted: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "training", "fit", "--resume", str(uninterrupted), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # A finished run has nothing left to train: resuming it publishes its best epoch again.
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nothing left to train" in done.stderr and not re.search(r"epoch \d+/\d+:", done.stderr)
    assert (tmp_path / "1" / MODEL_FILENAME).is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "training", "fit", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert missing.returncode == 2 and "fit needs --data and --out (or --resume" in missing.stderr
