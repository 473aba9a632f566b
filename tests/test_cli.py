"""`alpaca-chat --prompt` as a user runs it: a real process, the real model, the real database."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from alpaca_chat.store import Store


def run_cli(*args, stdin="", timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "alpaca_chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def saved_conversations():
    from alpaca_chat.paths import history_db_path

    if not history_db_path().exists():
        return []
    with Store() as store:
        return [(c, store.messages(c.id)) for c in store.list_conversations()]


def test_answers_and_saves_history():
    result = run_cli("--prompt", "What is the capital of France?", "--temp", "0", "--max-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "expected an answer on stdout"
    assert result.stderr == ""
    [(conversation, messages)] = saved_conversations()
    assert conversation.model == "smollm2-135m"
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == "What is the capital of France?"
    assert messages[1].content == result.stdout.rstrip("\n")
    assert messages[1].status == "complete"
    assert messages[1].stats["generated_tokens"] > 0
    assert messages[1].sampling["temperature"] == 0


def test_json_output_has_text_and_stats():
    result = run_cli("--prompt", "Say hello.", "--json", "--max-tokens", "16", "--seed", "3")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["text"]
    stats = payload["stats"]
    for key in ("prompt_tokens", "generated_tokens", "time_to_first_token_s",
                "prompt_tokens_per_s", "generation_tokens_per_s", "stop_reason"):
        assert key in stats
    assert 0 < stats["generated_tokens"] <= 16
    assert stats["stop_reason"] in ("eos", "length")


def test_stats_flag_prints_one_line_to_stderr():
    result = run_cli("--prompt", "Hi", "--max-tokens", "8", "--stats", "--no-history")
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tok/s" in lines[0] and "stop:" in lines[0]


def test_seed_gives_identical_output_across_processes():
    args = ("--prompt", "Invent a word.", "--temp", "1.0", "--seed", "42", "--max-tokens", "24", "--no-history")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout and first.stdout.strip()


def test_piped_stdin_is_context_for_prompt():
    notes = "The meeting moved to Thursday at 3pm in room 12."
    result = run_cli("--prompt", "Summarize this", "--temp", "0", "--max-tokens", "32", stdin=notes)
    assert result.returncode == 0, result.stderr
    [(_, messages)] = saved_conversations()
    assert messages[0].content == f"Summarize this\n\n{notes}"


def test_prompt_dash_reads_all_of_stdin():
    result = run_cli("--prompt", "-", "--max-tokens", "8", stdin="Line one\nLine two\n")
    assert result.returncode == 0, result.stderr
    [(_, messages)] = saved_conversations()
    assert messages[0].content == "Line one\nLine two\n"


def test_no_history_writes_nothing():
    from alpaca_chat.paths import history_db_path

    result = run_cli("--prompt", "Hi", "--max-tokens", "4", "--no-history")
    assert result.returncode == 0
    assert not history_db_path().exists()


def test_continue_adds_to_the_last_conversation():
    assert run_cli("--prompt", "My name is Ada.", "--max-tokens", "16").returncode == 0
    result = run_cli("-c", "--prompt", "What is my name?", "--max-tokens", "16", "--json")
    assert result.returncode == 0, result.stderr
    [(conversation, messages)] = saved_conversations()
    assert json.loads(result.stdout)["conversation_id"] == conversation.id
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    # The whole earlier exchange was part of the prompt.
    assert json.loads(result.stdout)["stats"]["prompt_tokens"] > 40


def test_streams_before_the_reply_is_complete():
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpaca_chat", "--prompt", "Write a long story about a dragon.",
         "--temp", "0", "--max-tokens", "300", "--no-history"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = proc.stdout.read1(64)
    still_running = proc.poll() is None
    rest, _ = proc.communicate(timeout=120)
    assert first, "no output at all"
    assert still_running, "the first bytes only arrived when the process had finished"
    assert len(first) < len(first + rest)


def test_ctrl_c_saves_partial_reply_and_exits_130():
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpaca_chat", "--prompt", "Write a very long story about a dragon.",
         "--temp", "0", "--max-tokens", "2000", "--repeat-penalty", "1.3"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    shown = proc.stdout.read1(200)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    [(_, messages)] = saved_conversations()
    reply = messages[1]
    assert reply.status == "stopped"
    assert reply.content and (shown + out).decode().startswith(reply.content)
    assert reply.stats["stop_reason"] == "cancelled"


def test_prompt_path_does_not_import_ui_or_training_stacks():
    code = (
        "import sys\n"
        "from alpaca_chat.cli import main\n"
        "rc = main(['--prompt', 'hi', '--max-tokens', '1', '--no-history'])\n"
        "heavy = [m for m in ('textual', 'torch', 'transformers', 'prompt_toolkit') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")


# -- bad input: one line on stderr, the right exit code, nothing written ------------


def write_gguf(path, arch="llama", tensor_bytes=None):
    """A minimal GGUF: one f32 tensor, or a huge sparse one when tensor_bytes is given."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    import numpy as np

    n = (tensor_bytes or 32) // 4
    writer.add_tensor_info("token_embd.weight", (n // 8, 8), np.dtype(np.float32), n * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    # Pad with a sparse hole: the file claims its tensor data without using disk.
    size = path.stat().st_size
    data_start = (size + 31) // 32 * 32
    with open(path, "r+b") as f:
        f.truncate(data_start + n * 4)


def corrupt_kv_count(dst, src):
    data = bytearray(src.read_bytes()[:4096])
    struct.pack_into("<Q", data, 16, 2**40)  # kv count: absurd
    dst.write_bytes(bytes(data) + b"\0" * (src.stat().st_size - 4096))


BAD_MODELS = {
    "missing": (lambda p, src: None, "model file not found"),
    "directory": (lambda p, src: p.mkdir(), "is a directory"),
    "not-gguf": (lambda p, src: p.write_text("<!DOCTYPE html><html>Not found</html>"), "is not a GGUF file"),
    "truncated": (lambda p, src: p.write_bytes(src.read_bytes()[: 5_000_000]), "is truncated"),
    "corrupted": (corrupt_kv_count, "corrupted header"),
    "unsupported-arch": (lambda p, src: write_gguf(p, arch="notanarch"), "architecture 'notanarch' is not supported"),
    "too-big": (lambda p, src: write_gguf(p, tensor_bytes=2**40), "needs about"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_file(case, tmp_path, default_model_path):
    make, message = BAD_MODELS[case]
    path = tmp_path / "model.gguf"
    make(path, default_model_path)
    result = run_cli("--model", str(path), "--prompt", "hello")
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert saved_conversations() == []


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--prompt", "hi", "--temp", "-1"], 2, "--temp must be a number from 0 to 100"),
        (["--prompt", "hi", "--top-p", "0"], 2, "--top-p must be a number in (0, 1]"),
        (["--prompt", "hi", "--max-tokens", "abc"], 2, "invalid int value"),
        (["--prompt", "hi", "--no-such-flag"], 2, "unrecognized arguments"),
        (["--prompt", "   "], 2, "the prompt is empty"),
        (["--prompt", "hi", "-c", "--conversation", "3"], 2, "either --continue or --conversation"),
        (["--prompt", "hi", "--continue"], 1, "no saved conversation"),
        (["--prompt", "hi", "--conversation", "999"], 1, "999"),
        (["--prompt", "hi", "--model", "no-such-model"], 1, "unknown model 'no-such-model'"),
        (["--prompt", "hi", "--model", "someone/repo:Q4_K_M"], 1, "offline"),
        (["--prompt", "hi", "--template", "nope"], 1, "unknown template 'nope'"),
        (["--prompt", "word " * 3000, "--ctx", "512"], 1, "does not fit"),
    ],
)
def test_bad_usage(args, code, message):
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--model", str(tmp_path / "nope.gguf"), "--prompt", "hi", "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ModelNotFoundError" in result.stderr


def test_list_models_shows_registry_and_bundled_size():
    result = run_cli("--list-models")
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m" in result.stdout and "qwen2.5-0.5b" in result.stdout
    assert "bundled" in result.stdout and "MB" in result.stdout


def test_corrupt_history_is_moved_aside_with_warning():
    from alpaca_chat.paths import history_db_path

    db = history_db_path()
    db.parent.mkdir(parents=True)
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    result = run_cli("--prompt", "Hi", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "moved to" in result.stderr
    moved = [p for p in db.parent.iterdir() if p.name.startswith("history.db.corrupt")]
    assert [p.read_bytes() for p in moved] == [garbage]
    assert len(saved_conversations()) == 1
