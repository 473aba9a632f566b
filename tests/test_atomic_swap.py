"""The atomic directory swap (convert/atomic.py) under kill -9.

A child process swaps a new directory in and SIGKILLs itself at one of the
swap's named points; afterwards the target must hold the complete old
directory or the complete new one, never neither and never a mix, both right
after the kill and after the next call's recovery. Each point is run with
renameat2(RENAME_EXCHANGE) where the system has it, and with the two-rename
fallback. Then merge and the GGUF base cache, killed in their own swaps.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convert import atomic

EXCHANGE_POINTS = ("synced", "exchanged", "exchange_synced")
FALLBACK_POINTS = ("synced", "old_moved_aside", "new_in_place", "parent_synced")
FIRST_POINTS = ("synced", "renamed")  # no old directory yet

FILES = 12  # enough files that a half-copied directory could not pass for a whole one


def write_tree(root: Path, tag: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested").mkdir(exist_ok=True)
    for i in range(FILES):
        (root / ("nested" if i % 2 else ".") / f"file{i}.txt").write_text(f"{tag} {i}\n" * 50)


def tree_state(root: Path) -> str | None:
    """'old' or 'new' when `root` is exactly one of the two directories, None when it is missing;
    anything else (a mix, a half-written tree) fails the test."""
    if not os.path.lexists(root):
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file())
    tags = {p.read_text().split(" ", 1)[0] for p in files}
    assert len(files) == FILES and len(tags) == 1, f"{root} is neither directory whole: {files}"
    return tags.pop()


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from convert import atomic
    import test_atomic_swap as t

    target, point, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "fallback":
        atomic._exchange = lambda a, b: False

    def crash(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    atomic._crash_point = crash
    with atomic.atomic_directory(target) as staging:
        t.write_tree(staging, "new")
    """
)


def run_child(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def has_exchange() -> bool:
    return atomic._renameat2() is not None


@pytest.mark.parametrize(
    "mode, point",
    [("exchange", p) for p in EXCHANGE_POINTS] + [("fallback", p) for p in FALLBACK_POINTS],
)
def test_kill_during_a_swap_leaves_the_old_or_the_new_directory(tmp_path, mode, point):
    if mode == "exchange" and not has_exchange():
        pytest.skip("no renameat2 here: the fallback cases cover this system")
    target = tmp_path / "out"
    write_tree(target, "old")
    done = run_child(CHILD, str(target), point, mode)
    assert done.returncode == -signal.SIGKILL, done.stderr
    after_kill = tree_state(target)
    if point == "old_moved_aside":
        assert after_kill is None  # the one moment of the fallback without a target, which recovery undoes
    else:
        assert after_kill == ("old" if point == "synced" else "new")
    atomic.recover_directory(target)  # what the next call does first
    assert tree_state(target) == (after_kill or "old")
    assert leftovers(target) == []


@pytest.mark.parametrize("point", FIRST_POINTS)
def test_kill_during_a_first_swap_leaves_nothing_or_the_new_directory(tmp_path, point):
    target = tmp_path / "out"
    done = run_child(CHILD, str(target), point, "exchange")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert tree_state(target) == (None if point == "synced" else "new")
    atomic.recover_directory(target)
    assert tree_state(target) == (None if point == "synced" else "new") and leftovers(target) == []


def test_the_next_call_recovers_then_swaps(tmp_path):
    target = tmp_path / "out"
    write_tree(target, "old")
    assert run_child(CHILD, str(target), "old_moved_aside", "fallback").returncode == -signal.SIGKILL
    assert tree_state(target) is None and len(leftovers(target)) == 2  # the old one aside, the new one staged
    with atomic.atomic_directory(target) as staging:
        assert tree_state(target) == "old"  # put back before any work
        write_tree(staging, "new")
    assert tree_state(target) == "new" and leftovers(target) == []


def test_an_error_while_building_leaves_the_old_directory(tmp_path):
    target = tmp_path / "out"
    write_tree(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target) as staging:
            write_tree(staging, "new")
            raise RuntimeError("disk full")
    assert tree_state(target) == "old" and leftovers(target) == []


def test_a_live_process_leftovers_are_not_touched(tmp_path):
    """Another process swapping the same target: its staging directory is not ours to remove."""
    target = tmp_path / "out"
    write_tree(target, "old")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".out.{sleeper.pid}.abc.partial"
        theirs.mkdir()
        atomic.recover_directory(target)
        assert theirs.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    atomic.recover_directory(target)
    assert not theirs.exists()


def test_a_file_in_the_way_is_an_error(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a directory")
    with pytest.raises(atomic.OutputError, match="not a directory"):
        with atomic.atomic_directory(target):
            pass
    assert target.read_text() == "not a directory"


# -- the two users, killed in their own swaps --------------------------------------------------


MERGE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from convert import atomic, merge

    base, adapter, out, point = sys.argv[1:]
    atomic._exchange = lambda a, b: False  # the fallback: the one with a moment without `out`
    atomic._crash_point = lambda name: name == point and os.kill(os.getpid(), signal.SIGKILL)
    merge.merge(base, adapter, out)
    """
)


@pytest.mark.slow
def test_merge_killed_in_its_swap_keeps_the_old_checkpoint(tmp_path, tiny_llama):
    from finetune_helpers import fast_config, seed_rows, write_json

    from convert import merge
    from convert.finetune import finetune

    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    finetune(fast_config(tiny_llama, rows, tmp_path / "adapter", max_steps=1, val_size=0), progress=False)
    out = tmp_path / "merged"
    merge.merge(str(tiny_llama), tmp_path / "adapter", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "marker").write_text("the old checkpoint")
    done = run_child(MERGE_CHILD, str(tiny_llama), str(tmp_path / "adapter"), str(out), "old_moved_aside")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not out.exists() and leftovers(out)  # killed between the renames
    atomic.recover_directory(out)
    assert (out / "marker").read_text() == "the old checkpoint" and leftovers(out) == []
    merge.merge(str(tiny_llama), tmp_path / "adapter", out)  # the next run swaps a whole new one in
    assert not (out / "marker").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


GGUF_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from convert import atomic, gguf_base

    spec, point = sys.argv[1:]
    atomic._exchange = lambda a, b: False
    atomic._crash_point = lambda name: name == point and os.kill(os.getpid(), signal.SIGKILL)
    gguf_base.checkpoint_from_gguf(spec)
    """
)


@pytest.mark.slow
def test_gguf_base_killed_in_its_swap_recovers_on_the_next_call(tmp_path, tiny_builds, monkeypatch):
    from convert import gguf_base

    _, _, f16 = tiny_builds.get("llama-spm-gqa")
    monkeypatch.setenv(gguf_base.CACHE_ENV, str(tmp_path / "cache"))
    target = gguf_base.checkpoint_from_gguf(str(f16))
    provenance = json.loads((target / gguf_base.PROVENANCE_FILE).read_text())
    (target / gguf_base.PROVENANCE_FILE).write_text(json.dumps({**provenance, "sha256_head_tail": "stale"}))
    done = run_child(GGUF_CHILD, str(f16), "old_moved_aside")  # the stale entry is redone, and killed
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not target.exists() and leftovers(target)
    assert gguf_base.checkpoint_from_gguf(str(f16)) == target  # recovers the old entry, then redoes it
    assert json.loads((target / gguf_base.PROVENANCE_FILE).read_text()) == provenance
    assert leftovers(target) == []
