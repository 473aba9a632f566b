"""The importance matrix made through llama.cpp's eval callback agrees with one computed by hand in torch.

For each tiny random checkpoint (a Llama with its own output matrix, a Qwen2
with tied embeddings, two mixtures of experts), transformers runs the same
chunks of tokens; forward hooks catch the input of every linear layer, and the
experts' inputs are recomputed from the router's choice: the hidden states
of the tokens routed to an expert enter its gate and up matrices, and
act(gate) * up enters its down matrix. Names are mapped to the GGUF's with the
gguf package's own table. Means per input column must agree within 1e-4
relative, and counts exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from convert_helpers import training_text

CTX = 64


def _chunks(gguf_path, text, limit):
    from convert.evaluate import LogitsModel
    from convert.imatrix import split_chunks

    with LogitsModel(gguf_path, n_ctx=CTX) as model:
        return split_chunks(model.tokenize(text), CTX, model.bos if model.add_bos else None, limit)


def _gguf_names(gguf_path, n_layers):
    import gguf

    from convert_helpers import gguf_fields

    arch_name = gguf_fields(gguf_path)["general.architecture"]
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    return gguf.get_tensor_name_map(arch, n_layers)


def hand_imatrix(checkpoint, chunks) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (sums [n_mat, n_cols], counts [n_mat]) from transformers in float32, summed in float64."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def add(name, rows, expert=0, n_mat=1):
        rows = rows.detach().reshape(-1, rows.shape[-1]).double()
        if name not in sums:
            sums[name] = np.zeros((n_mat, rows.shape[-1]))
            counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums[name][expert] += (rows * rows).sum(0).numpy()
        counts[name][expert] += rows.shape[0]

    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=module_name: add(name, args[0])))
        if hasattr(module, "experts") and hasattr(module, "gate"):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=module_name: _experts(add, name, m, args[0])))
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor([chunk]))
    for hook in hooks:
        hook.remove()
    return {name: (sums[name], counts[name]) for name in sums}, model.config


def _experts(add, name, block, hidden):
    """The router's input, and each expert's inputs, recomputed from the router's top-k choice."""
    import torch

    x = hidden.reshape(-1, hidden.shape[-1]).double()
    add(f"{name}.gate", x)  # the router
    router = block.gate.weight.double()
    chosen = torch.topk(x @ router.T, block.gate.top_k, dim=-1).indices  # softmax keeps the order
    experts = block.experts
    n = experts.gate_up_proj.shape[0]
    for e in range(n):
        rows = x[(chosen == e).any(-1)]
        gate, up = torch.nn.functional.linear(rows, experts.gate_up_proj[e].double()).chunk(2, dim=-1)
        add(f"{name}.experts.gate_proj", rows, e, n)
        add(f"{name}.experts.up_proj", rows, e, n)
        add(f"{name}.experts.down_proj", experts.act_fn(gate) * up, e, n)


def _to_gguf(hand, config, gguf_path):
    table = _gguf_names(gguf_path, config.num_hidden_layers)
    out = {}
    for name, value in hand.items():
        if name == "lm_head":
            gguf_name = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        else:
            gguf_name = table.get_name(name + ".weight", try_suffixes=(".weight",))
            assert gguf_name, f"no GGUF name for {name}"
        out[gguf_name] = value
    return out


@pytest.mark.parametrize("case", ["llama-spm-gqa", "qwen2-bpe-tied", "qwen3moe-bpe", "mixtral-spm"])
def test_imatrix_matches_torch_hooks(tiny_builds, case):
    from convert import imatrix

    checkpoint, f32, _ = tiny_builds.get(case)
    chunks = _chunks(f32, training_text(), 3)
    assert len(chunks) == 3
    ours = imatrix.compute(f32, training_text(), ctx=CTX, chunks=3, resumable=False)
    hand, config = hand_imatrix(checkpoint, chunks)
    expected = _to_gguf(hand, config, f32)

    assert set(ours.data.sums) == set(expected), "the same weight matrices, by their GGUF names"
    means = ours.means()
    for name, (sums, counts) in expected.items():
        np.testing.assert_array_equal(ours.data.counts[name], counts, err_msg=name)
        want = (sums / np.maximum(counts, 1)[:, None]).reshape(-1)
        np.testing.assert_allclose(means[name], want, rtol=1e-4, atol=1e-7 * want.max(), err_msg=name)
    if "moe" in case or "mixtral" in case:
        exps = [name for name in expected if "_exps" in name]
        assert exps and all(ours.data.counts[name].shape == (4,) for name in exps)
        assert all(ours.data.counts[name].sum() == 2 * 3 * CTX for name in exps), "2 experts per token"
    if case.endswith("tied"):
        assert "token_embd.weight" in ours.data.sums and "output.weight" not in ours.data.sums


