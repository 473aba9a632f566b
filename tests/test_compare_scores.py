"""alpaca-convert compare's ROUGE-L scores: the figure, the mean per model, the table and the chart."""

import pytest

from alpaca_chat.conversation import Message
from convert.compare import Prompt, Row, format_scores, plot_scores, rouge_l, scores


def test_rouge_l_on_a_known_pair():
    # LCS of "the cat sat on the mat" (6 tokens) and "the cat on the mat" (5): "the cat on the mat", 5.
    # P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11.
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("The Cat.", "the cat") == pytest.approx(1.0)  # rouge-score lowercases and drops punctuation
    assert rouge_l("completely different words", "nothing shared here") == 0.0


def _row(reference, *answers):
    return Row(Prompt((Message("user", "q"),), reference), answers)


def test_scores_are_the_mean_per_model_and_are_charted(tmp_path):
    rows = [_row("the cat sat on the mat", "the cat on the mat", "dogs"),
            _row("red green blue", "red green blue", "red")]
    base, tuned = scores(rows, ["base", "tuned"])
    assert base.label == "base" and base.n == 2
    assert base.rouge_l == pytest.approx((10 / 11 + 1.0) / 2)
    assert tuned.rouge_l == pytest.approx((0.0 + rouge_l("red green blue", "red")) / 2)
    table = format_scores([base, tuned])
    assert "ROUGE-L F" in table and f"{base.rouge_l:.4f}" in table
    png = plot_scores([base, tuned], tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*partial"))
