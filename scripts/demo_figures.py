"""The README's demo table, from a real run of the demo on a fresh clone, never typed by hand.

    python3 scripts/demo_figures.py measure [--clone /tmp/demo_clone]   # clone, `make run` twice, record
    python3 scripts/demo_figures.py render                             # README section from the record

``measure`` clones this repository's HEAD, runs ``make run`` (the first run: every stage) and
``make run`` again (nothing changed: every stage skipped), and records the wall times, each
stage's seconds and the headline metrics in ``docs/demo_figures.json`` (with the commit and
the machine), then renders. ``render`` rewrites the part of README.md between the
``demo-figures`` markers; ``tests/test_bench.py`` fails when that part is not what the record gives.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "demo_figures.json"
README = REPO / "README.md"
START, END = "<!-- demo-figures:start -->", "<!-- demo-figures:end -->"
STAGES = ("prepare", "tokenizer", "features", "tokens", "prior", "evaluate")


def _timed_make_run(clone: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["make", "run"], cwd=clone, check=True)
    return round(time.perf_counter() - t0, 1)


def measure(clone: Path) -> dict:
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["make", "install"], cwd=clone, check=True)  # not timed: the first install
    first = _timed_make_run(clone)
    again = _timed_make_run(clone)
    metrics = {name: json.loads((clone / "metrics" / f"{name}.json").read_text())
               for name in STAGES + ("eval",) if (clone / "metrics" / f"{name}.json").exists()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
            "first_run_s": first, "noop_run_s": again,
            "stage_seconds": {s: metrics.get(s, {}).get("stage_seconds") for s in STAGES},
            "eval": metrics.get("eval", {}), "tokenizer": metrics.get("tokenizer", {})}


def _ci(ev: dict, key: str) -> str:
    v = ev.get(key)
    if v is None:
        return "—"
    lo, hi = ev.get(f"{key}_ci_low"), ev.get(f"{key}_ci_high")
    return f"{v:.3g} [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else f"{v:.4g}"


def render(record: dict) -> str:
    ev, st = record["eval"], record["stage_seconds"]
    stages = ", ".join(f"{s} {st[s]:.0f} s" for s in STAGES if st.get(s) is not None)
    rows = [
        ("first `make run`, all six stages", f"{record['first_run_s']:.0f} s ({stages})"),
        ("second `make run`, nothing changed", f"{record['noop_run_s']:.1f} s, every stage skipped"),
        ("FD in the own feature space [95% interval] / its floor", f"{_ci(ev, 'fd')} / {_ci(ev, 'floor_fd')}"),
        ("precision / recall / coverage (floor)", " / ".join(f"{_ci(ev, k)} ({ev.get('floor_' + k, float('nan')):.3g})"
                                                            for k in ("precision", "recall", "coverage"))),
        ("copy rate / class accuracy (floor)", f"{_ci(ev, 'copy_rate')} / {ev.get('class_accuracy', float('nan')):.3g} "
                                               f"({ev.get('floor_class_accuracy', float('nan')):.3g})"),
        ("val bits per image dimension", f"{ev.get('val_bpd', float('nan')):.4f}"),
        ("tokenizer: val PSNR / SSIM / rFD", f"{ev.get('tokenizer_psnr', float('nan')):.2f} dB / {ev.get('tokenizer_ssim', float('nan')):.3f} / "
                                            f"{ev.get('tokenizer_rfd', float('nan')):.3g}"),
        ("the samples score like", f"val images blurred with σ≈{ev['ladder_blur_sigma_equiv_fd']:.2g} (FD)"
         if isinstance(ev.get("ladder_blur_sigma_equiv_fd"), (int, float)) else "—"),
    ]
    lines = [START,
             f"Measured by `python3 scripts/demo_figures.py measure` on a fresh clone of {record['commit']} "
             f"({record['date']}, {record['machine']}); regenerate with it, never by hand.", "",
             "| | |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows] + [END]
    return "\n".join(lines)


def readme_with(text: str, section: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + section + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--clone", default="/tmp/arvision_demo_clone")
    sub.add_parser("render")
    args = ap.parse_args()
    if args.cmd == "measure":
        RECORD.write_text(json.dumps(measure(Path(args.clone)), indent=2) + "\n")
        print(f"wrote {RECORD}")
    record = json.loads(RECORD.read_text())
    README.write_text(readme_with(README.read_text(), render(record)))
    print(f"rewrote the demo table in {README}")


if __name__ == "__main__":
    sys.exit(main())
