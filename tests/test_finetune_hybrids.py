"""Fine-tuning hybrid models on a CPU: Qwen3.5 (gated DeltaNet), Granite 4 (Mamba-2) and LFM2
(short convolutions) load and train through transformers' PyTorch code, with or without the
GPU-only kernel packages (causal-conv1d, mamba-ssm, flash-linear-attention) installed.

Tiny models built from transformers' config classes, saved as safetensors checkpoints and
loaded by convert/model_loading.py as `alpaca-convert finetune` loads a base.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("peft", reason="needs the convert extra")

import torch  # noqa: E402
import transformers  # noqa: E402

from alpaca_chat.errors import UsageError  # noqa: E402
from convert import data, finetune, model_loading  # noqa: E402
from convert.finetune_config import FinetuneConfig  # noqa: E402
from convert.packing import PackedCollator, carried_state, packed_loss  # noqa: E402

_COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128}
# Each family with the projections of its token mixer, which the LoRA defaults must reach.
HYBRIDS = {
    "qwen3_5_text": (
        lambda: transformers.Qwen3_5TextConfig(
            **_COMMON, head_dim=16, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        ),
        ("linear_attn.in_proj_qkv", "linear_attn.out_proj"),
    ),
    "granitemoehybrid": (
        lambda: transformers.GraniteMoeHybridConfig(
            **_COMMON, num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=0,
            shared_intermediate_size=96, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16,
        ),
        ("mamba.in_proj", "mamba.out_proj"),
    ),
    "lfm2": (
        lambda: transformers.Lfm2Config(
            **_COMMON, num_hidden_layers=2, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
        ),
        ("conv.in_proj", "conv.out_proj"),
    ),
}
LENGTHS = (12, 5, 20, 9)


def assert_experts_routers_and_vision_frozen(peft_model):
    """No LoRA on a routed expert (peft can wrap fused expert parameters), a router or a vision tower."""
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert not peft_model.peft_config["default"].target_parameters, "LoRA on fused expert parameters"
    frozen = [
        n for n in wrapped
        if ".experts" in n or "router" in n or n.endswith((".gate", "_gate")) or "vision" in n or "audio" in n
    ]
    assert not frozen, f"experts, routers and vision towers stay frozen, but these are adapted: {frozen}"


# -- LoRA defaults, straight from transformers' config classes -------------------------------

_TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128, "num_hidden_layers": 2}
_DELTANET = {"layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": 16,
             "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_GEMMA4 = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
           "vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 16}
_NO_HEAD_DIM = {k: v for k, v in _TINY.items() if k != "head_dim"}
# Every model_type of the 2026 families as transformers names it (config.model_type), and whether
# its layers carry a state across tokens (then packing is off for it).
MODEL_TYPES = {
    "qwen3_5_text": (lambda: transformers.Qwen3_5TextConfig(**_TINY, **_DELTANET), True),
    "qwen3_5": (lambda: transformers.Qwen3_5Config(text_config={**_TINY, **_DELTANET}), True),
    "qwen3_5_moe_text": (lambda: transformers.Qwen3_5MoeTextConfig(
        **_TINY, **_DELTANET, **_MOE, shared_expert_intermediate_size=32), True),
    "qwen3_5_moe": (lambda: transformers.Qwen3_5MoeConfig(
        text_config={**_TINY, **_DELTANET, **_MOE, "shared_expert_intermediate_size": 32}), True),
    "qwen3_next": (lambda: transformers.Qwen3NextConfig(
        **_TINY, **_DELTANET, **_MOE, shared_expert_intermediate_size=32), True),
    "gemma4_text": (lambda: transformers.Gemma4TextConfig(**_TINY, **_GEMMA4), False),
    "gemma4": (lambda: transformers.Gemma4Config(
        text_config={**_TINY, **_GEMMA4, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                     "moe_intermediate_size": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16},
        audio_config=None), False),
    "granitemoehybrid": (lambda: transformers.GraniteMoeHybridConfig(
        **_NO_HEAD_DIM, layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2,
        shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16), True),
    "lfm2": (lambda: transformers.Lfm2Config(
        **_NO_HEAD_DIM, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False), True),
    "lfm2_moe": (lambda: transformers.Lfm2MoeConfig(
        **_NO_HEAD_DIM, layer_types=["conv", "full_attention"], num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, num_dense_layers=1), True),
    "olmo3": (lambda: transformers.Olmo3Config(
        **_NO_HEAD_DIM, layer_types=["sliding_attention", "full_attention"], sliding_window=8), False),
    "ernie4_5": (lambda: transformers.Ernie4_5Config(**_TINY), False),
    "ernie4_5_moe": (lambda: transformers.Ernie4_5_MoeConfig(
        **_TINY, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1), False),
    "glm4_moe": (lambda: transformers.Glm4MoeConfig(
        **_TINY, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1), False),
}


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_lora_defaults_of_each_2026_model_type(model_type):
    """Each default names Linear layers of the model AutoModelForCausalLM builds for that config
    (the token mixers' projections of the hybrids among them), and leaves experts, routers and
    vision towers frozen; packing is off exactly where layers carry a state."""
    make_config, stateful = MODEL_TYPES[model_type]
    config = make_config()
    assert config.model_type == model_type and model_type in finetune.LORA_DEFAULTS
    assert (carried_state(config) is not None) == stateful
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    settings = finetune.lora_settings(model_type, FinetuneConfig(base="b", data="d", out="o"))
    peft_model = finetune.add_lora(model, settings)
    adapted = [n for n, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]
    if isinstance(settings.target_modules, tuple):
        for target in settings.target_modules:
            assert any(n.endswith(f".{target}") for n in adapted), f"{target} matches no Linear layer"
    else:
        assert any(".language_model." in n for n in adapted)
    assert_experts_routers_and_vision_frozen(peft_model)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrids")
    paths = {}
    for model_type, (make_config, _) in HYBRIDS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make_config())
        model.save_pretrained(root / model_type)  # safetensors: what load_model accepts
        paths[model_type] = root / model_type
    return paths


def batch(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]
    return PackedCollator()([data.Example(tuple(e), tuple(e)) for e in examples])


def train(checkpoint, steps: int) -> tuple[list[float], dict]:
    """`steps` AdamW steps of the default LoRA on one packed batch, as the trainer computes the loss;
    the losses, and the adapted module names with their gradient norms at the first step."""
    model = model_loading.load_model(checkpoint, "cpu")
    settings = finetune.lora_settings(model.config.model_type, FinetuneConfig(base="b", data="d", out="o"))
    torch.manual_seed(0)  # lora_A's initialization
    model = finetune.add_lora(model, settings).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(model.config.vocab_size)
    losses, gradients = [], {}
    for step in range(steps):
        loss, _ = packed_loss(model, inputs, chunk_tokens=32)
        loss.backward()
        if step == 0:
            gradients = {
                name.removesuffix(".lora_B.default.weight"): p.grad.norm().item()
                for name, p in model.named_parameters() if name.endswith("lora_B.default.weight")
            }
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, gradients


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_hybrid_trains_on_the_cpu_and_the_loss_falls(checkpoints, model_type):
    """transformers runs these layers in PyTorch on a CPU; the LoRA on the token mixer gets a
    gradient, and a few steps on one batch bring the loss down."""
    _, mixer = HYBRIDS[model_type]
    assert carried_state(model_loading.load_model_config(checkpoints[model_type])) is not None
    losses, gradients = train(checkpoints[model_type], steps=6)
    for name in mixer:
        adapted = [g for n, g in gradients.items() if n.endswith(name)]
        assert adapted and all(g > 0 for g in adapted), f"no gradient reaches the LoRA of {name}: {gradients}"
    assert all(torch.isfinite(torch.tensor(losses)))
    falling = all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert falling and losses[-1] < 0.85 * losses[0], f"the loss did not fall: {losses}"


# Stand-ins for the kernel packages, importable where they are not installed: transformers imports
# them when it loads the modeling code, and must never call them for CPU tensors (they raise).
_FAKE_PACKAGES = {
    "causal_conv1d/__init__.py": ("causal_conv1d_fn", "causal_conv1d_update"),
    "fla/__init__.py": (),
    "fla/ops/__init__.py": (),
    "fla/ops/gated_delta_rule/__init__.py": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "mamba_ssm/__init__.py": (),
    "mamba_ssm/ops/__init__.py": (),
    "mamba_ssm/ops/triton/__init__.py": (),
    "mamba_ssm/ops/triton/ssd_combined.py": ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined"),
    "mamba_ssm/ops/triton/selective_state_update.py": ("selective_state_update",),
}
_FAKE_FUNCTION = """
def {name}(*args, **kwargs):
    raise RuntimeError("{name}: this stand-in for a CUDA kernel was called with CPU tensors")
"""


def test_kernel_packages_installed_without_a_gpu_do_not_break_training(checkpoints, tmp_path):
    """With causal-conv1d, mamba-ssm and flash-linear-attention importable (as on a machine that
    has them installed but trains on the CPU), transformers takes them up and still runs CPU
    tensors through its PyTorch code: each hybrid trains, and the same losses come out."""
    for path, functions in _FAKE_PACKAGES.items():
        file = tmp_path / "site" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("".join(_FAKE_FUNCTION.format(name=name) for name in functions), encoding="utf-8")
    script = textwrap.dedent("""
        import json, sys
        import test_finetune_hybrids as t
        losses = {name: t.train(path, steps=2)[0] for name, path in json.loads(sys.argv[1]).items()}
        taken = [m for m in ("causal_conv1d", "fla.ops.gated_delta_rule", "mamba_ssm.ops.triton.ssd_combined")
                 if m in sys.modules and sys.modules[m].__file__.startswith(sys.argv[2])]
        print(json.dumps({"losses": losses, "taken": taken}))
    """)
    tests_dir = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), tests_dir, os.getcwd()]),
               CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in checkpoints.items()}), str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(report["taken"]) == ["causal_conv1d", "fla.ops.gated_delta_rule", "mamba_ssm.ops.triton.ssd_combined"]
    for model_type, checkpoint in checkpoints.items():
        expected, _ = train(checkpoint, steps=2)
        assert report["losses"][model_type] == pytest.approx(expected, rel=1e-5), model_type


def test_mamba_out_proj_is_left_out_where_the_fused_gpu_kernel_would_skip_its_lora(monkeypatch):
    """mamba_ssm's fused Mamba-2 training kernel multiplies by out_proj's weight itself: on a GPU
    with mamba_ssm, the default leaves out_proj out (and an explicit choice of it is refused)."""
    import importlib.util

    config = FinetuneConfig(base="b", data="d", out="o")
    granite = finetune.lora_settings("granitemoehybrid", config)
    assert "out_proj" in granite.target_modules
    real_find_spec = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "mamba_ssm" and installed else real_find_spec(name, *a))
        on_gpu = finetune.without_bypassed_targets(granite, "granitemoehybrid", "cuda", chosen=False)
        assert ("out_proj" in on_gpu.target_modules) != installed
        assert "in_proj" in on_gpu.target_modules
        on_cpu = finetune.without_bypassed_targets(granite, "granitemoehybrid", "cpu", chosen=False)
        assert on_cpu == granite
        lfm2 = finetune.lora_settings("lfm2", config)  # a short convolution: no fused kernel
        assert finetune.without_bypassed_targets(lfm2, "lfm2", "cuda", chosen=False) == lfm2
    with pytest.raises(UsageError, match="out_proj"):
        finetune.without_bypassed_targets(granite, "granitemoehybrid", "cuda", chosen=True)


def test_padded_batches_of_a_stateful_model():
    """Each example in a row of its own, right-padded with untrained positions; batches stay within
    the chunk budget (rows x longest), longest first unless the row's order is asked for."""
    from convert.packing import forward_pieces

    config, _ = MODEL_TYPES["lfm2"]
    lengths = (3, 10, 4, 12, 2, 7)
    examples = [list(range(100 + 20 * i, 100 + 20 * i + n)) for i, n in enumerate(lengths)]
    inputs = PackedCollator()([data.Example(tuple(e), tuple(e)) for e in examples])
    for keep_order in (False, True):
        pieces = forward_pieces(config(), inputs, 24, keep_order=keep_order)
        rows = []
        for piece in pieces:
            assert piece["input_ids"].numel() <= 24 or piece["input_ids"].shape[0] == 1
            for ids, positions, targets in zip(piece["input_ids"], piece["position_ids"], piece["shift_labels"]):
                n = int(targets.ne(data.IGNORE_INDEX).sum()) + 1  # the last token has no target
                assert positions.tolist() == list(range(len(positions)))
                assert targets[n:].eq(data.IGNORE_INDEX).all()
                rows.append(ids[:n].tolist())
        assert sorted(rows) == sorted(examples)
        in_order = [len(r) for r in rows]
        assert in_order == (list(lengths) if keep_order else sorted(lengths, reverse=True))
