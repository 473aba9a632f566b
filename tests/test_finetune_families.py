"""Fine-tuning every family of tests/arch_cases: LoRA defaults, packing isolation, and the
whole pipeline (finetune, merge, export, Q4_K_M, chat) on each tiny random checkpoint.

One parameter per case that exists when the tests are collected, so a family whose
exporter or case lands later is picked up by itself.
"""

import json
import subprocess
import sys

import pytest

from convert_helpers import CASES, TINY_CASES, build_tiny_model, gguf_fields
from finetune_helpers import seed_rows, write_json
from test_finetune_hybrids import assert_experts_routers_and_vision_frozen

pytest.importorskip("peft", reason="needs the convert extra")

import torch  # noqa: E402

from alpaca_chat.templates import ALPACA_JINJA  # noqa: E402
from convert import data, finetune, model_loading  # noqa: E402
from convert.finetune_config import FinetuneConfig  # noqa: E402
from convert.packing import PackedCollator, carried_state, packed_loss  # noqa: E402
from convert.pipeline import PipelineOptions, run_pipeline  # noqa: E402

CASE_NAMES = [case.name for case in TINY_CASES]
WINDOW = 5  # sliding window of the isolation variants: shorter than most examples below
LENGTHS = (9, 4, 14, 7)  # tokens of the packed examples


class Checkpoints:
    """Each case's tiny checkpoint, built on first use (no GGUF: these tests export their own)."""

    def __init__(self, root):
        self.root, self.built = root, {}

    def get(self, name):
        if name not in self.built:
            checkpoint = build_tiny_model(self.root / name, CASES[name])
            if not (checkpoint / "tokenizer.json").is_file():
                add_tokenizer_json(checkpoint)
            self.built[name] = checkpoint
        return self.built[name]


def add_tokenizer_json(checkpoint):
    """A bare tokenizer.model (the "spm" cases) gets the tokenizer.json that real Llama and Mistral
    checkpoints ship beside it: transformers 5 reads tokenizer.model only through protobuf, which
    the convert extra does not install. The exporter still reads tokenizer.model."""
    import sentencepiece
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    vocab = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    tokenizer = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab))
    tokenizer.save_pretrained(checkpoint)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return Checkpoints(tmp_path_factory.mktemp("family-checkpoints"))


def with_sliding_window(checkpoint, out):
    """A view of `checkpoint` (symlinked weights) whose sliding window, where the family has one,
    is WINDOW tokens and used by at least one layer: packing must keep it per example."""
    out.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)  # an image-text model: its language model
    if "sliding_window" in text:
        text["sliding_window"] = WINDOW
        if "use_sliding_window" in text:
            text["use_sliding_window"] = True
            text["max_window_layers"] = 0
        layer_types = text.get("layer_types")
        if layer_types and "sliding_attention" not in layer_types:
            text["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(len(layer_types))]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


# -- LoRA defaults -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_lora_defaults_name_real_linear_layers(name, checkpoints):
    checkpoint = checkpoints.get(name)
    model = model_loading.load_model(checkpoint, "cpu")
    settings = finetune.lora_settings(model.config.model_type, FinetuneConfig(base="b", data="d", out="o"))
    assert model.config.model_type in finetune.LORA_DEFAULTS, f"no LoRA defaults for {model.config.model_type}"
    peft_model = finetune.add_lora(model, settings)
    adapted = {
        n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, torch.nn.Linear)
    }
    assert adapted, "LoRA adapted nothing"
    if isinstance(settings.target_modules, tuple):  # each default name is a real Linear of this family
        for target in settings.target_modules:
            assert any(n.endswith(f".{target}") for n in adapted), f"{target} matches no Linear layer"
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert_experts_routers_and_vision_frozen(peft_model)



