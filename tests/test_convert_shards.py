"""Sharded checkpoints: streamed tensor by tensor across shards, checked against the index.

A tiny random Llama (bf16) is split into shards with a `model.safetensors.index.json`,
as transformers saves large models, and exported through the CLI's entry function.
"""

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest

from convert_helpers import TinyCase, build_tiny_model, gguf_fields, gguf_tensors, same_bytes

from convert.cli import main
from convert.export import export
from convert.export.checkpoint import Checkpoint, open_checkpoint

INDEX = "model.safetensors.index.json"
# Eight layers with a wider MLP than attention: the model is many times its largest tensor.
TINY = TinyCase(
    "sharded-llama",
    "LlamaForCausalLM",
    "gpt-2",
    config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4),
)
N_SHARDS = 5


def write_shards(single: Path, out: Path, n_shards: int = N_SHARDS) -> Path:
    """`single` (one model.safetensors) re-saved as `n_shards` shards and an index, as transformers does."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for item in single.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, out / item.name)
    tensors = load_file(single / "model.safetensors")
    names = list(tensors)
    per_shard = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(sharded checkpoint, F16 GGUF of the same weights exported from one file)."""
    root = tmp_path_factory.mktemp("shards")
    single = build_tiny_model(root / "single" / "tiny-llama", TINY, dtype="bfloat16")
    sharded = write_shards(single, root / "sharded" / "tiny-llama")
    return sharded, export(single, root / "single.F16.gguf", "f16").path


@pytest.fixture
def sharded(pristine, tmp_path):
    return shutil.copytree(pristine[0], tmp_path / "tiny-llama")


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("alpaca-convert: error:")]
    return code, (lines[-1] if lines else "")


def assert_nothing_written(out_dir):
    assert list(out_dir.iterdir()) == [], "a partial or temp file was left behind"


def read_index(checkpoint):
    return json.loads((checkpoint / INDEX).read_text())


def write_index(checkpoint, index):
    (checkpoint / INDEX).write_text(json.dumps(index))


def assert_same_export(ours, reference):
    mine, theirs = gguf_tensors(ours), gguf_tensors(reference)
    assert sorted(mine) == sorted(theirs)
    for name, (kind, shape, data) in theirs.items():
        assert mine[name][:2] == (kind, shape), name
        assert same_bytes(mine[name][2], data), name
    assert gguf_fields(ours) == gguf_fields(reference)


def test_sharded_export_equals_the_single_file_export(pristine, capsys, out_dir):
    sharded, single_f16 = pristine
    assert len(list(sharded.glob("*.safetensors"))) == N_SHARDS
    code, _ = run(capsys, "export", sharded, "--outtype", "f16", "-o", out_dir / "m.gguf")
    assert code == 0
    assert_same_export(out_dir / "m.gguf", single_f16)


