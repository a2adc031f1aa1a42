"""``arvision``: the command line.

    arvision run                 the whole pipeline (Prefect flow; DVC skips what is unchanged)
    arvision sample SOURCE ...   images from a registered model or the stage outputs
    arvision check               validate params.yaml and the data it names (no stage runs)
    arvision score PATH          any images (a folder, an .npz) scored against val, beside the floor
    arvision serve-flow --cron C the pipeline on a schedule (a served Prefect deployment)

Exit statuses (README, "Exit statuses"): 0 done; 1 a run failed (a bug, a failing machine or
service, DVC refusing); 2 the user's mistake (bad params, arguments or data, a missing model, a
repo held by another run), printed as one clear message without a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from arvision.config import SamplingConfig
from arvision.errors import UserError


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _share(v) -> str | None:
    """A share (0..1) as a percent: every share in the summary in one unit."""
    return None if v is None else f"{100 * v:.1f}%"


def _headline_lines(ev: dict, tk: dict) -> list[str]:
    """The summary's numbers: FD against its floor first (the champion metric), then the other
    sample metrics and bits/dim, then the tokenizer; shares as percents, units named."""
    out = []
    if "fd" in ev:
        line = f"FD {_fmt(ev['fd'])}"
        if "fd_ci_low" in ev:
            line += f" [{_fmt(ev['fd_ci_low'])}, {_fmt(ev['fd_ci_high'])}]"
        if ev.get("floor_fd") is not None:
            line += f" against a floor of {_fmt(ev['floor_fd'])}"
            if ev["floor_fd"] > 0:
                line += f" ({ev['fd'] / ev['floor_fd']:.1f}× the floor; lower is better)"
        out.append(line)
    samples = [("precision", _share(ev.get("precision"))), ("recall", _share(ev.get("recall"))),
               ("copies", _share(ev.get("copy_rate"))), ("class acc", _share(ev.get("class_accuracy"))),
               ("val bits/dim", ev.get("val_bpd"))]
    tokenizer = [("PSNR", None if ev.get("tokenizer_psnr", tk.get("val_psnr")) is None
                  else f"{ev.get('tokenizer_psnr', tk.get('val_psnr')):.2f} dB"),
                 ("rFD", ev.get("tokenizer_rfd")), ("codebook usage", _share(ev.get("tokenizer_usage", tk.get("val_usage"))))]
    for head, items in (("", samples), ("tokenizer: ", tokenizer)):
        shown = [f"{k} {_fmt(v)}" for k, v in items if v is not None]
        if shown:
            out.append(head + " | ".join(shown))
    return out


def summary(root: Path, results: list[dict], parent_run_id: str | None, seconds: float) -> str:
    """The end-of-run report: what ran or was skipped, key numbers, where to look."""
    from arvision.tracking import tracking_uri

    lines = ["", f"arvision run: {'FAILED' if any(r.get('failed') for r in results) else 'done'} in {seconds:.1f} s", ""]
    lines.append(f"  {'stage':<10} {'status':<9} {'time':>8}")
    done = {r["stage"]: r for r in results}
    from arvision.dag import STAGES

    for st in STAGES:
        r = done.get(st)
        status = "not run" if r is None else "FAILED" if r.get("failed") else "ran" if r["ran"] else "skipped"
        t = f"{r['seconds']:.1f} s" if r and r["ran"] else ""
        lines.append(f"  {st:<10} {status:<9} {t:>8}")
    for r in results:
        if r.get("failed") and r.get("reason"):
            lines.append(f"\n  {r['stage']} failed: {r['reason']}")
    # numbers only from stages that ran in THIS run: a skipped or failed stage's metrics file
    # belongs to an earlier run (`dvc metrics show` has the current ones)
    ran = {r["stage"] for r in results if r.get("ran") and not r.get("failed")}
    m = {}
    for stage, name in (("tokenizer", "tokenizer"), ("prior", "prior"), ("evaluate", "eval")):
        p = root / "metrics" / f"{name}.json"
        if stage in ran and p.exists():
            m[name] = json.loads(p.read_text())
    ev, tk = m.get("eval", {}), m.get("tokenizer", {})
    shown = _headline_lines(ev, tk)
    if shown:
        lines += ["", *("  " + ln for ln in shown)]
    elif results and not ran and not any(r.get("failed") for r in results):
        lines += ["", "  nothing changed: the outputs are current (`dvc metrics show` for their numbers)"]
    decision = root / "reports" / "decision.txt"
    if "evaluate" in ran and decision.exists():
        lines.append("  " + decision.read_text().strip())
    uri = tracking_uri(root)
    lines += [""]
    if "evaluate" in ran:
        lines.append(f"  report      : {root / 'reports' / 'report.md'}  (samples.png, memorisation.png, curves.png)")
    lines += [
        f"  MLflow      : mlflow ui --backend-store-uri {uri}" + (f"   (parent run {parent_run_id})" if parent_run_id else ""),
        "  DVC         : dvc metrics show ; dvc plots show"
        + ("   (to share: git commit dvc.lock metrics/ ; dvc push)" if ran else ""),
        "  Prefect     : "
        + (f"flow runs at {os.environ['PREFECT_API_URL'].removesuffix('/api')}" if os.environ.get("PREFECT_API_URL")
           else "prefect server start  (then open the flow runs of 'arvision')"),
        "",
    ]
    return "\n".join(lines)


def cmd_run(args) -> int:
    from arvision.config import load_params
    from arvision.data.checks import check_batches

    root = Path.cwd()
    from pipelines.lock import RunLock

    lock = RunLock(root)
    if args.config:  # params.yaml is not rewritten under a run in progress
        lock.acquire()
        for preset in args.config:  # a bad preset ends the process, and with it the lock
            _apply_preset(root, Path(preset))
    params = load_params(root / "params.yaml")  # every parameter checked before any work
    check_batches(params, root)
    if not (root / "dvc.yaml").exists():
        raise UserError(f"{root} has no dvc.yaml: run arvision from the project root")
    if not args.config:
        lock.acquire()  # before the slow imports: a second run in this repo is told at once
    from pipelines.run import run_pipeline

    results, parent, seconds = run_pipeline(root, force=args.force, lock=lock)
    print(summary(root, results, parent, seconds))
    # machine-readable record of this run (what ran, what was skipped), for scripts and tests
    (root / ".arvision").mkdir(exist_ok=True)
    (root / ".arvision" / "last_run.json").write_text(
        json.dumps({"parent_run_id": parent, "seconds": seconds, "stages": results}, indent=2)
    )
    return run_status(results)


def run_status(results: list[dict]) -> int:
    """``arvision run``'s exit status (README, "Exit statuses"): 130 interrupted; 2 when every
    failed stage stopped on the user's mistake (its own status 2); 1 for any other failure (a
    bug, a machine or service failing, DVC refusing: DVC's own 255 never comes through); 0."""
    if any(r.get("interrupted") for r in results):
        raise KeyboardInterrupt
    failed = [r for r in results if r.get("failed")]
    if not failed:
        return 0
    return 2 if all(r.get("exit_code") == 2 for r in failed) else 1


