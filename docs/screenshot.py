"""Make docs/screenshot.svg: the app on the real default model, headless, after two questions.

    ALPACA_CHAT_HOME=$(mktemp -d) python docs/screenshot.py [--out docs/screenshot.svg]

Uses a throwaway history (set ALPACA_CHAT_HOME) so your own conversations stay out of it.
"""

import argparse
import asyncio
import os
import sys

from alpaca_chat.config import Settings
from alpaca_chat.conversation import SamplingParams
from alpaca_chat.loading import open_store
from alpaca_chat.tui.app import ChatApp

QUESTIONS = ("What is the capital of France?", "Show me a Python one-liner that reverses a string.")


async def shoot(out: str) -> None:
    store = open_store(True)
    app = ChatApp(Settings(sampling=SamplingParams(temperature=0, max_tokens=120)), store)
    async with app.run_test(size=(110, 36)) as pilot:
        while app.state != "ready":
            await pilot.pause(0.05)
        for question in QUESTIONS:
            app.prompt.load_text(question)
            await pilot.press("enter")
            await pilot.pause(0.2)
            while app.state != "ready":
                await pilot.pause(0.05)
        await pilot.press("ctrl+b")
        await pilot.pause(0.3)
        app.prompt.focus()
        await pilot.pause(0.2)
        app.save_screenshot(filename=os.path.basename(out), path=os.path.dirname(out) or ".")
        await app.action_quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "screenshot.svg"))
    args = ap.parse_args()
    if not os.environ.get("ALPACA_CHAT_HOME"):
        sys.exit("set ALPACA_CHAT_HOME to a scratch directory first (see the docstring)")
    asyncio.run(shoot(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
