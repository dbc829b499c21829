""".env.example documents every CONVSERVE_ setting the service reads, with its real default."""

from __future__ import annotations

import os
import re

import pytest
from deployfiles import COMPOSE_CPU_FILE, COMPOSE_FILE, ENV_EXAMPLE, load_compose, merge_compose

from service.settings import Settings

PREFIX = "CONVSERVE_"
# Settings that are only valid together: an example of one is checked with the examples of the others.
PARTNERS = {
    "CONVSERVE_TLS_CERTFILE": ("CONVSERVE_TLS_KEYFILE",),
    "CONVSERVE_TLS_KEYFILE": ("CONVSERVE_TLS_CERTFILE",),
    "CONVSERVE_TLS_CLIENT_CA": ("CONVSERVE_TLS_CERTFILE", "CONVSERVE_TLS_KEYFILE"),
}
# Documented alternatives to another line (a token or its file): never both uncommented.
ALTERNATIVES = tuple(f"CONVSERVE_{role}_TOKEN_FILE" for role in ("ADMIN", "INFERENCE", "METRICS"))


def documented_variables() -> dict[str, str]:
    """`# CONVSERVE_NAME=value` lines of .env.example, as {NAME: value}."""
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    return dict(re.findall(rf"^# ({PREFIX}\w+)=(.*)$", text, flags=re.MULTILINE))


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name in [name for name in os.environ if name.startswith(PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_every_setting_is_documented_and_nothing_else() -> None:
    expected = {PREFIX + name.upper() for name in Settings.model_fields}
    documented = set(documented_variables())
    assert documented - expected == set(), "documented but not read by service.settings.Settings"
    assert expected - documented == set(), "read by service.settings.Settings but missing in .env.example"


def test_no_variable_is_active_by_default() -> None:
    # A copied .env must change nothing until the user uncomments a line.
    active = re.findall(r"^\s*([A-Z_]+)=", ENV_EXAMPLE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert active == []


@pytest.mark.parametrize("variable", sorted(documented_variables()))
def test_documented_value_is_the_default_or_an_accepted_example(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = documented_variables()[variable]
    field = variable.removeprefix(PREFIX).lower()
    defaults = settings_from(monkeypatch, {})
    partners = {name: documented_variables()[name] for name in PARTNERS.get(variable, ())}
    documented = settings_from(monkeypatch, {variable: value, **partners})
    if getattr(defaults, field) is None:
        # Unset by default: the line shows an example value, which must be accepted.
        assert getattr(documented, field) is not None
    else:
        assert getattr(documented, field) == getattr(defaults, field), (
            f".env.example says {variable}={value}, but the service default is {getattr(defaults, field)!r}"
        )


def test_uncommenting_every_line_gives_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = {name: value for name, value in documented_variables().items() if name not in ALTERNATIVES}
    settings = settings_from(monkeypatch, chosen)
    assert settings.port == 8000


def test_compose_service_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = load_compose(COMPOSE_FILE)
    for compose in (gpu, merge_compose(gpu, load_compose(COMPOSE_CPU_FILE))):
        environment = compose["services"]["service"]["environment"]
        assert all(name.startswith(PREFIX) for name in environment)
        settings = settings_from(monkeypatch, {name: str(value) for name, value in environment.items()})
        assert (settings.host, settings.port) == ("0.0.0.0", 8000)


def test_cpu_override_restricts_onnx_runtime_to_the_cpu_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    merged = merge_compose(load_compose(COMPOSE_FILE), load_compose(COMPOSE_CPU_FILE))
    environment = merged["services"]["service"]["environment"]
    settings = settings_from(monkeypatch, {name: str(value) for name, value in environment.items()})
    assert settings.providers == ["CPUExecutionProvider"]