# -- the file: our reader, llama.cpp's reader, llama.cpp's quantizer --------------------------


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_builds, tmp_path_factory):
    from convert import imatrix

    _, f32, f16 = tiny_builds.get("mixtral-spm")
    path = tmp_path_factory.mktemp("imatrix") / "mixtral.imatrix.gguf"
    made = imatrix.compute_file(f32, path, training_text(), text_name="training_text", ctx=CTX, chunks=2,
                                resumable=False)
    return made, path, f16


def _llama_cpp_read(path):
    """Our file through llama.cpp's own GGUF reader (libggml's gguf_init_from_file): keys and tensors."""
    import ctypes

    from convert.imatrix_ggml import GgmlTensor, _ggml

    lib = _ggml().lib

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    for name, res, args in [
        ("gguf_find_key", ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
        ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
        ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
        ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        ("ggml_get_tensor", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        ("gguf_free", None, [ctypes.c_void_p]),
        ("ggml_free", None, [ctypes.c_void_p]),
    ]:
        getattr(lib, name).restype = res
        getattr(lib, name).argtypes = args
    ggml_ctx = ctypes.c_void_p()
    gguf_ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(False, ctypes.pointer(ggml_ctx)))
    assert gguf_ctx, "llama.cpp's reader refused the file"
    try:
        key = lambda k: lib.gguf_find_key(gguf_ctx, k.encode())  # noqa: E731
        keys = {
            "general.type": lib.gguf_get_val_str(gguf_ctx, key("general.type")).decode(),
            "imatrix.chunk_count": lib.gguf_get_val_u32(gguf_ctx, key("imatrix.chunk_count")),
            "imatrix.chunk_size": lib.gguf_get_val_u32(gguf_ctx, key("imatrix.chunk_size")),
            "imatrix.datasets": [
                lib.gguf_get_arr_str(gguf_ctx, key("imatrix.datasets"), i).decode()
                for i in range(lib.gguf_get_arr_n(gguf_ctx, key("imatrix.datasets")))
            ],
        }
        tensors = {}
        for i in range(lib.gguf_get_n_tensors(gguf_ctx)):
            name = lib.gguf_get_tensor_name(gguf_ctx, i)
            assert lib.gguf_get_tensor_type(gguf_ctx, i) == 0, "F32"
            t = GgmlTensor.from_address(lib.ggml_get_tensor(ggml_ctx, name))
            n = int(np.prod([t.ne[d] for d in range(4)]))
            values = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(n,)).copy()
            tensors[name.decode()] = values.reshape(int(t.ne[1]), int(t.ne[0]))
        return keys, tensors
    finally:
        lib.gguf_free(gguf_ctx)
        lib.ggml_free(ggml_ctx)


def test_imatrix_file_round_trips_through_our_reader_and_llama_cpp(tiny_imatrix):
    from convert.imatrix_file import read_imatrix
    from convert.quantize import load_imatrix

    made, path, _ = tiny_imatrix
    back = read_imatrix(path)
    assert set(back.data.sums) == set(made.data.sums)
    for name in made.data.sums:
        np.testing.assert_allclose(back.data.sums[name], made.data.sums[name], rtol=1e-6)
        np.testing.assert_array_equal(back.data.counts[name], made.data.counts[name])
    assert (back.chunk_count, back.chunk_size, back.datasets) == (2, CTX, ["training_text"])
    assert back.text_sha256 == made.text_sha256 and back.model_sha256 == made.model_sha256
    means = load_imatrix(path)
    assert means.keys() == made.means().keys()

    keys, tensors = _llama_cpp_read(path)
    assert keys == {"general.type": "imatrix", "imatrix.chunk_count": 2, "imatrix.chunk_size": CTX,
                    "imatrix.datasets": ["training_text"]}
    assert set(tensors) == {f"{n}.{part}" for n in made.data.sums for part in ("in_sum2", "counts")}
    for name, sums in made.data.sums.items():
        np.testing.assert_allclose(tensors[f"{name}.in_sum2"], sums, rtol=1e-6)
        np.testing.assert_array_equal(tensors[f"{name}.counts"][:, 0], made.data.counts[name])
    assert tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape[0] == 4, "one row of sums per expert"


