import pytest

from alpaca_chat import paths
from alpaca_chat.config import Settings, build_settings, env_overrides, parse_config
from alpaca_chat.errors import UsageError


def test_layers_apply_in_order_and_none_means_not_given():
    file_layer = parse_config('model = "qwen2.5-0.5b"\ntemperature = 0.2\nmax_tokens = 64\n', "config.toml")
    env = env_overrides({"ALPACA_CHAT_MODEL": "llama3.2-1b"})
    flags = {"model": None, "temperature": 0.9, "seed": None}
    settings = build_settings(file_layer, env, flags)
    assert settings.model == "llama3.2-1b"  # env beats file
    assert settings.sampling.temperature == 0.9  # flag beats file
    assert settings.sampling.max_tokens == 64  # file beats default
    assert settings.sampling.seed is None and settings.template == "auto"


def test_defaults_without_layers():
    assert build_settings() == Settings()


def test_unknown_key_and_bad_toml_are_usage_errors():
    with pytest.raises(UsageError, match="unknown setting.*colour"):
        parse_config("colour = 'red'", "cfg.toml")
    with pytest.raises(UsageError, match="cfg.toml: invalid TOML"):
        parse_config("model = ", "cfg.toml")


def test_bad_value_in_config_is_reported():
    with pytest.raises(UsageError, match="temperature"):
        build_settings(parse_config("temperature = -2", "cfg.toml"))


def test_config_file_is_used_by_the_cli(isolated_home, capsys):
    from alpaca_chat.cli import main

    paths.config_file_path().parent.mkdir(parents=True)
    paths.config_file_path().write_text("top_p = 7\n")
    assert main(["--prompt", "hi"]) == 2
    assert "config.toml: top_p must be a number in (0, 1]" in capsys.readouterr().err


def test_home_override_moves_every_path(isolated_home):
    assert paths.data_dir() == isolated_home / "data"
    assert paths.config_dir() == isolated_home / "config"
    assert paths.history_db_path().parent == paths.data_dir()
    assert not isolated_home.exists(), "nothing may be created just by asking for a path"


def test_platform_dirs_without_override(monkeypatch):
    monkeypatch.delenv("ALPACA_CHAT_HOME")
    assert "alpaca-chat" in str(paths.data_dir()) and "alpaca-chat" in str(paths.config_dir())
