"""Service settings (pydantic-settings): defaults < RECSYS_* environment < flags; errors name what the user gave."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings, settings_from_command_line, settings_from_environment, to_environment


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv("RECSYS_" + name.upper(), raising=False)


def test_flags_win_over_the_environment_which_wins_over_defaults(monkeypatch):
    assert settings_from_command_line([]).port == 8000
    monkeypatch.setenv("RECSYS_PORT", "7001")
    monkeypatch.setenv("RECSYS_ACCESS_LOG", "1")
    assert settings_from_command_line([]).port == 7001
    chosen = settings_from_command_line(["--port", "7002", "--no-access-log", "--max-wait-ms", "2.5"])
    assert (chosen.port, chosen.access_log, chosen.max_wait_ms) == (7002, False, 2.5)
    assert settings_from_environment().access_log is True


def test_a_bad_value_is_refused_naming_the_flag_or_the_variable(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        settings_from_command_line(["--workers", "0"])
    assert "--workers='0'" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        settings_from_command_line([])
    assert "RECSYS_LOG_LEVEL='loud'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="RECSYS_LOG_LEVEL='loud'"):
        settings_from_environment()


def test_worker_processes_rebuild_the_same_settings_from_the_environment(monkeypatch):
    settings = Settings(model=Path("/x/export"), port=9100, workers=3, access_log=True, reload_interval_s=4.0)
    for name, value in to_environment(settings).items():
        monkeypatch.setenv(name, value)
    assert settings_from_environment() == settings


def test_the_admin_token_reaches_worker_processes_and_unset_stays_unset(monkeypatch):
    """--admin-token (or RECSYS_ADMIN_TOKEN) goes to the workers' environment as its value; unset, no variable
    (not the string 'None', which would become a token anyone could guess)."""
    with_token = settings_from_command_line(["--model", "m", "--admin-token", "s3cret"])
    assert with_token.admin_token.get_secret_value() == "s3cret" and "s3cret" not in repr(with_token)
    env = to_environment(with_token)
    assert env["RECSYS_ADMIN_TOKEN"] == "s3cret"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert settings_from_environment().admin_token.get_secret_value() == "s3cret"
    monkeypatch.delenv("RECSYS_ADMIN_TOKEN")
    assert "RECSYS_ADMIN_TOKEN" not in to_environment(settings_from_command_line(["--model", "m"]))
