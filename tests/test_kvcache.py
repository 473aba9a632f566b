"""KV state files (alpaca_chat/kvcache.py): format, validation, atomic writes, budget. Real files."""

import os
import stat
import struct

import pytest

from alpaca_chat import kvcache
from alpaca_chat.kvcache import KVCache, StateKey, StateRejected

KEY = StateKey(model_size=1000, model_sha256="a" * 64, n_ctx=2048, kv_type="f16", template_sha256="t" * 64)
TOKENS = [1, 2, 3, 4, 5]
PAYLOAD = bytes(range(256)) * 40


@pytest.fixture
def cache(isolated_home):
    return KVCache()


def test_round_trip_lives_in_the_data_dir_with_mode_0600(cache, isolated_home):
    written = cache.save(7, KEY, TOKENS, PAYLOAD)
    path = isolated_home / "data" / "kv" / "7.kv"
    assert path.is_file() and path.stat().st_size == written
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = cache.load(7, KEY)
    assert saved.tokens == TOKENS and saved.payload == PAYLOAD
    assert cache.load(8, KEY) is None  # no file: no state, no error
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"model_size": 1001}, "another model"),
        ({"model_sha256": "b" * 64}, "another model"),
        ({"n_ctx": 4096}, "another context size"),
        ({"kv_type": "q8_0"}, "another KV cache type"),
        ({"template_sha256": "u" * 64}, "another chat template"),
    ],
)
def test_a_state_for_anything_else_is_rejected(cache, change, reason):
    cache.save(1, KEY, TOKENS, PAYLOAD)
    other = StateKey(**{**KEY.__dict__, **change})
    with pytest.raises(StateRejected, match=reason):
        cache.load(1, other)


def _corrupt(path, offset, value=b"\xff"):
    data = bytearray(path.read_bytes())
    data[offset] ^= value[0]
    path.write_bytes(bytes(data))


def test_corrupt_truncated_and_foreign_files_are_rejected(cache):
    path = cache.path_for(1)
    cache.save(1, KEY, TOKENS, PAYLOAD)
    _corrupt(path, path.stat().st_size - 10)  # a payload byte
    with pytest.raises(StateRejected, match="payload checksum"):
        cache.load(1, KEY)

    cache.save(1, KEY, TOKENS, PAYLOAD)
    _corrupt(path, path.stat().st_size - len(PAYLOAD) - 4)  # a token
    with pytest.raises(StateRejected, match="token checksum"):
        cache.load(1, KEY)

    cache.save(1, KEY, TOKENS, PAYLOAD)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StateRejected, match="promises"):
        cache.load(1, KEY)

    path.write_bytes(b"ALPAC")
    with pytest.raises(StateRejected, match="truncated"):
        cache.load(1, KEY)

    path.write_bytes(b"GGUF" + os.urandom(4000))  # foreign: any other file
    with pytest.raises(StateRejected, match="not an alpaca-chat KV state"):
        cache.load(1, KEY)

    cache.save(2, KEY, TOKENS, PAYLOAD)
    os.replace(cache.path_for(2), path)  # another conversation's file under this name
    with pytest.raises(StateRejected, match="conversation 2"):
        cache.load(1, KEY)


def test_header_sizes_are_checked_against_the_file(cache):
    path = cache.path_for(1)
    cache.directory.mkdir(parents=True)
    good = kvcache.encode(1, KEY, TOKENS, PAYLOAD)
    magic, version, head_len = struct.unpack_from("<8sII", good)

    path.write_bytes(struct.pack("<8sII", magic, version, 10**9) + good[16:])
    with pytest.raises(StateRejected, match="header of"):
        cache.load(1, KEY)

    # A header that claims a payload larger than the file (the crafted-file case).
    head = good[16 : 16 + head_len].replace(
        f'"payload_size": {len(PAYLOAD)}'.encode(), f'"payload_size": {len(PAYLOAD) * 1000}'.encode()
    )
    path.write_bytes(struct.pack("<8sII", magic, version, len(head)) + head + good[16 + head_len :])
    with pytest.raises(StateRejected, match="promises"):
        cache.load(1, KEY)

    path.write_bytes(struct.pack("<8sII", magic, 99, head_len) + good[16:])
    with pytest.raises(StateRejected, match="version 99"):
        cache.load(1, KEY)

    bad_header = b'{"n_tokens": "many"}'
    path.write_bytes(struct.pack("<8sII", magic, version, len(bad_header)) + bad_header)
    with pytest.raises(StateRejected, match="header field"):
        cache.load(1, KEY)


