"""Stage ``evaluate``: judge the generator by its samples; register it; keep the best as champion.

Scores ``evaluate.num_samples`` generated images against the val split in the feature space of
the ``features`` stage (Fréchet distance, KID, precision/recall, density/coverage, class
accuracy), checks them for copies of training images, and puts beside them the *floor*: the
same metrics for an equal number of train images, what a perfect generator would score. Also
val likelihood (bits per dim) and tokenizer reconstruction.

Writes ``metrics/eval.json`` (every number), ``metrics/summary.json`` (the headline that ``dvc
metrics show`` prints: :data:`SUMMARY_KEYS`), ``reports/`` (``samples.png`` one row per class,
``memorisation.png`` the most copy-like samples beside their nearest training images,
``curves.png`` the training curves, ``report.md``, ``speed.json``: sampling speed, kept out of
``dvc metrics`` because it measures the machine's load as much as the model). Registers
``arvision-generator`` (alias ``candidate``) and moves the champion only when the candidate
beats the incumbent re-scored here, on the same data (:mod:`arvision.champion`).

Bounded memory: the yardstick holds no split's pixels (:class:`arvision.judge.Yardstick`): val
and train are lazily decoded (:class:`arvision.data.feed.ImageSplit`) and walked a batch
at a time by the embedding, the tokenizer metrics, bits per dim and the memorisation search;
the floor and the memorisation panel decode only the train rows they show.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from arvision.config import Params
from arvision.features import features_hash
from arvision.generator import Generator
from arvision.judge import PRIMARY_SIGN, SAMPLE_KEYS, Yardstick, judge, primary_resamples, primary_value
from arvision.ladder import EVALUATE_RUNGS, flat_metrics, ladder_section, score_ladder
from arvision.tracking import Tracker
from arvision.train.tokenizer import evaluate_tokenizer
from arvision.viz import save_grid
from stages.common import Paths, read_json, resolve_device, stage_main, write_json

log = logging.getLogger("arvision")


#: what the stage writes into reports/ (dvc.yaml lists each as an output: other tools, like
#: ``arvision compare``, write beside them)
REPORT_FILES = ["samples.png", "memorisation.png", "curves.png", "report.md", "speed.json", "decision.txt", "ladder.json"]


@contextmanager
def report_files(reports: Path) -> Iterator[Path]:
    """A scratch directory whose files replace their namesakes in ``reports/`` only if the block
    succeeds (each by an atomic rename); stale outputs of an earlier run are removed."""
    reports.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=reports))
    try:
        yield tmp
        for name in REPORT_FILES:
            if (tmp / name).exists():
                os.replace(tmp / name, reports / name)
            else:
                (reports / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: ``metrics/summary.json``, the one file ``dvc metrics show`` and ``dvc exp show`` print: FD
#: beside its floor, the k-NN realism and variety, copies, and the prior's bits per dim; six
#: columns fit a 100-column terminal (every number is in ``metrics/eval.json``)
SUMMARY_KEYS = ("fd", "floor_fd", "precision", "recall", "copy_rate", "val_bpd")

#: metric prefixes that are another model's numbers (the champion re-scored, the last weights,
#: the difference to the champion): not linked to the registered version's logged model
OTHER_MODELS = ("champion_", "last_", "vs_champion_")

#: images a calibration-ladder rung scores (each rung costs one scoring of this many images)
LADDER_IMAGES = 500

#: copy_rate above which the report warns of memorisation (a novel generator scores about 0.05)
MEMORISATION_WARN = 0.15


def class_rows(gen: Generator, cfg) -> list[np.ndarray]:
    """The sample grid: ``evaluate.samples_per_class`` samples of every class, one row a class
    (one row when unlabelled). Drawn for the grid alone, not taken from the scored samples (whose
    labels follow val's class proportions, so a class rare in val would leave holes): the same
    sampling settings and ``evaluate.seed``, in a random generator of their own
    (:func:`arvision.judge.generate`), so the scored samples and their metrics do not change.
    Cost: classes × samples_per_class samples in one batched call (the demo: 9 × 8 = 72, beside
    its 500 scored)."""
    from arvision.judge import generate

    per, rows = cfg.samples_per_class, max(1, gen.num_classes)
    labels_N = np.repeat(np.arange(rows), per)  # class c's samples at [c * per, (c + 1) * per)
    images, _ = generate(gen, labels_N, cfg)
    return [images[c * per : (c + 1) * per] for c in range(rows)]


def curves_png(paths: Paths, out: Path) -> bool:
    """One figure of the training curves the upstream stages wrote (prior train/val loss,
    tokenizer PSNR, feature net loss). Returns whether anything was drawn."""
    from arvision.viz import pyplot

    plt = pyplot()
    panels = [("prior_curve.csv", "loss", "prior train loss (nats/token)"),
              ("prior_val_curve.csv", "val_loss", "prior val loss (nats/token)"),
              ("tokenizer_curve.csv", "psnr", "tokenizer PSNR (dB)"),
              ("features_curve.csv", "loss", "feature net loss")]
    found = []
    for name, key, title in panels:
        p = paths.metrics / name
        if p.exists():
            rows = [r for r in csv.DictReader(p.open()) if r.get(key) not in (None, "")]
            if rows:
                found.append(([float(r["step"]) for r in rows], [float(r[key]) for r in rows], title))
    if not found:
        return False
    fig, axes = plt.subplots(1, len(found), figsize=(3.6 * len(found), 2.8), squeeze=False)
    for ax, (x, y, title) in zip(axes[0], found):
        ax.plot(x, y, marker="." if len(x) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if np.isnan(v) else f"{v:.4g}"
    return "—" if v is None else str(v)


def _cell(m: dict[str, Any] | None, k: str) -> str:
    """``m[k]`` with its bootstrap interval where it has one: ``4.62 [4.31, 4.95]``."""
    if m is None:
        return "—"
    if f"{k}_ci_low" in m:
        return f"{_fmt(m.get(k))} [{_fmt(m[f'{k}_ci_low'])}, {_fmt(m[f'{k}_ci_high'])}]"
    return _fmt(m.get(k))


def _with_ci(m: dict[str, Any], primary: str) -> str:
    """The primary value of ``m`` (lower-is-better, as :func:`primary_value`) with its interval."""
    key, sign = primary.removeprefix("neg_"), PRIMARY_SIGN[primary]
    text = f"{primary_value(m, primary):.4g}"
    if f"{key}_ci_low" in m:
        low, high = sorted((sign * m[f"{key}_ci_low"], sign * m[f"{key}_ci_high"]))
        text += f" [{low:.4g}, {high:.4g}]"
    return text


def report_md(metrics: dict[str, Any], floor: dict[str, float], champ: dict[str, float] | None,
              last: dict[str, float] | None, primary: str, decision: str, has_curves: bool,
              ladder: dict[str, Any] | None = None) -> str:
    """``reports/report.md``: sample metrics beside their floor, memorisation, curves, and the
    calibration ladder (:mod:`arvision.ladder`) when given."""
    cols = ["this model", "floor (train vs val)"] + (["champion, re-scored"] if champ else []) + (["last weights"] if last else [])
    lines = ["# arvision evaluation", "",
             f"Promotion metric `evaluate.primary`: **{primary}** (lower is better). {decision}", "",
             "## Samples against val, in the pipeline's own feature space", "",
             "| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    keys = list(SAMPLE_KEYS) + ["class_accuracy", "val_bpd", "val_bits_per_token"]
    for k in keys:
        if k not in metrics:
            continue
        row = [metrics, floor] + ([champ] if champ else []) + ([last] if last else [])
        lines.append(f"| {k} | " + " | ".join(_cell(m, k) for m in row) + " |")
    for name, m in [("This model", metrics)] + ([("The last weights", last)] if last else []):
        if m.get("copy_rate", 0.0) > MEMORISATION_WARN:
            lines += ["", f"**Memorisation ({name.lower()}): it copies training images.** "
                      f"{m['copy_rate']:.0%} of its samples are closer to a training image "
                      f"than 95% of val images are (a generator of new images: about 5%). See the panel below."]
    lines += ["", "The floor is an equal number of training images scored the same way: what a perfect",
              "generator would reach. `copy_rate`: share of samples closer to a training image than",
              "95% of val images are (features; `_pixels`: in pixel space). In brackets: the 95%",
              "bootstrap interval (samples and val resampled, `evaluate.bootstrap` times).", ""]
    if "tokenizer_rfd" in metrics:
        lines.append(f"Tokenizer on val: PSNR {_fmt(metrics.get('tokenizer_psnr'))} dB, rFD {_fmt(metrics['tokenizer_rfd'])} "
                     "(`tokenizer_rfd`: its reconstructions against val in the same features as `fd`; samples "
                     "decoded from perfect codes would score about this).\n")
    if "features_val_accuracy" in metrics:
        lines.append(f"Feature classifier's own val accuracy: {_fmt(metrics['features_val_accuracy'])} "
                     "(class accuracy of samples is read against it).\n")
    lines += ["## Samples (one row per class)", "", "![samples](samples.png)", "",
              "## Memorisation: the most copy-like samples beside their nearest training images", "",
              "![memorisation](memorisation.png)", ""]
    if has_curves:
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    if ladder is not None:
        lines += ladder_section(ladder, metrics)
    lines += ["## All metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def lineage(paths: Paths, gen: Generator) -> dict[str, str]:
    """What ``arvision compare`` shows of a model beside its quality: kinds, size, training cost."""
    def seconds(name: str) -> float:
        p = paths.metrics / f"{name}.json"
        return float(read_json(p).get("stage_seconds", 0.0)) if p.exists() else 0.0

    return {
        "tokenizer.kind": gen.tokenizer.kind, "prior.kind": gen.prior.kind,
        "prior.size": str(gen.prior.config.get("size", "")),
        "prior.params": str(sum(p.numel() for p in gen.prior.parameters())),
        "tokenizer.params": str(sum(p.numel() for p in gen.tokenizer.parameters())),
        "train_seconds": f"{seconds('tokenizer') + seconds('prior'):.1f}",
    }


def _score_champion(version: str, yard: Yardstick, cfg, device) -> tuple[dict[str, float] | None, dict[str, np.ndarray]]:
    """The incumbent, re-scored here on the same terms: ``(metrics, detail)`` as :func:`judge`'s
    (detail: its bootstrap values, paired with the candidate's); None (and a warning) if it
    can't load."""
    from arvision.registry import load_generator
    from arvision.tracking import GENERATOR_MODEL

    try:
        gen = load_generator(f"models:/{GENERATOR_MODEL}/{version}", device=str(device))
    except Exception as err:  # e.g. a version saved by older code that no longer loads
        log.warning("evaluate: champion v%s cannot be loaded to re-score it (%s); the candidate takes its place",
                    version, str(err).splitlines()[0][:200])
        return None, {}
    metrics, _, _, detail = judge(gen, yard, cfg)
    return metrics, detail


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    cfg = params.evaluate
    device = resolve_device(cfg.device)
    manifest = read_json(paths.prepared / "manifest.json")
    data_hash = manifest["content_hash"]
    yard = Yardstick.load(paths.prepared, paths.features, device=device, nearest_k=cfg.nearest_k,
                          batch_size=cfg.batch_size, max_val=cfg.max_val_images)
    gen = Generator.load(paths.tokenizer, paths.prior, device=str(device))
    if cfg.compile_sampling:
        gen.compile_sampling()

    recon_ref = yard.reconstruction_reference(gen.tokenizer)  # shared with the last weights' score
    metrics, images, labels, detail = judge(gen, yard, cfg, recon_ref)
    speed = {"sample_images_per_s": metrics.pop("sample_images_per_s")}
    tok = evaluate_tokenizer(gen.tokenizer, yard.val_u8, batch_size=cfg.batch_size, device=device)
    metrics.update({f"tokenizer_{k}": v for k, v in tok.items() if k in ("psnr", "ssim", "usage", "perplexity")})
    metrics["tokenizer_rfd"] = yard.reconstruction_fd(recon_ref)  # the val reconstructions' features, made above
    floor = yard.floor(cfg.num_samples, cfg.seed, cfg.bootstrap)
    metrics.update({f"floor_{k}": v for k, v in floor.items()})
    # the calibration ladder: the floor's images degraded (blur, blobs, noise ...), each scored as the samples are
    ladder = score_ladder(yard, min(cfg.num_samples, LADDER_IMAGES), cfg.seed, recon_ref, EVALUATE_RUNGS)
    metrics.update(flat_metrics(ladder, metrics))
    feats_metrics = read_json(paths.metrics / "features.json") if (paths.metrics / "features.json").exists() else {}
    if "val_accuracy" in feats_metrics:
        metrics["features_val_accuracy"] = float(feats_metrics["val_accuracy"])
    if cfg.inception_weights:
        from arvision.metrics.samples import inception_fd

        metrics["inception_fd"] = inception_fd(images, yard.val_u8, cfg.inception_weights)
        metrics["floor_inception_fd"] = inception_fd(yard.train_u8[: len(images)], yard.val_u8, cfg.inception_weights)

    last = None
    if cfg.score_last and (paths.prior / "last" / "weights.pt").exists():
        last_gen = Generator.load(paths.tokenizer, paths.prior / "last", device=str(device))
        last, *_ = judge(last_gen, yard, cfg, recon_ref)
        last.pop("sample_images_per_s", None)
        metrics.update({f"last_{k}": v for k, v in last.items()})

    value = primary_value(metrics, cfg.primary)
    champ, decision = None, "No registry (no MLflow run): nothing registered."
    yardstick = features_hash(paths.features)
    with report_files(paths.reports) as out:
        names = gen.class_names or [str(c) for c in range(gen.num_classes)]
        rows = class_rows(gen, cfg)
        save_grid(out / "samples.png", rows, row_names=names if gen.num_classes > 1 else ["samples"], scale=2)
        from arvision.viz import memorisation_panel

        memorisation_panel(images, yard.train_u8[detail["nearest_train"]], detail["copy_score"], out / "memorisation.png")
        has_curves = curves_png(paths, out / "curves.png")
        write_json(out / "speed.json", speed)
        write_json(out / "ladder.json", ladder)

        if tracker.run_id:
            from arvision import champion as ch
            from arvision.registry import describe_generator, register_generator, set_description
            from arvision.tracking import GENERATOR_MODEL, deferred_client

            client = deferred_client()  # alias moves wait out an interrupt (arvision.registry)
            inc = ch.incumbent(client, data_hash)
            champ_value, diff_ci = None, None
            if inc is not None:
                champ, champ_detail = _score_champion(inc.version, yard, cfg, device)
                if champ is not None:
                    champ_value = primary_value(champ, cfg.primary)
                    metrics.update({f"champion_{k}": v for k, v in champ.items() if k != "sample_images_per_s"})
            tags = {ch.DATA_TAG: data_hash, "features.hash": yardstick, "evaluate.primary": cfg.primary,
                    **lineage(paths, gen)}
            reg = register_generator(tracker.run_id, paths.tokenizer, paths.prior, tags)
            # this evaluation's numbers (logged at the stage's end, and the speed below) are the
            # model's: linked to its logged model; the champion's and the last weights' are not
            tracker.link_model(reg["model_id"], lambda key: not key.startswith(OTHER_MODELS))
            metrics["registered_version"] = int(reg["version"])
            if champ_value is not None:  # candidate − champion, paired: the same resample indices for both
                diff_ci = ch.difference_interval(primary_resamples(detail, cfg.primary),
                                                 primary_resamples(champ_detail, cfg.primary), value, champ_value)
                metrics[f"vs_champion_{cfg.primary}"] = value - champ_value
                if diff_ci is not None:
                    metrics[f"vs_champion_{cfg.primary}_ci_low"], metrics[f"vs_champion_{cfg.primary}_ci_high"] = diff_ci
            verdict = ch.decide(reg["version"], metrics, inc, champ, primary=cfg.primary, max_copy_rate=cfg.max_copy_rate,
                                diff_ci=diff_ci, shown=lambda m: _with_ci(m, cfg.primary))
            won = verdict.won
            decision = verdict.text(ch.promote(client, reg["version"], data_hash) if won else [])
            metrics["is_champion"] = int(won)
            set_description(GENERATOR_MODEL, reg["version"],
                            describe_generator(reg["version"], reg["tags"], metrics, manifest, decision, cfg.num_samples))
        (out / "report.md").write_text(report_md(metrics, floor, champ, last, cfg.primary, decision, has_curves, ladder))
        (out / "decision.txt").write_text(decision + "\n")
    write_json(paths.metrics / "summary.json", {k: metrics[k] for k in SUMMARY_KEYS if k in metrics})
    if tracker.run_id:
        tracker.log_metrics(speed)
        for name in ("samples.png", "memorisation.png", "curves.png", "report.md"):
            tracker.log_artifact(paths.reports / name)
    log.info("evaluate: %s", decision)
    return metrics


def main() -> None:
    stage_main("evaluate", run, reads=["data/prepared", "models/tokenizer", "models/features", "models/prior"])


if __name__ == "__main__":
    main()
