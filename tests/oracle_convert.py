"""Run llama.cpp's convert_hf_to_gguf.py (the test oracle) with one lookup answered for it.

llama.cpp's converter names a BPE pre-tokenizer by hashing the token ids of a
probe text and looking the hash up in a table of published models. A tiny
tokenizer trained in a test is in no table, so the converter refuses it. When
ORACLE_PRE_TOKENIZER is set, `get_vocab_base_pre` returns that name instead
(the name our exporter detected, which the tokenizer-parity tests check
against transformers); every other step of the converter runs unchanged, so
its tensors and all other metadata stay an independent reference.

Usage: ORACLE_SCRIPT=/path/to/convert_hf_to_gguf.py python oracle_convert.py ARGS...
"""

import os
import runpy
import sys
from pathlib import Path

script = Path(os.environ["ORACLE_SCRIPT"])
sys.path.insert(0, str(script.parent))
sys.path.insert(1, str(script.parent / "gguf-py"))

pre = os.environ.get("ORACLE_PRE_TOKENIZER")
if pre:
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre

sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
