"""A long GGUF fuzz campaign: the test suite's campaign (tests/test_gguf_fuzz.py), scaled up.

    python benchmarks/fuzz_gguf.py [--model PATH_OR_NAME] [--cases 20000] [--seed 1] [--jobs 1] [--json OUT]

Every scalar hyperparameter of the model x extreme values, then random header mutations and
truncations up to --cases in all. Each mutant goes through gguf_check and, when accepted, through
llama.cpp (load, render a prompt, decode) in a worker process; a worker that dies or stalls has its
case re-run alone, so every crash and hang is pinned on one case. --jobs runs that many campaigns
side by side on disjoint random seeds. Prints the counts (cases, rejected, refused, ok, traceback,
crash, hang) and every failing case; exit code 1 if there was any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gguf_fuzzing import FAILURES, Report, campaign_cases, random_cases, read_layout, run_campaign  # noqa: E402

from alpaca_chat.models import resolve_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled model)")
    parser.add_argument("--cases", type=int, default=20000, help="total number of cases (default 20000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="campaigns run side by side")
    parser.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    args = parser.parse_args()

    base = resolve_model(args.model).path
    first = campaign_cases(base, 0, args.seed)  # the systematic part
    layout = read_layout(base)
    n_random = max(0, args.cases - len(first))
    per_job = -(-n_random // args.jobs)
    batches = [first + random_cases(layout, per_job, args.seed)]
    batches += [random_cases(layout, per_job, args.seed + 1000 * j) for j in range(1, args.jobs)]
    if args.jobs > 1:  # give job j its own labels' namespace
        for j, batch in enumerate(batches[1:], 1):
            for case in batch:
                case.label = f"job{j}/{case.label}"
    print(f"{base.name}: {sum(map(len, batches))} cases ({len(first)} systematic) in {args.jobs} job(s)", flush=True)

    started = time.monotonic()
    last = [0.0]

    def progress(report: Report) -> None:
        if time.monotonic() - last[0] > 60:
            last[0] = time.monotonic()
            print(f"  [{time.monotonic() - started:.0f} s] job progress: {report.summary()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        dirs = [Path(tmp) / f"job{j}" for j in range(args.jobs)]
        for d in dirs:
            d.mkdir()
        reports = list(pool.map(
            lambda jb: run_campaign(base, jb[1], workdir=jb[0], batch=500, timeout=120, progress=progress),
            zip(dirs, batches),
        ))
    total = Report(counts=sum((r.counts for r in reports), Counter()),
                   failures=[f for r in reports for f in r.failures],
                   seconds=time.monotonic() - started)
    print(total.summary())
    for failure in total.failures:
        print(f"  {failure['outcome']}: {failure['case']} {failure.get('detail', '')}")
    if args.json:
        args.json.write_text(json.dumps({"cases": total.cases, **{k: total.counts[k] for k in
                                          ("rejected", "refused", "ok", *FAILURES)},
                                          "seconds": round(total.seconds), "failures": total.failures}, indent=1))
    return 1 if any(total.counts[k] for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
