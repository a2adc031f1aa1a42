"""``arvision compare``: registered generators of one data set side by side, by one yardstick.

Quality (FD, precision, recall, copies, class accuracy, bits per dim) against sampling speed and
training cost (parameters, train seconds), for every version of ``arvision-generator`` trained on
the current data (``data/prepared/manifest.json``'s content hash), with the floor (train images
scored against val) as a reference row; each value with its 95 % bootstrap interval where the
version's evaluation made one. Writes ``reports/compare.md`` and ``reports/compare.png``.

Only scores made with the current feature network (``models/features``) are compared; versions
scored with another one are listed as such, or re-scored with ``--rescore`` (which samples
again, on this machine, with ``params.yaml``'s evaluate settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from arvision.errors import UserError

COLUMNS = [  # (key, header, format)
    ("fd", "FD ↓", ".3g"), ("kid", "KID ↓", ".3g"), ("precision", "precision ↑", ".3f"), ("recall", "recall ↑", ".3f"),
    ("coverage", "coverage ↑", ".3f"), ("copy_rate", "copies ↓", ".1%"), ("class_accuracy", "class acc ↑", ".1%"),
    ("val_bpd", "bits/dim", ".4f"), ("sample_images_per_s", "img/s", ".3g"),
]


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _keys_with_ci() -> list[str]:
    """The columns' keys and their bootstrap interval keys (versions evaluated before the
    intervals have none: their cells show the value alone)."""
    return [x for k, _, _ in COLUMNS for x in (k, f"{k}_ci_low", f"{k}_ci_high")]


def collect(root: Path, data_hash: str, features_hash: str, versions: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per registered version on ``data_hash``: its tags as numbers where they are."""
    import mlflow

    from arvision.champion import DATA_TAG, data_alias
    from arvision.tracking import GENERATOR_MODEL, tracking_uri

    client = mlflow.MlflowClient(tracking_uri(root))
    try:
        found = client.search_model_versions(f"name='{GENERATOR_MODEL}'")
    except mlflow.exceptions.MlflowException:
        found = []
    champion = {}
    for alias in ("champion", data_alias(data_hash)):
        try:
            champion[alias] = str(client.get_model_version_by_alias(GENERATOR_MODEL, alias).version)
        except mlflow.exceptions.MlflowException:
            pass
    rows = []
    for mv in sorted(found, key=lambda m: int(m.version)):
        if mv.tags.get(DATA_TAG) != data_hash or (versions and str(mv.version) not in versions):
            continue
        t = mv.tags
        row: dict[str, Any] = {
            "version": str(mv.version),
            "family": f"{t.get('tokenizer.kind', '?')}+{t.get('prior.kind', '?')}",
            "size": t.get("prior.size", ""),
            "params": (_num(t.get("prior.params")) or 0) + (_num(t.get("tokenizer.params")) or 0),
            "train_seconds": _num(t.get("train_seconds")),
            "same_yardstick": t.get("features.hash") == features_hash,
            "aliases": [a for a, v in champion.items() if v == str(mv.version)],
        }
        stored = _model_metrics(client, mv)
        row.update({k: _num(stored[k]) for k in _keys_with_ci() if k in stored})
        rows.append(row)
    return rows


def _model_metrics(client, mv) -> dict[str, Any]:
    """A version's evaluation metrics: those linked to its logged model (MLflow 3 ``model_id``),
    or, for a version registered before they were, its tags."""
    from arvision.registry import logged_model_id

    model_id = logged_model_id(mv)
    if model_id:
        import mlflow

        try:
            found = client.get_logged_model(model_id).metrics or []
        except mlflow.exceptions.MlflowException:  # the logged model was deleted: the tags
            found = []
        if found:
            return {m.key: m.value for m in sorted(found, key=lambda m: m.timestamp)}  # the latest of each
    return dict(mv.tags)


def rescore(root: Path, rows: list[dict[str, Any]]) -> None:
    """Re-score rows made with another feature network, with the current one (in place)."""
    from arvision.config import load_params
    from arvision.judge import Yardstick, judge
    from arvision.registry import load_generator
    from arvision.tracking import GENERATOR_MODEL

    cfg = load_params(root / "params.yaml").evaluate
    device = "cpu"
    yard = Yardstick.load(root / "data" / "prepared", root / "models" / "features", device=device,
                          nearest_k=cfg.nearest_k, batch_size=cfg.batch_size, max_val=cfg.max_val_images)
    for row in rows:
        if row["same_yardstick"]:
            continue
        gen = load_generator(f"models:/{GENERATOR_MODEL}/{row['version']}", device=device)
        metrics, *_ = judge(gen, yard, cfg)
        row.update(metrics)
        row["same_yardstick"] = True
        row["rescored"] = True


