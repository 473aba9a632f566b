"""What a fine-tune leaves in its output directory, by name, and its training.json read back.

    adapter_model.safetensors, adapter_config.json   the LoRA adapter (peft)
    training.json     settings, the chat template trained with, the base's shape
    metrics.json      train/eval loss per step, tokens/s, wall time
    loss.png          the loss curves
    heldout.jsonl     the validation rows (for `compare` and the pipeline)
    checkpoints/      Trainer checkpoints, for --resume

Torch-free: merge, compare and the pipeline read a run without loading the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAINING_FILE = "training.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
HELDOUT_FILE = "heldout.jsonl"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
CHECKPOINTS_DIR = "checkpoints"


def read_training_meta(adapter_dir: Path) -> dict | None:
    """training.json of an adapter made here, or None for one made elsewhere."""
    try:
        return json.loads((Path(adapter_dir) / TRAINING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
