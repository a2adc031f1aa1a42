"""Every tokenizer kind × prior kind through the stages' own code on CUDA in bf16, in minutes.

The CPU suite runs fp32 and cannot see what breaks under bf16 autocast (a dtype mismatch in
a quantiser's statistics, a kernel that refuses bf16). This runs, for each family kind,
``tokenizer → tokens → prior → evaluate`` for a few steps on the GPU with the demo data
(``prepare`` and ``features`` once, shared), and says per kind whether it ran, in how many
seconds, and the first line of its error if not. Run it before closing any change to model,
tokenizer or training code, and keep its output under ``bench/results/``:

    PYTHONPATH=. python3 bench/gpu_smoke.py --out $OUT [--kinds vq,msvq] [--steps 60]

Exit status 1 when any kind failed. Needs Ray and pydantic on the machine
(``scripts/device_wheels.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray's workers import arvision through PYTHONPATH: make every entry absolute
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

#: family kind -> (tokenizer section overrides, prior section overrides)
KINDS: dict[str, tuple[dict, dict]] = {
    "palette": (dict(kind="palette"), dict(kind="gpt", size="tiny")),
    "vq": (dict(kind="vq"), dict(kind="gpt", size="tiny")),
    "rq": (dict(kind="rq", rq_depth=2), dict(kind="gpt", size="tiny")),
    "fsq": (dict(kind="fsq"), dict(kind="gpt", size="tiny")),
    "msvq": (dict(kind="msvq", scales=[1, 2, 4, 8]), dict(kind="var", size="tiny")),
}


#: ``--recipe``: this round's training options on, where the kind has them: the tokenizer's
#: VQGAN recipe and mirrored batches, mirrored and cropped token views, dropout and drop-path
RECIPE_TOKENIZER = dict(hflip=True, adv_weight=0.5, perceptual="msssim", perceptual_weight=1.0)
RECIPE = dict(tokens=dict(hflip=True, crops=1), prior=dict(dropout=0.1, drop_path=0.1))


def gpu_params(overrides: dict[str, dict] | None = None, *, presets: list[str] = ()) -> dict:
    """``params.yaml`` with ``presets`` applied (as ``arvision run --config`` does), then on one
    GPU: every stage on CUDA, the prior on one GPU worker (4 CPUs), the shipped emoji set found
    from anywhere; then ``overrides`` (section -> {key: value}) merged in."""
    from arvision.presets import _merge, read_preset

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for preset in presets:
        raw = _merge(raw, read_preset(Path(preset)))
    for sec in ("tokenizer", "tokens", "evaluate", "features"):
        raw[sec]["device"] = "cuda"
    raw["ray"].update(use_gpu=True, cpus_per_worker=4)
    if raw["data"]["source"] == "emoji":
        raw["data"]["path"] = str(REPO / "arvision" / "data" / "emoji")
    return _merge(raw, overrides or {})


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``--set section.key=value ...`` (values as YAML) → {section: {key: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, value = item.split("=", 1)
        sec, name = key.split(".")
        out.setdefault(sec, {})[name] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/arvision_gpu_smoke")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--steps", type=int, default=60, help="tokenizer and prior steps per kind")
    ap.add_argument("--recipe", action="store_true", help="the VQGAN recipe, views, dropout and drop-path on (see RECIPE)")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every kind, like tokenizer.adv_weight=0.5")
    args = ap.parse_args()

    import torch

    from arvision.config import parse_params
    from arvision.presets import _merge
    from arvision.tracking import NullTracker
    from stages import evaluate, features, prepare, prior, tokenizer, tokens
    from stages.common import Paths

    assert torch.cuda.is_available(), "gpu_smoke needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__} (bf16 autocast)", flush=True)
    n = args.steps
    common = dict(
        tokenizer=dict(steps=n, warmup_steps=min(10, n // 2), log_every=max(1, n // 3)),
        prior=dict(steps=n, warmup_steps=min(10, n // 2), eval_every=max(1, n // 2), log_every=max(1, n // 3)),
        features=dict(steps=n),
        evaluate=dict(num_samples=64, samples_per_class=2),
    )
    common = _merge(common, parse_sets(args.set))

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    shared = Paths(root / "shared")
    base = parse_params(gpu_params(common), "gpu_smoke")
    t0 = time.perf_counter()
    prepare.run(base, shared, NullTracker())
    features.run(base, shared, NullTracker())
    print(f"prepare + features: {time.perf_counter() - t0:.1f} s", flush=True)

    rows: list[dict] = []
    for kind in [k for k in args.kinds.split(",") if k]:
        tok_over, prior_over = KINDS[kind]
        over = {sec: dict(v) for sec, v in common.items()}
        over["tokenizer"] = {**over["tokenizer"], **tok_over}
        over["prior"] = {**over["prior"], **prior_over}
        if args.recipe:
            for sec, values in RECIPE.items():
                over[sec] = {**over.get(sec, {}), **values}
            if kind != "palette":  # a palette is fitted: no discriminator, no batches to mirror
                over["tokenizer"].update(RECIPE_TOKENIZER, disc_start=n // 3)
        paths = Paths(root / kind)
        for sub in ("data/prepared", "models/features"):
            (paths.root / sub).parent.mkdir(parents=True, exist_ok=True)
            (paths.root / sub).symlink_to(shared.root / sub)
        row: dict = {"kind": kind, "tokenizer": tok_over["kind"], "prior": prior_over["kind"], "ok": True, "recipe": args.recipe}
        t_kind = time.perf_counter()
        for name, mod in [("tokenizer", tokenizer), ("tokens", tokens), ("prior", prior), ("evaluate", evaluate)]:
            t = time.perf_counter()
            try:
                metrics = mod.run(parse_params(gpu_params(over), "gpu_smoke"), paths, NullTracker())
            except Exception as e:  # noqa: BLE001 - the point is to report every kind's failure
                row.update(ok=False, failed_stage=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                traceback.print_exc()
                break
            row[f"{name}_s"] = round(time.perf_counter() - t, 1)
            for key in ("psnr", "fd", "val_bpd", "tokens_per_s", "best_val_step"):
                if isinstance(metrics.get(key), (int, float)):
                    row[f"{name}.{key}"] = round(float(metrics[key]), 4)
        row["seconds"] = round(time.perf_counter() - t_kind, 1)
        rows.append(row)
        print(f"{kind}: {'ok' if row['ok'] else 'FAILED in ' + row['failed_stage'] + ': ' + row['error']} {json.dumps(row)}", flush=True)

    lines = ["| kind | tokenizer | prior | ran on CUDA bf16 | seconds | tokenizer s | prior s | evaluate s | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        note = r.get("error", ", ".join(f"{k}={v}" for k, v in r.items() if "." in k))
        lines.append(f"| {r['kind']} | {r['tokenizer']} | {r['prior']} | {'yes' if r['ok'] else 'NO (' + r['failed_stage'] + ')'} | {r['seconds']} | "
                     f"{r.get('tokenizer_s', '')} | {r.get('prior_s', '')} | {r.get('evaluate_s', '')} | {note} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_smoke.md").write_text(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {n} steps per kind"
                                          f"{', --recipe: ' + json.dumps({'tokenizer': RECIPE_TOKENIZER, **RECIPE}) if args.recipe else ''}\n\n{table}\n")
        (out / "gpu_smoke.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": n, "rows": rows}, indent=2))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
