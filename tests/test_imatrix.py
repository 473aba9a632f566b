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