def test_streams_shard_by_shard_with_memory_of_one_tensor(pristine, tmp_path, monkeypatch):
    """Each tensor is read once, the shards in turn, front to back; while one tensor is converted
    and written, memory grows by a small multiple of that tensor, never with the model."""
    sharded = pristine[0]
    checkpoint = open_checkpoint(sharded)
    entries = checkpoint.tensors
    model_bytes = sum(e.n_elements * 4 for e in entries.values())  # as float32
    largest = max(e.n_elements * 4 for e in entries.values())
    assert model_bytes > 30 * largest  # else the bound below would prove nothing

    reads: list[str] = []
    real_read = Checkpoint.read

    def spy(self, name, *args, **kwargs):
        reads.append(name)
        return real_read(self, name, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", spy)
    peaks: list[tuple[int, int]] = []  # (peak traced bytes while writing it, its float32 size)

    def progress(done, total, gguf_name):
        peaks.append((tracemalloc.get_traced_memory()[1], entries[reads[-1]].n_elements * 4))
        tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        export(sharded, tmp_path / "m.gguf", "f16", progress=progress)
    finally:
        tracemalloc.stop()

    assert sorted(reads) == sorted(entries)  # untied: every tensor is exported, once
    positions = [(entries[n].file.name, entries[n].offset) for n in reads]
    assert positions == sorted(positions), "tensors were not read shard by shard, front to back"
    assert len({entries[n].file for n in reads}) == N_SHARDS
    # The first window also holds the header and the tokenizer; every later one only its tensor
    # (read as float32, its F16 copy, the q/k permutation's copy) and the writer's small state.
    for peak, tensor_bytes in peaks[1:]:
        assert peak <= 3 * tensor_bytes + (1 << 20), (peak, tensor_bytes)
    assert max(peak for peak, _ in peaks[1:]) < model_bytes / 8


def test_missing_shard(capsys, sharded, out_dir):
    (sharded / "model-00003-of-00005.safetensors").unlink()
    code, error = run(capsys, "export", sharded, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "is incomplete" in error and INDEX in error and "model-00003-of-00005.safetensors" in error
    assert "missing" in error
    assert_nothing_written(out_dir)


def test_several_missing_shards_are_counted(capsys, sharded, out_dir):
    for i in (2, 4):
        (sharded / f"model-0000{i}-of-00005.safetensors").unlink()
    code, error = run(capsys, sharded, "--quant", "Q8_0", "-o", out_dir / "m.gguf")
    assert code == 1
    assert "model-00002-of-00005.safetensors (and 1 more)" in error
    assert_nothing_written(out_dir)


def test_index_points_at_the_wrong_shard(capsys, sharded, out_dir):
    index = read_index(sharded)
    name = next(n for n, shard in index["weight_map"].items() if shard.startswith("model-00004"))
    index["weight_map"][name] = "model-00001-of-00005.safetensors"
    write_index(sharded, index)
    code, error = run(capsys, "export", sharded, "-o", out_dir / "m.gguf")
    assert code == 1
    assert f"places tensor {name} in model-00001-of-00005.safetensors" in error
    assert "it is in model-00004-of-00005.safetensors" in error
    assert_nothing_written(out_dir)


def test_index_names_a_tensor_no_shard_holds(capsys, sharded, out_dir):
    index = read_index(sharded)
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = "model-00002-of-00005.safetensors"
    write_index(sharded, index)
    code, error = run(capsys, "export", sharded, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "model.layers.0.mlp.extra_proj.weight" in error and "no shard holds it" in error
    assert_nothing_written(out_dir)


def test_tensor_missing_from_the_index_is_read_from_its_shard(capsys, pristine, sharded, out_dir):
    """As transformers does: every tensor of every shard the index names is loaded."""
    index = read_index(sharded)
    name = "model.layers.3.mlp.down_proj.weight"
    del index["weight_map"][name]
    write_index(sharded, index)
    code, _ = run(capsys, "export", sharded, "--outtype", "f16", "-o", out_dir / "m.gguf")
    assert code == 0
    assert_same_export(out_dir / "m.gguf", pristine[1])


def test_files_the_index_does_not_name_are_ignored(capsys, pristine, sharded, out_dir):
    """A leftover file from another save (a stale single-file copy) is not read, as transformers does."""
    shutil.copy(sharded / "model-00001-of-00005.safetensors", sharded / "model.safetensors")
    code, _ = run(capsys, "export", sharded, "--outtype", "f16", "-o", out_dir / "m.gguf")
    assert code == 0
    assert_same_export(out_dir / "m.gguf", pristine[1])


def test_tensor_in_two_shards(capsys, sharded, out_dir):
    from safetensors.torch import load_file, save_file

    first = sharded / "model-00001-of-00005.safetensors"
    second = sharded / "model-00002-of-00005.safetensors"
    duplicated = next(iter(load_file(first)))
    save_file({**load_file(second), duplicated: load_file(first)[duplicated]}, second, metadata={"format": "pt"})
    code, error = run(capsys, "export", sharded, "-o", out_dir / "m.gguf")
    assert code == 1
    assert f"tensor {duplicated} appears in two weight files" in error
    assert first.name in error and second.name in error
    assert_nothing_written(out_dir)


def test_unreadable_index(capsys, sharded, out_dir):
    (sharded / INDEX).write_text('{"metadata": {}, "weight_map": ["not", "a", "map"]}')
    code, error = run(capsys, "export", sharded, "-o", out_dir / "m.gguf")
    assert code == 1
    assert f"cannot read {sharded / INDEX}" in error and "weight_map" in error
    assert_nothing_written(out_dir)


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_read_converts_as_it_reads(tmp_path, monkeypatch, chunk):
    """read(name, float16) gives the bytes of a float32 read then cast, for every float dtype,
    whether a tensor spans many chunks (with a remainder) or one."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import convert.export.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    base = torch.randn(13, 11) * 300  # some values overflow float16, some round
    tensors = {str(dtype): base.to(dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = open_checkpoint(tmp_path)
    for name, tensor in tensors.items():
        as_stored = checkpoint.read(name)
        expected = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        assert np.array_equal(as_stored, expected.numpy()) and as_stored.dtype == expected.numpy().dtype, name
        working = as_stored if as_stored.dtype in (np.float16, np.float32) else as_stored.astype(np.float32)
        for dtype in (np.float16, np.float32):
            narrowed = checkpoint.read(name, dtype)
            assert narrowed.shape == (13, 11) and narrowed.dtype == dtype, name
            assert same_bytes(narrowed, working.astype(dtype)), (name, dtype)


def test_f16_export_never_holds_a_float32_copy(tmp_path, monkeypatch):
    """A family whose tensors are only moved (Qwen2: not at all) is narrowed to F16 as it is read:
    while a large matrix is written, memory holds its F16 copy and a small read buffer, no float32."""
    import convert.export.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "_CHUNK_ELEMENTS", 1 << 12)
    case = TinyCase(
        "wide-qwen2", "Qwen2ForCausalLM", "qwen2",
        config=dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4),
    )
    checkpoint = build_tiny_model(tmp_path / "wide-qwen2", case, dtype="bfloat16")
    entries = open_checkpoint(checkpoint).tensors
    peaks: dict[str, int] = {}

    def progress(done, total, gguf_name):
        peaks[gguf_name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        export(checkpoint, tmp_path / "m.gguf", "f16", progress=progress)
    finally:
        tracemalloc.stop()
    mlp = entries["model.layers.1.mlp.gate_proj.weight"].n_elements
    # Its F16 copy is 2 bytes a value, a float32 one alone would be 4.
    assert 2 * mlp < peaks["blk.1.ffn_gate.weight"] < 3 * mlp
    assert 2 * mlp < peaks["blk.1.ffn_down.weight"] < 3 * mlp