def test_a_symlinked_state_file_is_not_followed(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere.kv"
    elsewhere.write_bytes(kvcache.encode(1, KEY, TOKENS, PAYLOAD))  # even a valid state
    cache.directory.mkdir(parents=True)
    cache.path_for(1).symlink_to(elsewhere)
    with pytest.raises(StateRejected, match="cannot be opened"):
        cache.load(1, KEY)
    cache.save(1, KEY, TOKENS, PAYLOAD)  # replaces the link itself, never writes through it
    assert not cache.path_for(1).is_symlink()
    assert elsewhere.read_bytes() == kvcache.encode(1, KEY, TOKENS, PAYLOAD)


def test_a_failed_write_leaves_the_old_state_and_no_partial_file(cache, monkeypatch):
    cache.save(1, KEY, TOKENS, PAYLOAD)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kvcache.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        cache.save(1, KEY, TOKENS + [6], PAYLOAD + b"x")
    monkeypatch.undo()
    assert cache.load(1, KEY).tokens == TOKENS
    assert [p.name for p in cache.directory.iterdir()] == ["1.kv"]


def test_a_payload_is_written_where_it_lies_after_the_header(cache, monkeypatch):
    payload = memoryview(bytearray(PAYLOAD * 64)).toreadonly()  # as the engine's snapshot hands it over
    writes = []
    real_write = os.write

    def counted(fd, data):
        writes.append(memoryview(data).nbytes)
        return real_write(fd, data)

    monkeypatch.setattr(kvcache.atomic.os, "write", counted)
    written = cache.save(1, KEY, TOKENS, payload)
    monkeypatch.undo()
    assert cache.path_for(1).read_bytes() == kvcache.encode(1, KEY, TOKENS, bytes(payload))
    assert written == cache.path_for(1).stat().st_size == sum(writes)
    assert len(payload) in writes  # straight from its buffer: never joined to the header in memory
    assert cache.load(1, KEY).payload == payload


def test_a_disk_that_fills_up_mid_write_leaves_the_old_state(cache, monkeypatch):
    cache.save(1, KEY, TOKENS, PAYLOAD)
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, memoryview(data)[:100])  # short writes first: they are carried on

    monkeypatch.setattr(kvcache.atomic.os, "write", short_then_full)
    with pytest.raises(OSError, match="No space"):
        cache.save(1, KEY, TOKENS + [6], PAYLOAD + b"x")
    monkeypatch.undo()
    assert cache.load(1, KEY).tokens == TOKENS
    assert [p.name for p in cache.directory.iterdir()] == ["1.kv"]


def test_a_temp_file_left_by_a_killed_save_is_never_read_and_is_cleaned_up(cache):
    cache.save(1, KEY, TOKENS, PAYLOAD)
    leftover = cache.directory / ".1.kv.abc123.tmp"
    leftover.write_bytes(kvcache.encode(1, KEY, TOKENS[:2], PAYLOAD)[:50])
    assert cache.load(1, KEY).tokens == TOKENS
    os.utime(leftover, (1, 1))  # old enough to be a dead save's
    cache.evict()
    assert not leftover.exists()


def test_least_recently_used_states_are_evicted_over_the_budget(isolated_home):
    size = len(kvcache.encode(1, KEY, TOKENS, PAYLOAD))
    cache = KVCache(max_bytes=3 * size)
    for cid in (1, 2, 3):
        cache.save(cid, KEY, TOKENS, PAYLOAD)
        os.utime(cache.path_for(cid), (1000 + cid, 1000 + cid))
    cache.load(1, KEY)  # used: now the most recent
    cache.save(4, KEY, TOKENS, PAYLOAD)
    assert sorted(e.conversation_id for e in cache.entries()) == [1, 3, 4]
    assert sum(e.size for e in cache.entries()) <= cache.max_bytes
    # A state larger than the whole budget is not kept at all.
    assert KVCache(max_bytes=size - 1).save(9, KEY, TOKENS, PAYLOAD) == 0
    assert not cache.path_for(9).exists()


def test_an_unwritable_directory_raises_and_changes_nothing(cache):
    cache.directory.mkdir(parents=True)
    cache.save(1, KEY, TOKENS, PAYLOAD)
    os.chmod(cache.directory, 0o500)
    try:
        if os.access(cache.directory, os.W_OK):  # root writes anywhere: make kv/ a file instead
            os.chmod(cache.directory, 0o700)
            for p in cache.directory.iterdir():
                p.unlink()
            cache.directory.rmdir()
            cache.directory.write_bytes(b"not a directory")
            with pytest.raises(OSError):
                cache.save(1, KEY, TOKENS + [9], PAYLOAD)
            assert cache.directory.read_bytes() == b"not a directory"
            return
        with pytest.raises(OSError):
            cache.save(1, KEY, TOKENS + [9], PAYLOAD)
    finally:
        if cache.directory.is_dir():
            os.chmod(cache.directory, 0o700)
    assert cache.load(1, KEY).tokens == TOKENS


def test_deleting_a_conversation_deletes_its_state(isolated_home):
    from alpaca_chat.loading import open_store

    store = open_store(True, warn=False)
    conversation = store.create_conversation(model="m", template="chatml", system_prompt=None, sampling={})
    cache = KVCache()
    cache.save(conversation.id, KEY, TOKENS, PAYLOAD)
    store.delete_conversation(conversation.id)
    store.close()
    assert not cache.path_for(conversation.id).exists()


