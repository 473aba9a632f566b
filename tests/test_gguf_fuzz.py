"""Fuzz campaign: mutants of the bundled GGUF through gguf_check and, when accepted, llama.cpp.

Every scalar hyperparameter x extreme values (0, 2**31-1, 2**31, 2**32-1, negatives, NaN, +-Inf...)
plus random header mutations and truncations: over 1,000 cases. Whatever gguf_check accepts is
loaded, prompted and decoded by the chat's own loading path in a worker process
(tests/gguf_fuzzing.py), so a crash or a hang is observed, not assumed. The whole campaign takes
about two minutes here.
"""

import pytest

from gguf_fuzzing import FAILURES, campaign_cases, run_campaign

N_RANDOM = 800
SEED = 20261130


@pytest.fixture(scope="module")
def report(default_model_path, tmp_path_factory):
    cases = campaign_cases(default_model_path, N_RANDOM, SEED)
    return run_campaign(default_model_path, cases, workdir=tmp_path_factory.mktemp("fuzz"), batch=300, timeout=120)


def test_no_crash_no_hang_no_traceback(report):
    print(report.summary())
    assert report.cases >= 1000, report.summary()
    failures = {kind: report.counts[kind] for kind in FAILURES}
    assert failures == {"traceback": 0, "crash": 0, "hang": 0}, report.failures[:10]


def test_the_campaign_reaches_llama_cpp(report):
    """Mutants that pass the checks really run: the campaign is not only exercising gguf_check."""
    assert report.counts["ok"] + report.counts["refused"] >= 100, report.summary()
    assert report.counts["rejected"] >= 300, report.summary()


@pytest.mark.parametrize(
    "label",
    [
        # Measured on main before the hyperparameter checks: SIGABRT, the OOM killer, a hang.
        "llama.attention.layer_norm_rms_epsilon=nan",
        "llama.attention.layer_norm_rms_epsilon=inf",
        "llama.block_count=2147483648",
        "llama.block_count=0",
        "llama.embedding_length=4294967295",
        "llama.attention.head_count=0",
        "llama.rope.freq_base=nan",
    ],
)
def test_measured_failures_are_rejected_by_gguf_check(report, label):
    assert report.outcomes[label] == "rejected"


def test_quantize_survives_mutated_f16_files(tiny_builds, tmp_path):
    """`alpaca-convert quantize` on mutants of an F16 export: measured aborting on 3 of 200 before."""
    _, _, f16 = tiny_builds.get("llama-spm-gqa")
    cases = campaign_cases(f16, 300, SEED)
    report = run_campaign(f16, cases, workdir=tmp_path, batch=300, timeout=120, mode="quantize")
    print(report.summary())
    assert report.cases >= 300
    assert {kind: report.counts[kind] for kind in FAILURES} == {"traceback": 0, "crash": 0, "hang": 0}, report.failures[:10]
    assert report.counts["ok"] >= 20, report.summary()  # the quantizer really ran
