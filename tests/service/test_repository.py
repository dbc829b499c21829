"""The model repository on disk and version policies: what counts as a version, what is selected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelcontract import complete_versions
from service.errors import StartupError
from service.lifecycle import check_repository
from service.models.repository import list_models, scan
from service.versionpolicy import VersionPolicy
from tests.tinymodel import tiny_settings


def add_version(root: Path, name: str, version: str, source: Path, complete: bool = True) -> None:
    directory = root / name / version
    directory.mkdir(parents=True)
    if complete:
        shutil.copy(source, directory / "model.onnx")


def test_versions_are_complete_integer_directories_in_numeric_order(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    for version in ("1", "2", "10"):
        add_version(tmp_path, "flowers", version, tiny_model_path)
    add_version(tmp_path, "flowers", "11", tiny_model_path, complete=False)  # export in progress
    add_version(tmp_path, "flowers", "latest", tiny_model_path)
    add_version(tmp_path, "flowers", "0", tiny_model_path)
    add_version(tmp_path, ".run-123", "1", tiny_model_path)  # a training run's work directory
    assert complete_versions(tmp_path / "flowers") == [1, 2, 10]  # numeric, not lexical, order
    assert list_models(tmp_path) == ["flowers"]
    assert scan(tmp_path) == {"flowers": [1, 2, 10]}


@pytest.mark.parametrize(
    ("text", "selected"),
    [
        ("latest", [10]),
        ("latest:2", [2, 10]),
        ("LATEST:9", [1, 2, 10]),
        ("all", [1, 2, 10]),
        ("specific:1,10,99", [1, 10]),
        ("specific:3", []),
    ],
)
def test_version_policies_select_as_triton_does(text: str, selected: list[int]) -> None:
    assert VersionPolicy.parse(text).select([1, 2, 10]) == selected


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:x", "specific:", "specific:0", "all:2"])
def test_bad_version_policies_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"latest, latest:N, all, specific"):
        VersionPolicy.parse(text)


def test_several_models_are_all_served_unless_a_list_is_given(tmp_path: Path, tiny_model_path: Path) -> None:
    add_version(tmp_path, "flowers", "1", tiny_model_path)
    add_version(tmp_path, "digits", "1", tiny_model_path)
    assert check_repository(tiny_settings(tmp_path)) == ["digits", "flowers"]
    chosen = tiny_settings(tmp_path, models="flowers")
    assert check_repository(chosen) == ["flowers"]


def test_unknown_models_and_empty_repositories_say_how_to_fix_them(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    with pytest.raises(StartupError, match=r"does not exist.*python -m training pretrained"):
        check_repository(tiny_settings(tmp_path / "nowhere"))
    with pytest.raises(StartupError, match="holds no model"):
        check_repository(tiny_settings(tmp_path))
    add_version(tmp_path, "flowers", "1", tiny_model_path)
    with pytest.raises(StartupError, match=r"CONVSERVE_MODELS names \['roses'\].*available: \['flowers'\]"):
        check_repository(tiny_settings(tmp_path, models="roses"))
    with pytest.raises(StartupError, match=r"'roses' \(CONVSERVE_MODEL_NAME\).*available: \['flowers'\]"):
        check_repository(tiny_settings(tmp_path, model_name="roses"))
