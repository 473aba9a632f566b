"""`alpaca-convert` on the chat install: every command that lacks a package names its extra.

The chat-only install is simulated in a subprocess whose import system refuses
the packages of the extras (a meta path finder placed first), as if they had
never been installed. Every subcommand is run with realistic flags whose outputs
point into an empty directory: exit 2, one line naming the extra and the install
command, no traceback, and no file created.
"""

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from convert import cli, extras

ROOT = Path(__file__).resolve().parents[1]
CHAT_ONLY = extras.EXTRAS["convert"]  # every package an extra adds; the chat install has none of them

HIDING = textwrap.dedent(
    """
    import importlib.abc, sys

    hidden = set(sys.argv[1].split(",")) - {""}

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    from convert.cli import main

    sys.exit(main(sys.argv[2:]))
    """
)


def run_without(hidden, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HIDING, ",".join(hidden), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def all_commands() -> list[str]:
    return list(cli._subcommands(cli.build_parser()))


def command_line(command: str, out: Path) -> list[str]:
    """Flags a user would give, every output inside `out` (an empty directory)."""
    lines = {
        "convert": [out / "ckpt", "--quant", "Q8_0", "-o", out / "m.gguf"],
        "export": ["export", out / "ckpt", "-o", out / "m.F16.gguf"],
        "eval": ["eval", out / "m.F16.gguf", "--ladder", "Q8_0", "--plot", out / "ladder.png"],
        "generate": ["generate", "-n", "3", "-o", out / "x.json"],
        "finetune": ["finetune", "--base", "smollm2-135m", "--data", "alpaca-seed", "--out", out / "adapter"],
        "merge": ["merge", "--base", "smollm2-135m", "--adapter", out / "adapter", "--out", out / "merged"],
        "pipeline": ["pipeline", "--base", "smollm2-135m", "--data", "alpaca-seed", "--out", out / "run"],
        "compare": ["compare", "--gguf", out / "m.gguf", "--prompts", "alpaca-seed", "--plot", out / "c.png"],
    }
    return lines.get(command, [command])  # a command added later: its name alone must be enough


def test_every_command_has_a_row():
    assert set(all_commands()) <= set(extras.COMMANDS), "a command without a row in convert/extras.py's COMMANDS"


@pytest.mark.parametrize("command", [c for c in all_commands() if extras.COMMANDS.get(c)])
def test_a_command_without_its_packages_names_its_extra(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the install command is computed, as in the child
    out = tmp_path / "out"
    out.mkdir()
    done = run_without(CHAT_ONLY, *command_line(command, out), cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr and done.stdout == "", done.stderr
    need = extras.COMMANDS[command][0]
    assert re.match(rf"alpaca-convert: error: {command}\b.* needs the '{need.extra}' extra \(.+ not installed\): ", lines[0])
    assert extras.install_command(need.extra) in lines[0]
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_message_names_the_missing_package_and_torch_goes_first(tmp_path):
    done = run_without(["rouge_score"], "generate", "-n", "3", "-o", tmp_path / "x.json", cwd=tmp_path)
    assert done.returncode == 2
    assert "generate needs the 'generate' extra (rouge-score is not installed): pip install " in done.stderr
    assert "[generate]" in done.stderr and "torch" not in done.stderr  # the smallest extra: no torch for generate
    assert not (tmp_path / "x.json").exists()

    done = run_without(["peft"], "merge", "--base", "b", "--adapter", "a", "--out", tmp_path / "m", cwd=tmp_path)
    pin = next(r for r in pyproject()["project"]["optional-dependencies"]["convert"] if r.startswith("torch"))
    assert done.returncode == 2 and "(peft is not installed)" in done.stderr
    assert f"pip install {pin} && pip install " in done.stderr and "[convert]" in done.stderr


def test_flags_bring_their_needs(tmp_path):
    """eval runs on the chat install; only --ladder's plot needs matplotlib. export --allow-pickle needs torch."""
    done = run_without(CHAT_ONLY, "eval", "missing.gguf", "--reference", "also-missing.gguf", cwd=tmp_path)
    assert done.returncode == 1 and "extra" not in done.stderr and "Traceback" not in done.stderr  # a missing file
    done = run_without(["torch"], "export", tmp_path / "ckpt", "--allow-pickle", "-o", tmp_path / "m.gguf", cwd=tmp_path)
    assert done.returncode == 2 and "export --allow-pickle needs the 'convert' extra (torch is not installed)" in done.stderr


def test_commands_of_the_chat_install_run_on_it(tmp_path, default_model_path):
    done = run_without(CHAT_ONLY, "inspect", default_model_path, cwd=tmp_path)
    assert done.returncode == 0 and "llama" in done.stdout, done.stderr


def test_help_marks_what_is_ready(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = run_without(CHAT_ONLY, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for command in all_commands():
        state = "ready" if not extras.COMMANDS[command] else None
        if command == "eval":
            state = "--ladder needs the 'plot' extra"
        elif state is None:
            state = f"needs the '{extras.COMMANDS[command][0].extra}' extra"
        assert re.search(rf"{command} [^\[]*\[{re.escape(state)}[;\]]", text), f"{command}: [{state}] not in --help"
    assert extras.install_command("convert") in done.stdout
    done = run_without(CHAT_ONLY, "finetune", "--help", cwd=tmp_path)  # a command's own help works without it
    assert done.returncode == 0 and "needs the 'convert' extra" in done.stdout
    done = run_without([], "--help", cwd=tmp_path)  # this environment has every extra
    assert done.returncode == 0 and "needs the" not in done.stdout and done.stdout.count("[ready]") == len(all_commands())


# -- the table agrees with pyproject.toml and the README -------------------------------------


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_extras_match_pyproject():
    declared = pyproject()["project"]["optional-dependencies"]
    module_of = {v: k for k, v in extras.PACKAGE_NAMES.items()}
    for extra, modules in extras.EXTRAS.items():
        packages = [re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0] for requirement in declared[extra]]
        assert sorted(module_of.get(p, p) for p in packages) == sorted(modules), extra
    for needs in extras.COMMANDS.values():
        for need in needs:
            assert set(need.modules) <= set(extras.EXTRAS[need.extra]), need


def test_the_readme_says_which_extra_each_command_needs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Dependencies, and why", 1)[1].split("\n## ", 1)[0]
    for extra in extras.EXTRAS:
        assert f"`{extra}` extra" in section, extra
    for command, needs in extras.COMMANDS.items():
        if needs:
            row = next((line for line in section.splitlines() if f"`{needs[0].extra}` extra" in line), "")
            assert f"`{command}`" in row, f"the README's row of the {needs[0].extra} extra does not name {command}"