def test_llama_cpp_quantizes_with_our_imatrix(tiny_imatrix, tmp_path):
    from convert.quantize import quantize
    from convert_helpers import gguf_fields, gguf_tensors

    _, path, f16 = tiny_imatrix
    plain = quantize(f16, tmp_path / "plain.gguf", "Q4_0").path
    weighted = quantize(f16, tmp_path / "weighted.gguf", "Q4_0", imatrix=path).path
    a, b = gguf_tensors(plain), gguf_tensors(weighted)
    changed = [name for name in a if a[name][0] == "Q4_0" and not np.array_equal(a[name][2], b[name][2])]
    assert "blk.0.ffn_down_exps.weight" in changed and "blk.1.attn_q.weight" in changed
    fields = gguf_fields(weighted)
    assert fields["quantize.imatrix.file"] == path.name
    assert fields["quantize.imatrix.chunks_count"] == 2 and fields["quantize.imatrix.dataset"] == "training_text"


# -- bad files: one line, exit 1, nothing written ------------------------------------------------


def _run(capsys, *argv):
    from convert.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_truncated_foreign_or_model_imatrix_is_one_line_and_nothing_is_written(tiny_builds, tiny_imatrix, tmp_path,
                                                                               capsys):
    _, good, _ = tiny_imatrix  # made on the tiny Mixtral
    _, _, llama_f16 = tiny_builds.get("llama-spm-gqa")
    truncated = tmp_path / "truncated.gguf"
    raw = good.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    capsys.readouterr()
    cases = {
        truncated: "not a valid importance matrix",
        good: "is not an importance matrix of",  # foreign: the Mixtral's experts are not the Llama's
        llama_f16: "is a model file, not an importance matrix",
    }
    for cut in (len(raw) // 3, len(raw) - 40, 100):  # in the tensors, in the last one, in the header
        truncated.write_bytes(raw[:cut])
        for bad, message in cases.items():
            code, err = _run(capsys, "quantize", llama_f16, "--type", "Q4_0", "--imatrix", bad,
                             "-o", out_dir / "q.gguf", "--no-eval")
            assert code == 1, (bad, err)
            errors = [line for line in err if line.startswith("alpaca-convert: error:")]
            assert len(errors) == 1 and message in errors[0], err
            assert not any("Traceback" in line for line in err)
            assert list(out_dir.iterdir()) == [], "nothing written"


def test_reads_llama_imatrix_files_whose_single_matrices_are_one_dimensional(tmp_path):
    """llama-imatrix writes [n_cols, 1] sums and [1, 1] counts, which GGUF stores as [n_cols] and [1]."""
    import gguf

    from convert.imatrix_file import read_imatrix

    path = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(path, arch="")
    writer.kv_data[0].pop("general.architecture", None)
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", ["wiki.train.raw"])
    writer.add_uint32("imatrix.chunk_count", 3)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([3.0, 6.0, 9.0], dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([3.0], dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.array([[2.0, 4.0], [1.0, 1.0]], dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[2.0], [0.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = read_imatrix(path)
    means = read.means()
    np.testing.assert_allclose(means["blk.0.attn_q.weight"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(means["blk.0.ffn_up_exps.weight"], [1.0, 2.0, 1.0, 1.0])  # expert 1 saw nothing
    assert read.datasets == ["wiki.train.raw"] and read.chunk_count == 3
    assert read.partial_entries() == ["blk.0.ffn_up_exps.weight"]
