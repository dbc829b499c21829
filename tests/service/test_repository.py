"""Model repository resolution: defaults, several models, versions, and the errors users see."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.errors import StartupError
from service.repository import list_models, resolve_model


def add_version(root: Path, name: str, version: str, source: Path, complete: bool = True) -> None:
    directory = root / name / version
    directory.mkdir(parents=True)
    if complete:
        shutil.copy(source, directory / "model.onnx")


def test_the_only_model_at_its_latest_version_is_the_default(tmp_path: Path, tiny_model_path: Path) -> None:
    for version in ("1", "2", "10"):
        add_version(tmp_path, "flowers", version, tiny_model_path)
    location = resolve_model(tmp_path)
    assert (location.name, location.version) == ("flowers", 10)  # numeric, not lexical, order
    assert location.path == tmp_path / "flowers" / "10" / "model.onnx"
    assert location.available_versions == (1, 2, 10)


def test_incomplete_and_non_numeric_version_directories_are_ignored(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    add_version(tmp_path, "flowers", "1", tiny_model_path)
    add_version(tmp_path, "flowers", "2", tiny_model_path, complete=False)  # export in progress
    add_version(tmp_path, "flowers", "latest", tiny_model_path)
    add_version(tmp_path, "flowers", "0", tiny_model_path)
    assert resolve_model(tmp_path).version == 1


def test_several_models_without_a_name_is_an_error_listing_them(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    add_version(tmp_path, "flowers", "1", tiny_model_path)
    add_version(tmp_path, "digits", "1", tiny_model_path)
    assert list_models(tmp_path) == ["digits", "flowers"]
    with pytest.raises(StartupError, match=r"several models \['digits', 'flowers'\].*CONVSERVE_MODEL_NAME"):
        resolve_model(tmp_path)
    assert resolve_model(tmp_path, "digits").name == "digits"


def test_unknown_name_or_version_lists_what_exists(tmp_path: Path, tiny_model_path: Path) -> None:
    add_version(tmp_path, "flowers", "1", tiny_model_path)
    add_version(tmp_path, "flowers", "2", tiny_model_path)
    with pytest.raises(StartupError, match=r"'roses'.*available: \['flowers'\]"):
        resolve_model(tmp_path, "roses")
    with pytest.raises(StartupError, match=r"no version 7.*available: \[1, 2\]"):
        resolve_model(tmp_path, "flowers", 7)
    assert resolve_model(tmp_path, "flowers", 1).version == 1


def test_missing_or_empty_repository_says_how_to_build_a_model(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"does not exist.*python -m training pretrained"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(StartupError, match="holds no model"):
        resolve_model(tmp_path)
