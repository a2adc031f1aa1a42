"""Run every tokenizer kind through the pipeline (``dvc exp run tokenizer -S ...``) and print a table.

Each row is one DVC experiment: the ``prepare`` and ``tokenizer`` stages with the repo's
``params.yaml`` plus the overrides below, so the figures come from the same stage code a user
runs. ``params.yaml`` is restored at the end; the experiments stay listed in ``dvc exp show``.

    python scripts/tokenizer_table.py --datasets emoji,mnist --mnist-path ../shared/datasets/mnist

Run it in a scratch clone if you do not want the experiments in your own repo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KINDS = ["palette", "vq", "rq", "fsq", "msvq"]
# what each kind needs beyond its own defaults (msvq pairs with the var prior: params cross-check)
KIND_OVERRIDES = {"msvq": ["prior.kind=var"], **{k: ["prior.kind=gpt"] for k in KINDS if k != "msvq"}}


def dataset_overrides(name: str, mnist_path: str) -> list[str]:
    if name == "emoji":
        return ["data.source=emoji", "data.path=arvision/data/emoji", "data.channels=3"]
    if name == "mnist":
        return ["data.source=mnist", f"data.path={mnist_path}", "data.channels=1"]
    raise SystemExit(f"unknown dataset '{name}'; allowed: emoji, mnist")


def run_one(dataset: str, kind: str, overrides: list[str]) -> dict:
    dvc = str(Path(sys.executable).parent / "dvc") if (Path(sys.executable).parent / "dvc").exists() else "dvc"
    cmd = [dvc, "exp", "run", "tokenizer", "-n", f"tok-{dataset}-{kind}", "--force"]
    for o in [f"tokenizer.kind={kind}", *KIND_OVERRIDES.get(kind, []), *overrides]:
        cmd += ["-S", o]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, text=True, capture_output=True, env=env)  # the stages' `python` is this venv's
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"experiment {dataset}/{kind} failed (exit {proc.returncode})")
    m = json.loads(Path("metrics/tokenizer.json").read_text())
    return {"dataset": dataset, "kind": kind, "wall_s": round(wall, 1), **m}


def usage_note(r: dict) -> str:
    if "trainset_usage_min_scale" not in r:
        return ""
    return f"lowest per-scale usage on train {100 * r['trainset_usage_min_scale']:.1f}%"


def table(rows: list[dict]) -> str:
    head = (
        "| data | kind | seq len | vocab | params | val PSNR dB | val SSIM | val usage | train usage "
        "| perplexity | train s (CPU) | notes |\n" + "|---" * 12 + "|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['kind']} | {r['seq_len']} | {r['vocab_size']} | {r['params']:,} "
            f"| {r['val_psnr']:.2f} | {r['val_ssim']:.3f} | {100 * r['val_usage']:.1f}% "
            f"| {100 * r.get('trainset_usage', float('nan')):.1f}% | {r['val_perplexity']:.1f} "
            f"| {r['train_seconds']:.0f} | {usage_note(r)} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="emoji,mnist")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--mnist-path", default="../shared/datasets/mnist")
    ap.add_argument("--set", action="append", default=[], help="extra -S override for every run")
    ap.add_argument("--out", default="reports/tokenizer_table.md")
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run (reports/…json) for other data/kinds")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"--kinds: unknown {bad}; allowed: {', '.join(KINDS)}")
    params = Path("params.yaml")
    saved = params.read_text()
    store = Path(args.out).with_suffix(".json")
    rows = json.loads(store.read_text()) if args.append and store.exists() else []
    try:
        for ds in args.datasets.split(","):
            over = dataset_overrides(ds, str(Path(args.mnist_path).resolve())) + args.set
            for kind in kinds:
                params.write_text(saved)  # `dvc exp run -S` edits params.yaml in place: start clean
                row = run_one(ds, kind, over)
                rows = [r for r in rows if (r["dataset"], r["kind"]) != (ds, kind)] + [row]
                print(json.dumps(row), flush=True)
                store.parent.mkdir(parents=True, exist_ok=True)
                store.write_text(json.dumps(rows, indent=1))
                Path(args.out).write_text(table(rows))
    finally:
        params.write_text(saved)
    print(table(rows))
    print(f"table written to {args.out}; `dvc exp show` lists the experiments")
    if shutil.which("nproc"):
        print("CPU:", subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(), "cores")


if __name__ == "__main__":
    main()
