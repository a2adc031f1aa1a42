"""The pipeline's own stage code on a GPU machine, end to end, timed per stage.

Runs ``stages.{prepare,tokenizer,features,tokens,prior,evaluate}.run`` in order with a do-nothing
tracker (the GPU machine has no MLflow/Prefect/DVC), the demo ``params.yaml`` with
``device: cuda`` and ``ray.use_gpu: true``: the tokenizer trains in bf16 with channels_last,
the tokens are encoded in bf16, the prior trains under Ray Train's ``TorchTrainer`` on the GPU
worker (bf16 autocast, fused AdamW), and evaluate samples with the KV cache on the GPU.

    PYTHONPATH=. python3 bench/gpu_pipeline.py --root /tmp/gpu_run [--out $OUT]
    PYTHONPATH=. python3 bench/gpu_pipeline.py --config configs/gpu/token-64.yaml --tag token-64 --out $OUT

``--config`` applies a preset over ``params.yaml`` as ``arvision run --config`` does; ``--tag``
prefixes the files written under ``--out`` (several runs in one call).

Needs Ray and pydantic on the machine (``scripts/device_wheels.sh`` makes wheels to carry).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray's workers import arvision through PYTHONPATH: make every entry absolute
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


ARTIFACTS = ("reports/samples.png", "reports/memorisation.png", "reports/curves.png", "reports/report.md",
             "models/tokenizer/recon.png", "metrics/prior_val_curve.csv", "metrics/tokenizer.json", "metrics/eval.json")


STAGES = ("prepare", "tokenizer", "features", "tokens", "prior", "evaluate")


def copy_artifacts(root: Path, out: Path, tag: str) -> None:
    """The grids, curves and reports written so far, as ``<tag>_<folder>_<name>`` under ``out``."""
    for rel in ARTIFACTS:
        f = root / rel
        if f.exists():
            shutil.copy(f, out / f"{tag}_{f.parent.name}_{f.name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/arvision_gpu_run")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--set", nargs="*", default=[], help="overrides like prior.steps=2000")
    ap.add_argument("--config", action="append", default=[], help="a preset applied over params.yaml first (repeatable)")
    ap.add_argument("--tag", default="gpu", help="prefix of the files written under --out")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list: run only these (in the pipeline's order)")
    ap.add_argument("--seed", help="another run's --root: start from its outputs (e.g. its prepare and features) and "
                                   "report its figures for the stages it ran")
    args = ap.parse_args()

    import torch

    from arvision.config import parse_params
    from arvision.tracking import NullTracker
    from stages import evaluate, features, prepare, prior, tokenizer, tokens
    from stages.common import Paths

    from gpu_smoke import gpu_params, parse_sets  # bench/gpu_smoke.py: the one GPU setup of the benches

    raw = gpu_params(parse_sets(args.set), presets=args.config)
    params = parse_params(raw, "bench")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    results: dict[str, dict] = {}
    if args.seed:  # the seed's outputs and figures: its stages are not run again
        shutil.copytree(args.seed, root, symlinks=True)
        results = {k: {**v, "from": Path(args.seed).name} for k, v in json.loads((root / "stages.json").read_text()).items()}
    root.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.stages.split(",") if s]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        sys.exit(f"--stages: unknown {', '.join(sorted(unknown))}; allowed: {', '.join(STAGES)}")
    paths = Paths(root)
    cuda = torch.cuda.is_available()  # False: a dry run of the bench on CPU (with --set ...device=cpu)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} torch {torch.__version__}", flush=True)
    for name, mod in [("prepare", prepare), ("tokenizer", tokenizer), ("features", features), ("tokens", tokens),
                      ("prior", prior), ("evaluate", evaluate)]:
        if name not in wanted or name in results:
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        metrics = mod.run(params, paths, NullTracker())
        secs = time.perf_counter() - t0
        results[name] = {"seconds": round(secs, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                         **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        print(f"{name}: {secs:.1f} s {json.dumps(results[name])}", flush=True)
        (root / "stages.json").write_text(json.dumps(results))
        if args.out:  # after every stage: a run stopped at its time limit still leaves what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            copy_artifacts(root, Path(args.out), args.tag)
            (Path(args.out) / f"{args.tag}_pipeline.json").write_text(json.dumps(
                {"argv": sys.argv[1:], "total_s": sum(v["seconds"] for v in results.values()),
                 "params": params.model_dump(mode="json"), "stages": results}, indent=2))
    report = "\n".join(
        ["| stage | seconds | key figures |", "| --- | --- | --- |"]
        + [f"| {k} | {v['seconds']} | " + ", ".join(f"{m}={v[m]:.4g}" if isinstance(v[m], float) else f"{m}={v[m]}"
                                                     for m in v if m not in ("seconds",)) + " |" for k, v in results.items()]
    )
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        total = sum(v["seconds"] for v in results.values())
        (out / f"{args.tag}_pipeline.md").write_text(f"{' '.join(sys.argv[1:])}\n\ntotal {total:.0f} s\n\n{report}\n")
        (out / f"{args.tag}_pipeline.json").write_text(json.dumps({"argv": sys.argv[1:], "total_s": total, "params": params.model_dump(mode="json"), "stages": results}, indent=2))


if __name__ == "__main__":
    main()
