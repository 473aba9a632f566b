"""Builders shared by the fine-tuning tests: a tiny random Llama with SmolLM2's
tokenizer, data files, and a fast FinetuneConfig.

Plain functions (not fixtures); each test module caches what it builds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

# The 150 Stanford seed tasks that ship in the package (`--data alpaca-seed`).
SEED_DATA = Path(__file__).resolve().parents[1] / "convert" / "builtin_data" / "alpaca_seed_tasks.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random LlamaForCausalLM small enough to train in seconds, with a real tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def seed_rows(n: int | None = None) -> list[dict]:
    rows = json.loads(SEED_DATA.read_text(encoding="utf-8"))
    return rows[:n] if n else rows


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fast_config(base: Path, data: Path, out: Path, **overrides):
    """A run of a few steps on short examples: seconds on a tiny model."""
    from convert.finetune import FinetuneConfig

    config = FinetuneConfig(
        base=str(base),
        data=str(data),
        out=out,
        max_steps=4,
        batch_size=4,
        grad_accum=1,
        max_length=96,
        val_size=4,
        learning_rate=1e-3,
        save_steps=2,
        eval_steps=4,
    )
    return replace(config, **overrides)
