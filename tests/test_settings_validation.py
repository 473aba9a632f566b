"""Every setting is type- and range-checked, from config.toml, the environment and the flags:
one line naming where the value came from and the key, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from alpaca_chat import paths
from alpaca_chat.cli import main

BAD_CONFIG = [
    ('temperature = "hot"', "temperature must be a number"),
    ("temperature = -0.5", "temperature must be a number from 0 to 100"),
    ("temperature = nan", "temperature must be a number from 0 to 100"),
    ("top_p = 0", "top_p must be a number in (0, 1]"),
    ("top_p = 1.5", "top_p must be a number in (0, 1]"),
    ("top_k = 2.5", "top_k must be an integer"),
    ("top_k = -1", "top_k must be an integer >= 0"),
    ("min_p = 2", "min_p must be a number in [0, 1]"),
    ("repeat_penalty = 0", "repeat_penalty must be a number above 0"),
    ("seed = -1", "seed must be an integer from 0"),
    ("seed = true", "seed must be an integer"),
    ("max_tokens = 0", "max_tokens must be an integer >= 1"),
    ('max_tokens = "10"', "max_tokens must be an integer"),
    ("threads = 0", "threads must be an integer from 1"),
    ("n_ctx = 16", "n_ctx must be an integer from 64"),
    ("n_ctx = 4096.0", "n_ctx must be an integer"),
    ("model = 3", "model must be a string"),
    ('model = ""', "model must be a non-empty string"),
    ("template = [1, 2]", "template must be a string"),
    ("system = 1", "system must be a string"),
    ('kv_cache = "yes"', "kv_cache must be true or false"),
    ("kv_cache_max_mb = -5", "kv_cache_max_mb must be an integer >= 0"),
    ('kv_type = "q4_0"', "kv_type must be f16 or q8_0, not 'q4_0'"),
    ("kv_type = 8", "kv_type must be a string"),
]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("line,expected", BAD_CONFIG, ids=[line for line, _ in BAD_CONFIG])
def test_bad_config_value_names_file_and_key(isolated_home, capsys, line, expected):
    path = paths.config_file_path()
    path.parent.mkdir(parents=True)
    path.write_text(line + "\n")
    assert main(["--prompt", "hi"]) == 2
    err = one_line_error(capsys)
    assert f"{path}: {expected}" in err, err


BAD_FLAGS = [
    (["--ctx", "-5"], "--ctx must be an integer from 64"),
    (["--ctx", "10"], "--ctx must be an integer from 64"),
    (["--threads", "0"], "--threads must be an integer from 1"),
    (["--temp", "-1"], "--temp must be a number from 0 to 100"),
    (["--temp", "inf"], "--temp must be a number from 0 to 100"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1]"),
    (["--top-k", "-3"], "--top-k must be an integer >= 0"),
    (["--min-p", "1.5"], "--min-p must be a number in [0, 1]"),
    (["--repeat-penalty", "nan"], "--repeat-penalty must be a number above 0"),
    (["--seed", "-2"], "--seed must be an integer from 0"),
    (["-n", "0"], "--max-tokens must be an integer >= 1"),
    (["--model", " "], "--model must be a non-empty string"),
    (["--kv-type", "f32"], "--kv-type must be f16 or q8_0, not 'f32'"),
]


@pytest.mark.parametrize("flags,expected", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_names_the_flag(capsys, flags, expected):
    assert main(["--prompt", "hi", *flags]) == 2
    assert expected in one_line_error(capsys)


def test_bad_environment_value_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("ALPACA_CHAT_TEMPLATE", "   ")
    assert main(["--prompt", "hi"]) == 2
    assert "environment variable ALPACA_CHAT_TEMPLATE: template must be a non-empty string" in one_line_error(capsys)


def test_hot_temperature_through_the_real_cli(isolated_home):
    """The measured failure: `temperature = "hot"` gave an unexpected TypeError and exit code 1."""
    path = paths.config_file_path()
    path.parent.mkdir(parents=True)
    path.write_text('temperature = "hot"\n')
    done = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--prompt", "hi"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"alpaca-chat: error: {path}: temperature must be a number, not 'hot'"
