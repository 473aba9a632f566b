"""Where alpaca-chat keeps its files.

One environment variable, ALPACA_CHAT_HOME, moves everything (tests pin it to a
tmp dir). Nothing is created at import time: callers create what they write.
"""

import os
from pathlib import Path

HOME_ENV = "ALPACA_CHAT_HOME"
APP_NAME = "alpaca-chat"


def _home_override() -> Path | None:
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Directory for the history database and the line-mode input history."""
    home = _home_override()
    if home:
        return home / "data"
    import platformdirs  # imported lazily: keeps `--prompt` startup lean

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """Directory for config.toml."""
    home = _home_override()
    if home:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def history_db_path() -> Path:
    return data_dir() / "history.db"


def config_file_path() -> Path:
    return config_dir() / "config.toml"
