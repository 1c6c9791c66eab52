"""Flags, LORASTACK_* environment variables, and the contract's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.settings import parse_settings


def test_defaults_bind_localhost(tmp_path: Path) -> None:
    settings = parse_settings([], {})
    assert settings.host == "127.0.0.1" and settings.port == 7860
    assert not settings.api and settings.ckpt is None


def test_environment_then_flags_win(tmp_path: Path) -> None:
    env = {
        "LORASTACK_PORT": "9000",
        "LORASTACK_API": "true",
        "LORASTACK_CKPT_DIR": f"{tmp_path / 'a'}:{tmp_path / 'b'}",
        "LORASTACK_DATA_DIR": str(tmp_path),
    }
    settings = parse_settings([], env)
    assert settings.port == 9000 and settings.api
    assert settings.models_dirs == (tmp_path / "a", tmp_path / "b")
    assert settings.loras_dirs == (tmp_path / "loras",)
    assert settings.outputs_dir == tmp_path / "outputs"
    flagged = parse_settings(["--port", "8000", "--ckpt-dir", str(tmp_path / "c")], env)
    assert flagged.port == 8000 and flagged.models_dirs == (tmp_path / "c",)


def test_repeatable_folders_and_listen() -> None:
    settings = parse_settings(["--lora-dir", "/x", "--lora-dir", "/y", "--listen"], {})
    assert settings.loras_dirs == (Path("/x"), Path("/y"))
    assert settings.host == "0.0.0.0"


def test_space_binds_all_interfaces() -> None:
    assert parse_settings([], {"SPACE_ID": "user/space"}).host == "0.0.0.0"


@pytest.mark.parametrize("argv", [["--port", "0"], ["--threads", "-1"], ["--port", "x"]])
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, {})


def test_bad_environment_value_names_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings([], {"LORASTACK_PORT": "many"})
    assert "LORASTACK_PORT" in capsys.readouterr().err
