"""``docs/results.md`` from the GPU result folders: every ``bench/results/*/gpu_smoke.json``
(every kind on CUDA bf16) and every ``*_pipeline.json`` of a preset run
(``bench/gpu_pipeline.py --config``), newest first. Nothing in the page is typed by hand:

    python3 bench/gpu_report.py          # rewrite docs/results.md
    python3 bench/gpu_report.py --check  # exit 1 if docs/results.md is out of date (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PAGE = REPO / "docs" / "results.md"

#: the figures of a preset run, by stage: (stage, metric, label)
PRESET_FIGURES = [
    ("tokenizer", "val_psnr", "tokenizer PSNR dB"), ("tokenizer", "val_ssim", "SSIM"), ("tokenizer", "val_usage", "code usage"),
    ("features", "val_accuracy", "judge val acc."), ("evaluate", "tokenizer_rfd", "rFD"), ("evaluate", "fd", "FD"),
    ("evaluate", "floor_fd", "floor FD"), ("evaluate", "recall", "recall"), ("evaluate", "coverage", "coverage"),
    ("evaluate", "copy_rate", "copy rate"), ("prior", "best_step", "best val step"), ("prior", "steps", "steps"),
    ("prior", "tokens_per_s", "prior tokens/s"),
]


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if v == v else "NaN"
    return str(v)


def smoke_section() -> list[str]:
    out = ["## Every kind on CUDA in bf16 (`bench/gpu_smoke.py`)", ""]
    for f in sorted(RESULTS.glob("*/gpu_smoke.json"), reverse=True):
        d = json.loads(f.read_text())
        recipe = d.get("recipe")
        out += [f"### {f.parent.name}", "",
                f"{d.get('device', '?')}, torch {d.get('torch', '?')}, {d.get('steps', '?')} steps a kind"
                + (f"; options on: `{json.dumps(recipe)}`" if recipe else "; the demo's options") + ".", "",
                "| kind | tokenizer + prior | ran | seconds | prior s | FD (few samples) | val bpd | error |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in d["rows"]:
            out.append(f"| {r['kind']} | {r['tokenizer']} + {r['prior']} | {'yes' if r['ok'] else 'NO (' + r.get('failed_stage', '?') + ')'} | "
                       f"{_fmt(r.get('seconds'))} | {_fmt(r.get('prior_s'))} | {_fmt(r.get('evaluate.fd'))} | {_fmt(r.get('evaluate.val_bpd'))} | {r.get('error', '')} |")
        out.append("")
    return out


def _data_name(params: dict) -> str:
    data = params.get("data", {})
    src, path = data.get("source", "?"), str(data.get("path") or "")
    name = Path(path).name if path else src
    return f"{name} {data.get('resolution', '?')}²"


def _goals(stages: dict) -> str:
    """The issue's bar per run: FD within 2x the floor, copy rate under 5%, the best val step
    in the last third of the steps run."""
    ev, pr = stages.get("evaluate", {}), stages.get("prior", {})
    if "fd" not in ev:
        return "—"
    marks = []
    ratio = ev["fd"] / ev["floor_fd"] if ev.get("floor_fd") else None
    marks.append(f"FD {ratio:.1f}x floor " + ("✓" if ratio <= 2 else "✗") if ratio else "FD ?")
    if "copy_rate" in ev:
        marks.append(f"copies {100 * ev['copy_rate']:.1f}% " + ("✓" if ev["copy_rate"] < 0.05 else "✗"))
    steps_run = pr.get("steps_run", pr.get("steps"))
    if pr.get("best_step") is not None and steps_run:
        marks.append(f"best step {pr['best_step']}/{steps_run} " + ("✓" if pr["best_step"] >= 2 * steps_run / 3 else "✗"))
    return ", ".join(marks)


def _runs() -> list[Path]:
    files = sorted(RESULTS.glob("*/*_pipeline.json")) + sorted(RESULTS.glob("*/*/*_pipeline.json"))
    files = [f for f in files if "stages" in json.loads(f.read_text())]
    folder = lambda f: f.parent.name if f.parent.parent == RESULTS else f.parent.parent.name  # noqa: E731
    return sorted(files, key=lambda f: (folder(f), f.name), reverse=True)


def preset_section() -> list[str]:
    out = ["## One-GPU presets (`bench/gpu_pipeline.py --config configs/gpu/…`, `bench/gpu_matrix.py`)", "",
           "A stage missing from a row did not finish inside the run's time limit. Runs of one",
           "`bench/gpu_matrix.py` call shared the GPU (`parallel` in the folder's `matrix.json`): their",
           "seconds are longer than a run alone. Goals: FD within 2x the floor, copy rate under 5%,",
           "the best val step in the last third of the steps run.", ""]
    out += ["| result folder | run | data | preset | stages done | seconds | goals | "
            + " | ".join(lbl for _, _, lbl in PRESET_FIGURES) + " |",
            "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in PRESET_FIGURES) + " |"]
    for f in _runs():
        d = json.loads(f.read_text())
        stages = d.get("stages", {})
        argv = d.get("argv", [])
        presets = [Path(argv[i + 1]).name for i, a in enumerate(argv) if a == "--config"]
        tag = argv[argv.index("--tag") + 1] if "--tag" in argv else "—"
        folder = f.parent.name if f.parent.parent == RESULTS else f"{f.parent.parent.name}/{f.parent.name}"
        figs = [_fmt(stages.get(st, {}).get(m)) for st, m, _ in PRESET_FIGURES]
        out.append(f"| {folder} | {tag} | {_data_name(d.get('params', {}))} | `{', '.join(presets) or 'params.yaml'}` | "
                   f"{', '.join(stages)} | {_fmt(d.get('total_s'))} | {_goals(stages)} | " + " | ".join(figs) + " |")
    out.append("")
    return out


def page() -> str:
    head = ["# Results on a GPU", "",
            "Generated by `python3 bench/gpu_report.py` from `bench/results/`; do not edit by hand. CPU and",
            "speed benchmarks: [bench/RESULTS.md](../bench/RESULTS.md).", ""]
    return "\n".join(head + smoke_section() + preset_section())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = page()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python3 bench/gpu_report.py", file=sys.stderr)
            sys.exit(1)
        return
    PAGE.write_text(text)
    print(f"rewrote {PAGE}")


if __name__ == "__main__":
    main()