def test_the_model_key_changes_with_the_model_file(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    first = kvcache.state_key(model, 2048, "f16", "tpl")
    model.write_bytes(b"GGUF" + b"\1" * 100)  # same size, other bytes
    os.utime(model, ns=(1, 1))
    second = kvcache.state_key(model, 2048, "f16", "tpl")
    assert first.model_size == second.model_size and first.model_sha256 != second.model_sha256
    assert kvcache.state_key(model, 2048, "f16", "other").template_sha256 != second.template_sha256


def test_cli_lists_and_clears_the_cache(isolated_home, capsys):
    from alpaca_chat.cli import main
    from alpaca_chat.loading import open_store

    store = open_store(True, warn=False)
    conversation = store.create_conversation(model="m", template="chatml", system_prompt=None, sampling={})
    store.rename_conversation(conversation.id, "About llamas")
    store.close()
    KVCache().save(conversation.id, KEY, TOKENS, PAYLOAD)
    assert main(["--kv-cache"]) == 0
    out = capsys.readouterr().out
    assert "About llamas" in out and f"{len(TOKENS):>7}" in out and "1 state(s)" in out
    assert main(["--kv-cache", "clear"]) == 0
    assert "Deleted 1" in capsys.readouterr().out
    assert KVCache().entries() == []
    assert main(["--kv-cache"]) == 0
    assert "No saved KV states" in capsys.readouterr().out
    assert main(["--kv-cache", "bogus"]) == 2


def test_config_turns_it_off_and_checks_the_budget(isolated_home):
    from alpaca_chat import config
    from alpaca_chat.errors import UsageError
    from alpaca_chat.loading import open_kv_cache

    settings = config.build_settings(config.parse_config("kv_cache = false\n", "config.toml"))
    assert open_kv_cache(settings) is None
    settings = config.build_settings(config.parse_config("kv_cache_max_mb = 64\n", "config.toml"))
    assert open_kv_cache(settings).max_bytes == 64 * 1024 * 1024
    assert open_kv_cache(config.build_settings()).max_bytes == 2048 * 1024 * 1024
    with pytest.raises(UsageError, match="kv_cache_max_mb"):
        open_kv_cache(config.build_settings({"kv_cache_max_mb": "lots"}))


SAVER = """
import sys
from alpaca_chat.kvcache import KVCache, StateKey
key = StateKey(1000, "a" * 64, 2048, "f16", "t" * 64)
tag = int(sys.argv[1])
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    KVCache().save(1, key, [tag, i], bytes([tag]) * (8 << 20))
"""


def _saver(tag, rounds):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", SAVER, str(tag), str(rounds)], stdout=subprocess.PIPE, text=True)


def test_two_processes_saving_the_same_conversation_leave_one_whole_state(cache):
    procs = [_saver(tag, 5) for tag in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    saved = cache.load(1, KEY)
    assert saved.tokens[0] in (1, 2) and saved.payload == bytes([saved.tokens[0]]) * (8 << 20)
    assert [p.name for p in cache.directory.iterdir()] == ["1.kv"]


def test_kill_9_during_a_save_leaves_the_old_state_or_the_new_one(cache):
    import signal
    import time

    cache.save(1, KEY, TOKENS, PAYLOAD)
    proc = _saver(3, 1000)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # somewhere in the middle of a write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = cache.load(1, KEY)  # never a broken file: the old state, or a whole new one
    assert saved.tokens == TOKENS or (saved.tokens[0] == 3 and saved.payload == bytes([3]) * (8 << 20))
    cache.evict()  # a dead save's temp file goes once it is old
    for leftover in cache.directory.glob(".*.tmp"):
        assert time.time() - leftover.stat().st_mtime < kvcache.STALE_TEMP_S


def test_a_prefetched_state_is_used_only_if_the_file_is_still_the_same(cache, monkeypatch):
    # A new process reads the state file while its model loads (KVCache.prefetch); load() takes
    # that read only while the file is unchanged, else it reads and checks the file again.
    cache.save(3, KEY, TOKENS, PAYLOAD)
    reads = []
    real_read = kvcache._read_state
    monkeypatch.setattr(kvcache, "_read_state", lambda path: reads.append(path) or real_read(path))
    cache.prefetch(3)
    assert cache.load(3, KEY).tokens == TOKENS
    assert len(reads) == 1  # the prefetch's read, not a second one

    cache.prefetch(3)
    cache._prefetched[3]._thread.join()
    cache.save(3, KEY, TOKENS + [6], PAYLOAD)  # another process saved meanwhile: a new file
    assert cache.load(3, KEY).tokens == TOKENS + [6]
    assert len(reads) == 3

    cache.prefetch(3)
    cache._prefetched[3]._thread.join()
    path = cache.path_for(3)
    os.utime(path, ns=(1, 1))  # same bytes but touched after the read: read again and checked
    _corrupt(path, path.stat().st_size - 10)
    with pytest.raises(StateRejected, match="payload checksum"):
        cache.load(3, KEY)


def test_a_prefetch_never_follows_a_symlink_put_there_later(cache, tmp_path):
    cache.save(4, KEY, TOKENS, PAYLOAD)
    cache.prefetch(4)
    cache._prefetched[4]._thread.join()
    path = cache.path_for(4)
    elsewhere = tmp_path / "elsewhere.kv"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(StateRejected, match="cannot be opened"):
        cache.load(4, KEY)
