"""Structured output outside the server: `alpaca-chat --prompt ... --json-schema FILE / --grammar FILE.gbnf`
(the same grammar stage the server's response_format uses), on the bundled model."""

import json
import os
import subprocess
import sys

import jsonschema
import pytest

SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "maxLength": 10}, "bright": {"type": "boolean"}},
    "required": ["color", "bright"],
    "additionalProperties": False,
}


@pytest.fixture
def run(default_model_path, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "alpaca_chat", "--model", str(default_model_path),
                               "--no-history", *args], capture_output=True, text=True, env=env, timeout=300)

    return run


def test_json_schema_file_constrains_the_reply(run, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    texts = set()
    for seed in (1, 2, 3):
        result = run("--prompt", "Describe a color.", "--json-schema", str(schema), "--temp", "1", "--seed", str(seed),
                     "-n", "48", "--json")
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["stats"]["stop_reason"] == "eos"
        jsonschema.validate(json.loads(reply["text"]), SCHEMA)
        texts.add(reply["text"])
    assert len(texts) > 1


def test_gbnf_grammar_file_and_its_errors(run, tmp_path):
    yes_no = tmp_path / "yn.gbnf"
    yes_no.write_text('root ::= "yes" | "no"\n')
    result = run("--prompt", "Is the sky blue?", "--grammar", str(yes_no), "--temp", "1", "--seed", "5")
    assert result.returncode == 0 and result.stdout.strip() in ("yes", "no"), result

    broken = tmp_path / "broken.gbnf"
    broken.write_text("root ::= (\n")
    result = run("--prompt", "x", "--grammar", str(broken))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "could not parse the grammar" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--grammar", "x.gbnf"], "need --prompt"),
    (["-p", "x", "--grammar", "a", "--json-schema", "b"], "not both"),
    (["-p", "x", "--json-schema", "/no/such/file.json"], "cannot read"),
])
def test_grammar_flag_usage_errors(run, args, message):
    result = run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