def _labels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--labels must be comma-separated integers, got {text!r}") from None


#: the largest pixel enlargement ``arvision sample`` draws a grid with (32x: a 32² image is 1024²)
MAX_SCALE = 32


def _check_sampling_args(args) -> None:
    """``-n/--num`` from 1 to MAX_LABELS (the served model's cap on images per request), ``--scale``
    from 1 to MAX_SCALE; the sampling knobs in the ranges params.yaml's ``evaluate`` allows."""
    from pydantic import ValidationError

    from arvision.registry import MAX_LABELS

    if not 1 <= args.n <= MAX_LABELS:
        raise UserError(f"-n/--num must be at least 1 and at most {MAX_LABELS} images per label (the served model's cap "
                        f"on one request), got {args.n}")
    if not 1 <= args.scale <= MAX_SCALE:
        raise UserError(f"--scale must be at least 1 and at most {MAX_SCALE} (the grid's pixel enlargement), got {args.scale}")
    try:
        SamplingConfig(**{name: getattr(args, name) for name in SamplingConfig.model_fields})
    except ValidationError as err:
        e = err.errors()[0]
        raise UserError(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg'].lower()} (got {e['input']})") from None


def _load(source: str):
    """The generator at ``source``; a damaged model directory is one clear line naming the file."""
    import zipfile

    from arvision.registry import load_generator

    path = Path(source)
    if path.is_dir():
        for part in ("tokenizer", "prior"):
            for name in ("config.json", "weights.pt"):
                f = path / part / name
                if not f.is_file():
                    raise UserError(f"cannot load {source}: {f} is missing (re-run the {part} stage, or `dvc pull`)")
            try:
                json.loads((path / part / "config.json").read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise UserError(f"cannot load {source}: {path / part / 'config.json'} is not valid JSON ({err})") from None
            if not zipfile.is_zipfile(path / part / "weights.pt"):
                raise UserError(f"cannot load {source}: {path / part / 'weights.pt'} is not a complete torch checkpoint (truncated?)")
    try:
        return load_generator(source)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as err:  # damaged files the checks above let through
        raise UserError(f"cannot load {source}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def cmd_sample(args) -> int:
    from arvision.tracking import setup_mlflow
    from arvision.viz import save_grid

    _check_sampling_args(args)
    if args.source.startswith(("models:/", "runs:/")):
        setup_mlflow(Path.cwd(), create=False)  # outside a repo: an error, not a new empty mlflow.db
    gen = _load(args.source)
    if args.compile and not gen.compile_sampling():
        print("--compile: no GPU here, sampling eagerly on the CPU", file=sys.stderr)
    labels = _labels(args.labels) if args.labels else list(range(gen.num_classes))
    bad = [c for c in labels if not 0 <= c < gen.num_classes]
    if bad:
        raise UserError(f"--labels {','.join(map(str, bad))}: this generator knows classes 0..{gen.num_classes - 1}")
    if not args.out and not args.images_dir:
        raise UserError("nothing to write: give --out GRID.png and/or --images-dir DIR")
    if args.out:  # the grid's size is known before any image is drawn
        from arvision.viz import MAX_GRID_PIXELS, grid_size

        res = gen.tokenizer.resolution
        w, h = grid_size(len(labels), args.n, res, res, scale=args.scale, label_width=110)
        if w * h > MAX_GRID_PIXELS:
            raise UserError(
                f"-n/--num, --scale, --labels: a grid of {len(labels)} rows × {args.n} images at {args.scale}x is "
                f"{w}×{h} = {w * h / 1e6:.0f} Mpx, more than {MAX_GRID_PIXELS / 1e6:.0f} Mpx; lower --scale or -n/--num, "
                "give fewer --labels, or write --images-dir alone"
            )
    names = gen.class_names or [str(c) for c in range(gen.num_classes)]
    rows = []
    all_labels = [c for c in labels for _ in range(args.n)]
    images = gen.generate(
        all_labels, cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        progress=True,
    )
    for i, c in enumerate(labels):
        rows.append(images[i * args.n : (i + 1) * args.n])
    if args.out:
        save_grid(args.out, rows, row_names=[names[c] if c < len(names) else str(c) for c in labels], scale=args.scale)
        print(f"wrote {args.out}: {len(labels)} rows × {args.n} images")
    if args.images_dir:
        from PIL import Image

        d = Path(args.images_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i, (lab, img) in enumerate(zip(all_labels, images)):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(d / f"{i:04d}_class{lab}.png")
        print(f"wrote {len(images)} images to {d}")
    return 0


def cmd_score(args) -> int:
    from arvision.score import score_path, summary

    path = Path(args.path)
    metrics, got = score_path(Path(args.project), path)
    print(summary(path, metrics, got))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"\nwrote {args.out}")
    return 0


def _apply_preset(root: Path, preset: Path) -> None:
    """``--config FILE``: FILE's keys merged into params.yaml (which DVC reads), said key by key."""
    from arvision.presets import apply_preset

    if not (root / "params.yaml").exists():
        raise UserError(f"{root} has no params.yaml: run arvision from the project root")
    changed = apply_preset(root / "params.yaml", preset)
    print(f"params.yaml: applied {preset} ({len(changed)} key{'s' if len(changed) != 1 else ''} changed)")
    for key, old, new in changed:
        print(f"  {key}: {old!r} -> {new!r}")


def cmd_check(args) -> int:
    from arvision.config import load_params
    from arvision.data.checks import check_batches

    params = load_params(Path.cwd() / "params.yaml")
    check_batches(params, Path.cwd())
    print("params.yaml is valid:")
    for section, values in params.model_dump(mode="json").items():
        print(f"  {section}: {values}")
    return 0


def cmd_serve_flow(args) -> int:
    from arvision.config import load_params

    root = Path.cwd()
    load_params(root / "params.yaml")
    if not (root / "dvc.yaml").exists():
        raise UserError(f"{root} has no dvc.yaml: run arvision from the project root")
    from pipelines.serve import serve

    serve(root, args.cron, args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arvision", description="Train visual autoregressive image generators, reproducibly.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the pipeline (only changed stages run)")
    r.add_argument("--force", action="store_true", help="re-run every stage even if unchanged")
    r.add_argument("--config", action="append", metavar="FILE",
                   help="a preset (e.g. configs/gpu/token-64.yaml) merged into params.yaml first, comments kept; repeatable")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("sample", help="draw images from a trained generator")
    s.add_argument("source", help="models:/arvision-generator@champion (or another MLflow model URI), or a directory like models/")
    s.add_argument("--labels", default="", help="comma-separated class ids (default: every class)")
    # -n/--num as in head, seq and most samplers' CLIs; --n, the first spelling, stays an alias
    s.add_argument("-n", "--num", "--n", dest="n", type=int, default=8, metavar="N", help="images per label (default 8)")
    s.add_argument("--out", default="", help="write a grid PNG, one row per label")
    s.add_argument("--images-dir", default="", help="also write each image as a PNG here")
    for name, field in SamplingConfig.model_fields.items():  # evaluate's defaults; the same bounds
        s.add_argument(f"--{name.replace('_', '-')}", type=field.annotation, default=field.default)
    s.add_argument("--compile", action="store_true", help="GPU: compile the sampler into CUDA graphs (first batch ~20-30 s slower, then several times faster)")
    s.add_argument("--scale", type=int, default=2, help="pixel enlargement of the grid")
    s.set_defaults(func=cmd_sample)
    c = sub.add_parser("check", help="validate params.yaml")
    c.set_defaults(func=cmd_check)
    sc = sub.add_parser("score", help="score any images (another generator's, a baseline) on evaluate's yardstick")
    sc.add_argument("path", help="a folder of images (sub-folders named like classes label them) or an .npz with `images`")
    sc.add_argument("--out", default="", help="write the metrics as JSON (metrics/eval.json's keys)")
    sc.add_argument("--project", default=".", help="the project whose val split and feature net judge (default: here)")
    sc.set_defaults(func=cmd_score)
    f = sub.add_parser("serve-flow", help="run the pipeline on a schedule (a served Prefect deployment)")
    f.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (03:00 every day)')
    f.add_argument("--name", default="arvision-scheduled", help="deployment name")
    f.set_defaults(func=cmd_serve_flow)
    from arvision.compare import add_parser as add_compare

    add_compare(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