def table_md(rows: list[dict[str, Any]], floor: dict[str, float]) -> str:
    head = ["version", "family", "params", "train s"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v, fmt):
        return "—" if v is None else format(v, fmt)

    def cell_ci(r: dict[str, Any], k: str, fmt: str) -> str:  # "4.62 [4.31, 4.95]" where the run has the interval
        low, high = r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high")
        ci = f" [{format(low, fmt)}, {format(high, fmt)}]" if low is not None and high is not None and r.get(k) is not None else ""
        return cell(r.get(k), fmt) + ci

    for r in rows:
        name = f"v{r['version']}" + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "") + (" *" if r.get("rescored") else "")
        lines.append("| " + " | ".join([name, r["family"] + (f" {r['size']}" if r["size"] else ""),
                                        f"{r['params'] / 1e6:.2f}M", cell(r.get("train_seconds"), ".0f")]
                                       + [cell_ci(r, k, f) for k, _, f in COLUMNS]) + " |")
    if floor:
        lines.append("| **floor** (train vs val) | real images | — | — | "
                     + " | ".join("—" if k in ("copy_rate", "val_bpd", "sample_images_per_s") else cell_ci(floor, k, f)
                                  for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], floor: dict[str, float], path: Path) -> None:
    """FD against sampling speed and against training cost; the floor as a line."""
    from arvision.viz import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label) in zip(axes, [("sample_images_per_s", "sampling speed (images/s, this machine)"),
                                       ("train_seconds", "training cost (tokenizer + prior, s)")]):
        for r in rows:
            x, y = r.get(key), r.get("fd")
            if x and y is not None:
                ax.scatter([x], [y], s=30)
                ax.annotate(f"v{r['version']} {r['family']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if floor.get("fd") is not None:
            ax.axhline(floor["fd"], color="grey", linestyle="--", linewidth=1, label="floor (train vs val)")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("Fréchet distance, own features (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(root: Path, *, versions: list[str] | None = None, do_rescore: bool = False) -> tuple[str, Path, Path]:
    """Build the comparison for the data in ``root``; returns (markdown, md path, png path)."""
    manifest = root / "data" / "prepared" / "manifest.json"
    weights = root / "models" / "features" / "weights.pt"
    if not manifest.exists() or not weights.exists():
        raise UserError("nothing to compare yet: run `arvision run` first (needs data/prepared and models/features)")
    data_hash = json.loads(manifest.read_text())["content_hash"]
    from arvision.features import features_hash

    yardstick = features_hash(weights.parent)
    rows = collect(root, data_hash, yardstick, versions)
    if not rows:
        raise UserError(f"no registered arvision-generator was trained on this data (content hash {data_hash[:12]})")
    if do_rescore:
        rescore(root, rows)
    ev = root / "metrics" / "eval.json"
    floor = {k.removeprefix("floor_"): v for k, v in json.loads(ev.read_text()).items() if k.startswith("floor_")} if ev.exists() else {}
    same = [r for r in rows if r["same_yardstick"]]
    other = [r for r in rows if not r["same_yardstick"]]
    out_dir = root / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# arvision compare: data {data_hash[:12]}", "",
          "Every row scored against the same val split in the same feature space (models/features); "
          "the floor is what real training images score. ↓ lower is better, ↑ higher; img/s was measured "
          "on the machine that evaluated each model.", "", table_md(same, floor), ""]
    if other:
        md += ["Scored with another feature network (not comparable; `arvision compare --rescore` re-scores them): "
               + ", ".join(f"v{r['version']} {r['family']}" for r in other), ""]
    md += ["![compare](compare.png)", ""]
    text = "\n".join(md)
    (out_dir / "compare.md").write_text(text)
    plot(same, floor, out_dir / "compare.png")
    return text, out_dir / "compare.md", out_dir / "compare.png"


def cmd_compare(args) -> int:
    versions = [v.strip().lstrip("v") for v in args.versions.split(",") if v.strip()] if args.versions else None
    text, md, png = compare(Path.cwd(), versions=versions, do_rescore=args.rescore)
    print(text)
    print(f"wrote {md} and {png}")
    return 0


def add_parser(sub) -> None:
    """The ``compare`` subcommand (called by :func:`arvision.cli.build_parser`)."""
    c = sub.add_parser("compare", help="registered generators on this data, side by side (table + plot)")
    c.add_argument("--versions", default="", help="comma-separated versions (default: all on this data)")
    c.add_argument("--rescore", action="store_true", help="re-score versions made with another feature network")
    c.set_defaults(func=cmd_compare)
