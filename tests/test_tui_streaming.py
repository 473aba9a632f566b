"""The streaming scheduler's pacing rules (alpaca_chat/tui/streaming.py), without an app."""

from alpaca_chat.tui import streaming
from alpaca_chat.tui.streaming import FLUSH_MAX_S, FLUSH_MIN_S, TYPING_PAUSE_S, UI_CPU_BUDGET


def test_an_idle_ui_draws_at_the_fastest_pace():
    assert streaming.next_flush_delay(0.0) == FLUSH_MIN_S


def test_the_delay_keeps_the_ui_within_its_cpu_budget():
    spent = 0.02  # 20 ms of UI CPU since the last batch
    delay = streaming.next_flush_delay(spent)
    assert delay == spent / UI_CPU_BUDGET
    assert spent / delay <= UI_CPU_BUDGET + 1e-12


def test_a_busy_ui_still_draws_at_least_once_a_second():
    assert streaming.next_flush_delay(10.0) == FLUSH_MAX_S


def test_typing_holds_batches_until_a_pause():
    assert streaming.typing_recently(typed_at=100.0, now=100.0 + TYPING_PAUSE_S / 2)
    assert not streaming.typing_recently(typed_at=100.0, now=100.0 + TYPING_PAUSE_S * 1.01)
    assert not streaming.typing_recently(typed_at=0.0, now=1000.0)  # never typed
