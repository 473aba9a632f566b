"""`alpaca-convert export-adapter`: peft LoRA adapters -> llama.cpp LoRA adapter GGUFs.

For one tiny case of every architecture the exporter registers (tests/arch_cases/): a peft
adapter with random, nonzero lora_B on the family's default targets (the fine-tune's own
table), exported, then applied by llama.cpp (through the engine) on the base's F32 GGUF:
the last-token logits must equal the merged peft model's within the family's tolerance,
and differ clearly from the base's. The cases cover q/k rows permuted for rope (Llama,
Mistral, Granite, SmolLM3), fused projections (Phi-3 qkv_proj and gate_up_proj, GLM
gate_up_proj), tied embeddings (Qwen2, Qwen3), an untied embedding and head adapted
(Llama), a Gemma 3 language model inside its image-text wrapper, and rsLoRA with per-module
ranks and alphas. llama.cpp's own convert_lora_to_gguf.py converts the same adapters and
its tensors are compared byte by byte with ours. Adapters llama.cpp cannot apply are
refused in one line, with nothing written.
"""

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from convert_helpers import (
    CASES,
    TINY_CASES,
    gguf_fields,
    gguf_tensors,
    random_sequences,
    reference_converter_or_fail,
    same_bytes,
)

pytest.importorskip("peft", reason="needs the convert extra")

import torch  # noqa: E402

from alpaca_chat.engine import AdapterSpec, BaseLayout, Engine, check_adapter  # noqa: E402
from convert.cli import main as convert_main  # noqa: E402
from convert.export.adapter import export_adapter  # noqa: E402
from convert.finetune_config import LORA_DEFAULTS  # noqa: E402

# The first case of each architecture: every family the exporter supports.
FAMILY_CASES = list({case.architecture: case.name for case in TINY_CASES}.values())
UNTIED = "llama-spm-gqa"  # also adapts its embedding and its (untied) output head
RANK, ALPHA = 4, 8


def targets(checkpoint: Path, *, head: bool = False):
    """The fine-tune's default LoRA targets for this family (what the pipeline trains)."""
    config = json.loads((checkpoint / "config.json").read_text())
    wanted = LORA_DEFAULTS[config["model_type"]].target_modules
    if head:
        wanted = [*wanted, "embed_tokens", "lm_head"]
    return wanted if isinstance(wanted, str) else list(wanted)


def make_adapter(checkpoint: Path, out: Path, target_modules, *, seed: int = 3, **lora):
    """A peft adapter on `checkpoint` with random A and B, saved to `out`; returns the base's and the
    merged model's last-token logits on a few sequences."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = peft.LoraConfig(r=lora.pop("r", RANK), lora_alpha=lora.pop("lora_alpha", ALPHA),
                             target_modules=target_modules, **lora)
    model = peft.get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)  # lora_B too: peft starts it at zero, which would test nothing
    model.save_pretrained(out)
    sequences = random_sequences(model.get_base_model().config.get_text_config().vocab_size)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = [model(torch.tensor([ids])).logits[0, -1].numpy().copy() for ids in sequences]
        merged = model.merge_and_unload()
        want = [merged(torch.tensor([ids])).logits[0, -1].numpy().copy() for ids in sequences]
    return sequences, base, want


def adapted_logits(base_gguf: Path, adapter_gguf: Path, sequences):
    with Engine(base_gguf, n_ctx=128, n_batch=128, exact=True, adapters=[AdapterSpec(adapter_gguf)]) as engine:
        return [engine.sequence_logits(ids, len(ids) - 1)[0] for ids in sequences]


class Adapters:
    """Each case's adapter (and peft's logits), built on first use and kept for the module."""

    def __init__(self, root: Path, tiny_builds):
        self.root, self.tiny_builds, self.built = root, tiny_builds, {}

    def get(self, name: str, variant: str = "default", **lora):
        key = (name, variant)
        if key not in self.built:
            checkpoint, f32, _ = self.tiny_builds.get(name)
            adapter = self.root / f"{name}-{variant}"
            modules = lora.pop("target_modules", None) or targets(checkpoint, head=name == UNTIED)
            sequences, base, want = make_adapter(checkpoint, adapter, modules, **lora)
            self.built[key] = (checkpoint, f32, adapter, sequences, base, want)
        return self.built[key]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_builds):
    return Adapters(tmp_path_factory.mktemp("adapters"), tiny_builds)


def _check_logits(name, f32, out, sequences, base, want):
    tolerance = CASES[name].f32_tolerance
    got = adapted_logits(f32, out, sequences)
    for ids, b, w, g in zip(sequences, base, want, got):
        assert np.abs(w - b).max() > 100 * tolerance, "the adapter hardly changes the model: the test would prove nothing"
        assert np.abs(g - w).max() < tolerance, f"{name}: base + adapter differs from peft after {len(ids)} tokens"


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_base_plus_adapter_equals_peft(adapters, tmp_path, name):
    checkpoint, f32, adapter, sequences, base, want = adapters.get(name)
    result = export_adapter(adapter, tmp_path / "adapter.gguf", "f32", base=str(checkpoint))
    fields = gguf_fields(result.path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == gguf_fields(f32)["general.architecture"]
    assert fields["adapter.lora.alpha"] == ALPHA
    _check_logits(name, f32, result.path, sequences, base, want)


def test_rslora_and_per_module_ranks_and_alphas(adapters, tmp_path):
    """rsLoRA scales by alpha / sqrt(r); rank_pattern and alpha_pattern give modules their own: llama.cpp's
    one alpha / rank per file is set for the default, and the other modules' ratio folded into lora_b."""
    checkpoint, f32, adapter, sequences, base, want = adapters.get(
        UNTIED, "rslora", use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3},
    )
    result = export_adapter(adapter, tmp_path / "rs.gguf", "f32")  # the base from adapter_config.json
    assert math.isclose(gguf_fields(result.path)["adapter.lora.alpha"], ALPHA * math.sqrt(RANK), rel_tol=1e-6)
    assert result.ranks == (2, RANK)
    _check_logits(UNTIED, f32, result.path, sequences, base, want)