# -- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_packed_examples_never_see_each_other(name, checkpoints, tmp_path):
    """Logits of each example inside a packed row equal its logits alone, with the attention
    the trainer loads the family with (and a sliding window shorter than the examples).

    A family whose layers carry a convolution or recurrent state (LFM2, Granite 4, Qwen3.5,
    Qwen3-Next) leaks it from one example into the next in a packed row: transformers' PyTorch
    code ignores the position ids there. The test shows the leak (were it gone, packing could
    be turned back on for them), and that the trainer then never puts two of its examples in
    one row; the trainer's loss is the per-example loss either way."""
    checkpoint = checkpoints.get(name)
    variant = with_sliding_window(checkpoint, tmp_path / "variant")
    model = model_loading.load_model(variant, "cpu").eval()
    attention = model.config._attn_implementation
    if getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
        assert attention == "eager", "soft-capped attention must not run in sdpa, which drops the cap"
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]
    row = torch.tensor([[t for e in examples for t in e]])
    positions = torch.tensor([[p for e in examples for p in range(len(e))]])
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        # The control: the same row with one causal mask over it lets later examples see earlier ones.
        leaky = model(input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row), use_cache=False)
        alone = [model(input_ids=torch.tensor([e]), use_cache=False).logits[0] for e in examples]
    stateful = carried_state(model.config)
    start, state_leaks = 0, []
    for i, (example, expected) in enumerate(zip(examples, alone)):
        got = packed[start : start + len(example)]
        difference = (got - expected).abs().max().item()
        limit = 1e-5 * max(1.0, expected.abs().max().item())
        if stateful:
            assert i > 0 or difference <= limit, "the first example of a row has no state to inherit"
            state_leaks.append(difference)
        else:
            assert difference <= limit, f"{attention}: example {i} differs by {difference:.3g} packed vs alone"
        if i > 0:
            leak = (leaky.logits[0, start : start + len(example)] - expected).abs().max().item()
            assert leak > 1e-3, "the control does not leak: this check could not catch a leak"
        start += len(example)
    if stateful:
        # A short convolution (LFM2's 3 taps) leaks only into the first tokens of an example.
        assert max(state_leaks) > 1e-4, (
            f"packed examples no longer leak ({stateful}): transformers keeps them apart now, "
            "so convert/packing.py could pack this family again"
        )

    if getattr(model.config.get_text_config(), "sliding_window", None) == WINDOW:  # the window is in effect
        widest = max(range(len(examples)), key=lambda i: len(examples[i]))
        with torch.no_grad():
            unwindowed = model_loading.load_model(checkpoint, "cpu").eval()
            logits = unwindowed(input_ids=torch.tensor([examples[widest]]), use_cache=False).logits[0]
        assert (logits - alone[widest]).abs().max().item() > 1e-3

    # The trainer's loss on a packed batch (logits only at trained positions) is the per-example
    # loss. With longrope (Phi-3.5, Phi-4-mini) the rope frequencies of a forward pass depend on
    # its longest example, so the batch holds one longer than the original context beside short ones.
    longest = original_context(model.config) + 8
    if longest <= model.config.get_text_config().max_position_embeddings:
        examples.insert(1, torch.randint(3, vocab, (longest,), generator=generator).tolist())
    batch = PackedCollator()([data.Example(tuple(e), tuple(e)) for e in examples])
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e]), use_cache=False).logits[0] for e in examples]
        rows = RowsSeen(model)
        losses = [packed_loss(model, batch, chunk_tokens=chunk)[0] for chunk in (None, 2 * max(LENGTHS))]
        rows.remove()
    per_example = [
        torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(e[1:]), reduction="sum")
        for e, logits in zip(examples, alone)
    ]
    expected_loss = sum(per_example) / sum(len(e) - 1 for e in examples)
    for loss in losses:
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    # What the trainer's forward passes held: one example per row where state would leak, else packed rows.
    most = max(rows.examples_per_row)
    assert most == 1 if stateful else most > 1, f"up to {most} examples in a row ({stateful or 'no carried state'})"


class RowsSeen:
    """Counts the examples in each row of every forward pass of `model` (position ids restart at each)."""

    def __init__(self, model):
        self.examples_per_row = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        for row in kwargs["position_ids"].reshape(-1, kwargs["position_ids"].shape[-1]):
            self.examples_per_row.append(int((row == 0).sum()))

    def remove(self):
        self.handle.remove()


def original_context(config) -> int:
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    return rope.get("original_max_position_embeddings") or getattr(text, "original_max_position_embeddings", None) or 0


# -- the pipeline ------------------------------------------------------------------------------


def training_rows(chat: bool) -> list[dict]:
    """The shortest seed tasks: Alpaca rows, or the same as user/assistant conversations."""
    rows = sorted(seed_rows(), key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:12]
    if not chat:
        return rows
    return [
        {"messages": [
            {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}".strip()},
            {"role": "assistant", "content": r["output"]},
        ]}
        for r in rows
    ]


