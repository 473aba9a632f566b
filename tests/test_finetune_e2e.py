"""The whole recipe on the real SmolLM2-135M-Instruct checkpoint, from the Alpaca seed tasks to a chat.

fine-tune a few steps -> eval loss below the base's -> merge (logits checked) ->
export -> Q4_K_M and Q8_0 -> `alpaca-chat --model RESULT --prompt ...` picks
the Alpaca template by itself and answers. The 64 shortest seed tasks keep it
to a minute or two on two shared cores.
"""

import json
import subprocess
import sys

import pytest

from finetune_helpers import seed_rows, write_json

pytest.importorskip("peft", reason="needs the convert extra")

from convert.finetune import FinetuneConfig  # noqa: E402
from convert.pipeline import PipelineOptions, run_pipeline  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe(smollm2_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    rows = sorted(seed_rows(), key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:64]
    config = FinetuneConfig(
        base=str(smollm2_checkpoint),
        data=str(write_json(root / "short_seed_tasks.json", rows)),
        out=root / "smollm2-alpaca",
        max_steps=4,
        batch_size=4,
        grad_accum=1,
        max_length=128,
        val_size=6,
        learning_rate=1e-3,
        lr_scheduler="constant",  # four steps: no warmup, no decay
        save_steps=4,
        eval_steps=4,
    )
    lines = []
    summary = run_pipeline(PipelineOptions(config, quants=("Q4_K_M", "Q8_0")), report=lines.append)
    return summary, lines


def test_fine_tuning_lowers_the_held_out_loss(recipe):
    summary, _ = recipe
    losses = summary.step("eval").info["eval_loss"]
    assert losses["rows"] == 6
    assert losses["finetuned"] < losses["base"] - 0.05, losses


def test_merge_reproduces_base_plus_adapter(recipe):
    summary, _ = recipe
    merged = summary.step("merge").info
    assert merged["max_logit_difference"] < 1e-2 and merged["template"] == "alpaca" and merged["dtype"] == "bfloat16"


def test_both_quantizations_exist_and_were_measured(recipe):
    summary, _ = recipe
    options = summary.options
    for qtype in ("Q4_K_M", "Q8_0"):
        path = options.quantized(qtype)
        assert path.is_file() and path.stat().st_size < options.exported.stat().st_size
    info = summary.step("eval").info
    quality = info["quality"]
    assert [line.split(" vs ")[0] for line in quality] == ["quality of Q4_K_M", "quality of Q8_0", "ROUGE-L F"]
    # The real recipe's answers, scored against the held-out references for every model.
    assert sorted(info["rouge_l"]) == ["Q4_K_M", "Q8_0", "base", "fine-tuned"]
    assert all(0.0 <= value <= 1.0 for value in info["rouge_l"].values())
    assert "alpaca-chat --model" in summary.format()


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_alpaca_chat_picks_the_alpaca_template_and_answers(recipe, qtype):
    summary, _ = recipe
    result = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--model", str(summary.options.quantized(qtype)),
         "--prompt", "Give three tips for staying healthy.", "--json", "--temp", "0", "--max-tokens", "48", "--no-history"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["template"] == "alpaca"
    assert len(answer["text"].split()) >= 3 and "### Instruction" not in answer["text"]
