"""Grammar-constrained sampling: JSON schema -> GBNF, and the grammar stage of a sampler chain.

llama-cpp-python's `llama_grammar` module carries llama.cpp's JSON-schema converter; it lives
in llama_cpp, so it is called from here (the only package that imports llama_cpp).
"""

import contextlib
import json
import os
import sys
import tempfile

import llama_cpp
from llama_cpp import llama_grammar

from alpaca_chat.errors import EngineError, UsageError

# Any JSON object (OpenAI's response_format json_object).
JSON_OBJECT_GRAMMAR = llama_grammar.JSON_GBNF


# llama-cpp-python 0.3.36's converter lets a string hold raw control characters (a newline), which
# JSON forbids; llama.cpp's own converter excludes them, as JSON_GBNF does.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def json_schema_grammar(schema: dict) -> str:
    """The GBNF grammar of the JSON texts `schema` accepts (UsageError if it cannot be converted)."""
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # noqa: BLE001 - the converter raises anything on a schema it cannot handle
        raise UsageError(f"cannot turn the JSON schema into a grammar: {type(exc).__name__}: {exc}") from exc
    return grammar.replace(_LOOSE_CHAR, _JSON_CHAR)


def numbered_records_grammar(labels: list[str], first: int, count: int, *, separator: str = "###",
                             started: bool = True) -> str:
    """GBNF for `count` records numbered `first`.. ("N. Label: text", a line per label; the last
    label's text may go on for a few lines that start with neither a digit nor "#"), each followed
    by `separator` on a line of its own. With `started` the prompt already holds the first record's
    first "N. Label:", so the reply begins with its text."""
    parts: list[str] = []
    for number in range(first, first + count):
        for j, label in enumerate(labels):
            if not (started and not parts):
                parts.append(json.dumps(("\n" if parts else "") + f"{number}. {label}:"))
            parts.append('" " ' + ("body" if j == len(labels) - 1 else "line"))
        parts.append(json.dumps("\n" + separator))
    return "root ::= " + " ".join(parts) + '\nline ::= [^\\n#]+\nbody ::= line ("\\n" [^\\n#0-9] [^\\n#]*){0,8}\n'


def add_grammar_stage(chain, vocab, grammar: str) -> None:
    """Put a grammar stage first in `chain` (so no later stage can pick a token it forbids).
    The stages already in the chain keep their state (the repeat penalty's history). If llama.cpp
    cannot parse the grammar, the chain is freed and EngineError raised."""
    with _stderr_captured() as captured:
        stage = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not stage:
        llama_cpp.llama_sampler_free(chain)
        why = captured["text"].strip().splitlines()
        raise EngineError(f"llama.cpp could not parse the grammar{': ' + why[0] if why else ''}")
    others = [llama_cpp.llama_sampler_chain_remove(chain, 0) for _ in range(llama_cpp.llama_sampler_chain_n(chain))]
    llama_cpp.llama_sampler_chain_add(chain, stage)
    for other in others:
        llama_cpp.llama_sampler_chain_add(chain, other)


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 into a temporary file while llama.cpp parses a grammar: its parser
    prints errors there (not through the log callback); they become the error's message."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured = {"text": ""}
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured["text"] = tmp.read().decode("utf-8", errors="replace")