def trains_on_chat_rows(checkpoint, max_length: int) -> bool:
    """Whether the family's own template can train on chat rows here: it must exist, render a
    conversation prefix by prefix (so that replies are told apart from prompts), and leave
    room for a reply within the tiny model's `max_length` (SmolLM3's default system prompt
    alone is longer than that)."""
    tokenizer = model_loading.load_tokenizer(checkpoint)
    if not getattr(tokenizer, "chat_template", None):
        return False
    records = [data.parse_row(row, f"row {i}") for i, row in enumerate(training_rows(chat=True), 1)]
    try:
        data.tokenize(records, tokenizer, max_length=max_length)
    except data.DataError:
        return False
    return True


@pytest.mark.parametrize("name", CASE_NAMES)
def test_pipeline_finetunes_merges_exports_quantizes_and_chats(name, checkpoints, tmp_path, capsys):
    """Chat rows with the family's own template where it can train on them, Alpaca rows otherwise:
    the merged model, its GGUF and alpaca-chat all use the template the adapter was trained with."""
    checkpoint = checkpoints.get(name)
    max_length = 256  # the tiny models' context
    chat = trains_on_chat_rows(checkpoint, max_length)
    rows = write_json(tmp_path / "rows.json", training_rows(chat))
    config = FinetuneConfig(
        base=str(checkpoint), data=str(rows), out=tmp_path / "run", max_steps=2, batch_size=4, grad_accum=1,
        max_length=max_length, val_size=2, learning_rate=1e-3, save_steps=2, eval_steps=2,
    )
    summary = run_pipeline(PipelineOptions(config, quants=("Q4_K_M",), evaluate=False))
    options = summary.options
    packing_off = [line for line in capsys.readouterr().err.splitlines() if line.startswith("packing: off")]
    stateful = carried_state(model_loading.load_model_config(checkpoint))
    assert len(packing_off) == (1 if stateful else 0), packing_off  # the log says why, once
    assert not stateful or stateful in packing_off[0]
    assert [s.name for s in summary.steps] == ["finetune", "merge", "export", "quantize Q4_K_M"]

    meta = json.loads((options.adapter_dir / "training.json").read_text(encoding="utf-8"))
    assert None not in meta["base_model"].values(), meta["base_model"]  # what merge checks the base against
    trained = meta["template"]
    template = ALPACA_JINJA if trained == data.ALPACA else trained
    assert (trained == data.ALPACA) != chat
    merged = summary.step("merge").info  # merge itself refuses logits that differ from base + adapter
    assert merged["max_logit_difference"] < 1e-3 and merged["template"] == ("base" if chat else "alpaca")
    assert (options.merged_dir / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert gguf_fields(options.exported)["tokenizer.chat_template"] == template

    result = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--model", str(options.quantized("Q4_K_M")), "--prompt",
         "Give three tips for staying healthy.", "--json", "--temp", "0", "--max-tokens", "8", "--no-history"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["template"] == ("gguf" if chat else "alpaca")
    assert answer["stats"]["prompt_tokens"] > 0 and answer["stats"]["generated_tokens"] >= 1


def test_long_examples_go_through_the_model_alone():
    from convert.packing import chunk_bounds

    positions = torch.tensor([[p for n in (3, 10, 4, 12, 2) for p in range(n)]])
    assert chunk_bounds(positions, None, 8) == [(0, 3), (3, 13), (13, 17), (17, 29), (29, 31)]
    assert chunk_bounds(positions, 6, 8) == [(0, 3), (3, 13), (13, 17), (17, 29), (29, 31)]
    assert chunk_bounds(positions, 40, 11) == [(0, 17), (17, 29), (29, 31)]
    assert chunk_bounds(positions, 40, None) == [(0, 31)]


def test_soft_capped_attention_trains_in_eager_attention():
    """sdpa has no soft-cap (transformers' sdpa path drops it): a config that sets one gets eager."""
    import transformers

    from convert.packing import attention_implementation

    assert attention_implementation(transformers.Gemma2Config(attn_logit_softcapping=50.0)) == "eager"
    assert attention_implementation(transformers.Gemma3TextConfig(attn_logit_softcapping=50.0)) == "eager"
    image_text = transformers.Gemma3Config(text_config={"attn_logit_softcapping": 50.0})
    assert attention_implementation(image_text) == "eager"
    assert attention_implementation(transformers.Gemma3TextConfig(attn_logit_softcapping=None)) is None
    assert attention_implementation(transformers.LlamaConfig()) is None