# -- llama.cpp's convert_lora_to_gguf.py as the oracle ---------------------------------

ORACLE_CASES = [UNTIED, "phi3-spm-fused", "glm-4-chat-hf-bpe", "qwen2-bpe-tied", "mistral-spm-linear-rope"]
# Runs the oracle script once per adapter in one process: torch and transformers load once.
_RUN_ORACLE = """
import runpy, sys
script = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
for job in sys.argv[2:]:
    adapter, base, out, outtype = job.split("|")
    sys.argv = [script, adapter, "--base", base, "--outfile", out, "--outtype", outtype]
    runpy.run_path(script, run_name="__main__")
"""


def lora_oracle(converter: Path) -> Path:
    """convert_lora_to_gguf.py, from the same llama-cpp-python sdist as the model converter's oracle."""
    script = converter.with_name("convert_lora_to_gguf.py")
    if not script.is_file():
        sdist = next(converter.parent.parent.glob("llama_cpp_python-*.tar.gz"))
        member = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/convert_lora_to_gguf.py"
        with tarfile.open(sdist) as tar:
            script.write_bytes(tar.extractfile(member).read())
    return script


def test_tensors_match_llama_cpp_converter(request, tmp_path_factory, adapters, tmp_path):
    script = lora_oracle(reference_converter_or_fail(request, tmp_path_factory))
    jobs, ours = [], {}
    for name, outtype in [(n, "f16") for n in ORACLE_CASES] + [(UNTIED, "q8_0")]:
        checkpoint, f32, adapter, *_ = adapters.get(name)
        theirs = tmp_path / f"{name}.{outtype}.oracle.gguf"
        jobs.append(f"{adapter}|{checkpoint}|{theirs}|{outtype}")
        mine = export_adapter(adapter, tmp_path / f"{name}.{outtype}.gguf", outtype).path
        check_adapter(mine, BaseLayout.of_model(f32))  # what alpaca-chat checks before llama.cpp loads it
        ours[(name, outtype)] = (mine, theirs)
    done = subprocess.run([sys.executable, "-c", _RUN_ORACLE, str(script), *jobs], capture_output=True, text=True,
                          timeout=600, cwd=script.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    for (name, outtype), (mine, theirs) in ours.items():
        mine_fields, their_fields = gguf_fields(mine), gguf_fields(theirs)
        for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
            assert mine_fields[key] == their_fields[key], f"{name} {outtype}: {key}"
        mine_tensors, their_tensors = gguf_tensors(mine), gguf_tensors(theirs)
        assert sorted(mine_tensors) == sorted(their_tensors), f"{name} {outtype}: tensor names"
        for tensor, (qtype, shape, data) in mine_tensors.items():
            their_qtype, their_shape, their_data = their_tensors[tensor]
            assert (qtype, shape) == (their_qtype, their_shape), f"{name} {outtype}: {tensor}"
            assert same_bytes(data, their_data), f"{name} {outtype}: {tensor} bytes differ"


# -- the command line, and adapters llama.cpp cannot apply ----------------------------


def run_cli(capsys, *argv):
    code = convert_main(["export-adapter", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_command_line_writes_the_adapter(adapters, tmp_path, capsys):
    checkpoint, _, adapter, *_ = adapters.get(UNTIED)
    out = tmp_path / "mine.gguf"
    code, printed, _ = run_cli(capsys, adapter, "--base", checkpoint, "-o", out)
    assert code == 0 and out.is_file()
    assert f"--lora {out}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gguf"]  # no stray temp file


def write_adapter(out: Path, base: Path, pairs: dict, **config) -> Path:
    """A hand-written peft adapter directory: `pairs` maps adapter tensor names (without peft's
    base_model.model. prefix) to arrays."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "base_model_name_or_path": str(base), **config}
    (out / "adapter_config.json").write_text(json.dumps(settings))
    save_file({f"base_model.model.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in pairs.items()},
              out / "adapter_model.safetensors")
    return out


def lora(module: str, rows: int, cols: int, rank: int = RANK) -> dict:
    rng = np.random.default_rng(0)
    return {f"{module}.lora_A.weight": rng.standard_normal((rank, cols)),
            f"{module}.lora_B.weight": rng.standard_normal((rows, rank))}


Q_PROJ = "model.layers.0.self_attn.q_proj"


def bad_adapters(tiny_builds, root: Path):
    """(case, adapter dir, --base, words the one-line error must contain)."""
    llama, _, _ = tiny_builds.get(UNTIED)
    tied, _, _ = tiny_builds.get("qwen2-bpe-tied")
    mixtral, _, _ = tiny_builds.get("mixtral-spm")
    phi3, _, _ = tiny_builds.get("phi3-spm-fused")
    config = json.loads((tied / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    good = lora(Q_PROJ, 64, 64)
    dora = {**good, f"{Q_PROJ}.lora_magnitude_vector": np.ones(64)}
    from safetensors import safe_open

    with safe_open(mixtral / "model.safetensors", "np") as f:
        expert = next(n for n in f.keys() if ".experts." in n and n.endswith(".weight"))
        expert_shape = f.get_slice(expert).get_shape()
    cases = {
        "dora": (write_adapter(root / "dora", llama, dora, use_dora=True), None, ["DoRA", "merge"]),
        "dora-tensors-only": (write_adapter(root / "dora2", llama, dora), None, ["DoRA magnitude"]),
        "another-family": (write_adapter(root / "other", llama, good), phi3, [Q_PROJ, "not in the base model"]),
        "wrong-shapes": (write_adapter(root / "shapes", llama, lora(Q_PROJ, 64, 48)), None, [Q_PROJ, "do not fit"]),
        "tied-head": (write_adapter(root / "head", tied, lora("lm_head", vocab, hidden)), None, ["tied"]),
        "tied-embedding": (write_adapter(root / "embd", tied, {
            "model.embed_tokens.lora_embedding_A": np.ones((RANK, vocab)),
            "model.embed_tokens.lora_embedding_B": np.ones((hidden, RANK))}), None, ["ties its output head"]),
        "expert": (write_adapter(root / "expert", mixtral, lora(expert[: -len(".weight")], *expert_shape)), None,
                   ["stacks", "ffn_"]),
        "modules-to-save": (write_adapter(root / "save", llama, {**good, "model.norm.weight": np.ones(64)}), None,
                            ["modules_to_save"]),
        "missing-half": (write_adapter(root / "half", llama, {f"{Q_PROJ}.lora_A.weight": np.ones((RANK, 64))}), None,
                         ["no lora_B"]),
        "nan-alpha": (write_adapter(root / "nan", llama, good, lora_alpha=float("nan")), None, ["lora_alpha"]),
        "not-lora": (write_adapter(root / "ia3", llama, good, peft_type="IA3"), None, ["IA3", "only LoRA"]),
        "wrong-base-dir": (write_adapter(root / "nobase", root / "no-such-base", good), None, ["base model"]),
        "no-config": (root / "empty", None, ["adapter_config.json"]),
        "not-a-directory": (root / "missing", None, ["not found"]),
    }
    (root / "empty").mkdir(exist_ok=True)
    pickled = write_adapter(root / "pickled", llama, good)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases["pickled"] = (pickled, None, ["pickled", "safetensors"])
    return cases


BAD = ["dora", "dora-tensors-only", "another-family", "wrong-shapes", "tied-head", "tied-embedding", "expert",
       "modules-to-save", "missing-half", "nan-alpha", "not-lora", "wrong-base-dir", "no-config", "not-a-directory",
       "pickled"]


@pytest.fixture(scope="module")
def bad(tiny_builds, tmp_path_factory):
    return bad_adapters(tiny_builds, tmp_path_factory.mktemp("bad-adapters"))


@pytest.mark.parametrize("kind", BAD)
def test_bad_adapter_is_one_line_and_writes_nothing(bad, tmp_path, capsys, kind):
    adapter, base, words = bad[kind]
    out = tmp_path / "out.gguf"
    code, _, err = run_cli(capsys, adapter, *(["--base", base] if base else []), "-o", out)
    assert code == 1, err
    errors = [line for line in err if line.startswith("alpaca-convert: error:")]
    assert len(errors) == 1 and errors[0] == err[-1] and "Traceback" not in "\n".join(err), err
    for word in words:
        assert word in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(adapters, tmp_path, capsys):
    checkpoint, _, adapter, *_ = adapters.get(UNTIED)
    nobase = tmp_path / "nobase"
    nobase.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path", None)
    (nobase / "adapter_config.json").write_text(json.dumps(config))
    (nobase / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    code, _, err = run_cli(capsys, nobase, "-o", tmp_path / "a.gguf")
    assert code == 2 and "--base" in err[-1] and err[-1].startswith("alpaca-convert: error:")
    code, _, err = run_cli(capsys, adapter, "--outtype", "q4_0", "-o", tmp_path / "b.gguf")
    assert code == 2 and len(err) == 1 and err[0].startswith("alpaca-convert: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nobase"]
