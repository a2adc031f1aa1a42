"""The champion rule, through the real MLflow registry and the real ``evaluate`` stage code.

- the first candidate on a data set becomes its champion;
- a clearly better candidate (lower Fréchet distance beyond the paired bootstrap interval, the
  incumbent re-scored in the same run) moves it;
- a worse candidate leaves it where it was; so does one of the same quality whose FD is lower
  by chance, inside the interval (the same tokenizer, the prior initialised with another seed);
- a candidate trained on other data does not touch this data's champion (it gets its own
  data's alias).

The generators are tiny: a briefly trained tokenizer with an untrained prior (random codes
decoded into emoji-coloured images) is the "good" one; the "bad" one has its decoder zeroed,
so every sample is the same flat grey image.
"""

import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from arvision.champion import CHAMPION, data_alias
from arvision.config import parse_params
from arvision.tracking import GENERATOR_MODEL, stage_run
from stages import evaluate, features, prepare, tokenizer
from stages.common import Paths, read_json

PARAMS = {
    "seed": 0,
    "data": {"source": "emoji", "path": "arvision/data/emoji", "resolution": 16, "val_fraction": 0.25,
             "max_images": 160, "shard_size": 256},
    "tokenizer": {"kind": "vq", "width": 8, "channel_mult": [1, 2], "codebook_size": 16, "code_dim": 4,
                  "steps": 60, "batch_size": 16, "warmup_steps": 5},
    "features": {"width": 8, "dim": 16, "steps": 30, "batch_size": 32},
    "prior": {"kind": "gpt", "size": "tiny"},
    "evaluate": {"num_samples": 40, "samples_per_class": 2, "batch_size": 64, "nearest_k": 3},
}
ROOT = Path(__file__).resolve().parents[1]


def _project(root: Path, max_images: int, data: dict | None = None) -> tuple:
    """Prepared data, a tokenizer and a feature net for ``root``; returns (params, paths)."""
    from arvision.tracking import NullTracker

    data = data or {"path": str(ROOT / "arvision/data/emoji")}
    raw = {**PARAMS, "data": {**PARAMS["data"], **data, "max_images": max_images}}
    params = parse_params(raw)
    paths = Paths(root)
    prepare.run(params, paths, NullTracker())
    features.run(params, paths, NullTracker())
    tokenizer.run(params, paths, NullTracker())
    shutil.copytree(paths.tokenizer, root / "tokenizer-trained")
    return params, paths


def _generator(params, paths: Paths, collapsed: bool, seed: int = 0) -> None:
    """The trained tokenizer + an untrained prior (initialised from ``seed``) in models/;
    ``collapsed``: the decoder's weights are zero, so every sample is the same flat image."""
    from arvision.priors import build_prior, save_prior
    from arvision.tokenizers import load_tokenizer, save_tokenizer

    m = read_json(paths.prepared / "manifest.json")
    torch.manual_seed(0)
    tok = load_tokenizer(paths.root / "tokenizer-trained")
    if collapsed:
        with torch.no_grad():
            for p in tok.decoder.parameters():
                p.zero_()
    torch.manual_seed(seed)
    shutil.rmtree(paths.tokenizer, ignore_errors=True)
    save_tokenizer(tok, paths.tokenizer)
    prior = build_prior(params.prior, vocab_size=tok.vocab_size, layout=[list(x) for x in tok.layout],
                        num_classes=max(1, m["num_classes"]))
    import json

    save_prior(prior, paths.prior, extra={"class_names": m.get("class_names", [])})
    (paths.prior / "meta.json").write_text(json.dumps({"class_names": m.get("class_names", [])}))


def _evaluate(params, paths: Paths) -> dict:
    with stage_run("evaluate", paths.root) as tracker:
        return evaluate.run(params, paths, tracker)


def _alias(client, alias: str) -> str:
    return str(client.get_model_version_by_alias(GENERATOR_MODEL, alias).version)


@pytest.mark.e2e
def test_champion_moves_only_when_beaten_on_the_same_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("ARVISION_PARENT_RUN_ID", raising=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    params, paths = _project(tmp_path / "a", 160)
    data_a = read_json(paths.prepared / "manifest.json")["content_hash"]

    _generator(params, paths, collapsed=True)
    first = _evaluate(params, paths)  # no champion yet: the first candidate takes it
    assert first["is_champion"] == 1 and _alias(client, CHAMPION) == "1" == _alias(client, data_alias(data_a))

    _generator(params, paths, collapsed=False)
    better = _evaluate(params, paths)  # v1 re-scored in this run; v2 has the lower FD
    assert better["champion_fd"] > better["fd"]
    assert better["vs_champion_fd_ci_high"] < 0  # beyond the interval
    assert better["fd_ci_low"] <= better["fd"] <= better["fd_ci_high"]
    assert better["is_champion"] == 1 and _alias(client, CHAMPION) == "2"
    assert "beyond the interval" in (paths.reports / "decision.txt").read_text()

    _generator(params, paths, collapsed=True, seed=7)  # not v1's files, which would give v1 back (no new version)
    worse = _evaluate(params, paths)
    assert worse["fd"] > worse["champion_fd"]
    assert worse["is_champion"] == 0 and _alias(client, CHAMPION) == "2"
    assert _alias(client, "candidate") == "3"
    assert "champion v2 kept" in (paths.reports / "decision.txt").read_text()

    # other data: competes only on its own data; this data's champion stays
    params_b, paths_b = _project(tmp_path / "b", 120)
    data_b = read_json(paths_b.prepared / "manifest.json")["content_hash"]
    assert data_b != data_a
    _generator(params_b, paths_b, collapsed=False)
    other = _evaluate(params_b, paths_b)
    assert other["is_champion"] == 1 and "champion_fd" not in other  # nothing on its data to beat
    assert _alias(client, data_alias(data_b)) == "4"
    assert _alias(client, CHAMPION) == "2" == _alias(client, data_alias(data_a))

    # the report shows the sample metrics beside their floor and the memorisation panel
    report = (paths.reports / "report.md").read_text()
    assert "floor" in report and "memorisation.png" in report
    assert (paths.reports / "memorisation.png").stat().st_size > 0

    # the same quality (v2's tokenizer, its prior initialised otherwise), FD lower by chance:
    # inside the interval, so v2 stays champion
    for seed in range(1, 6):
        _generator(params, paths, collapsed=False, seed=seed)
        same = _evaluate(params, paths)
        assert same["is_champion"] == 0 and _alias(client, CHAMPION) == "2"
        if same["fd"] < same["champion_fd"]:
            break
    assert same["fd"] < same["champion_fd"] and same["vs_champion_fd_ci_high"] > 0
    decision = (paths.reports / "decision.txt").read_text()
    assert "champion v2 kept" in decision and "beyond the interval" in decision
    assert same["fd_ci_low"] <= same["fd"] <= same["fd_ci_high"]  # what stage_main writes to metrics/eval.json
    assert {"floor_fd_ci_low", "champion_fd_ci_high", "copy_rate_ci_high"} <= set(same)
    assert "] |" in (paths.reports / "report.md").read_text()  # "4.62 [4.31, 4.95]" cells


def test_a_copier_never_wins():
    from arvision.champion import beats

    assert beats(1.0, 2.0) and not beats(2.0, 1.0) and not beats(1.0, 1.0) and beats(5.0, None)
    assert not beats(0.1, 2.0, candidate_qualifies=False)  # lower FD, but copies its training set
    assert beats(3.0, 1.0, incumbent_qualifies=False)  # any qualified model beats a copier


def test_unlabelled_data_is_judged_end_to_end(tmp_path):
    """A flat folder (no labels): the feature net is contrastive, the samples are scored
    without class accuracy, and no label -1 reaches the prior."""
    from PIL import Image

    from arvision.data.parquet_io import load_images
    from arvision.tracking import NullTracker

    images = _emoji(60)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(flat / f"{i:03d}.png")
    params, paths = _project(tmp_path / "u", 60, {"source": "folder", "path": str(flat)})
    assert read_json(paths.features / "config.json")["mode"] == "contrastive"
    assert (load_images(paths.prepared / "val")[2] == -1).all()
    _generator(params, paths, collapsed=False)
    m = evaluate.run(params, paths, NullTracker())
    assert m["fd"] > 0 and 0 <= m["copy_rate"] <= 1 and "class_accuracy" not in m and m["val_bpd"] > 0
    assert (paths.reports / "samples.png").exists() and (paths.reports / "report.md").exists()


def _emoji(n: int) -> list:
    """The first ``n`` shipped emoji as uint8 RGB arrays."""
    import pyarrow.parquet as pq

    from arvision.data.parquet_io import decode_png

    table = pq.read_table(next((ROOT / "arvision/data/emoji").glob("*.parquet"))).slice(0, n)
    return [decode_png(b)[..., :3] for b in table.column("image").to_pylist()]


def test_the_decision_in_words():
    """``champion.decide``: who wins and the sentence the report, the model page and the log show."""
    from arvision.champion import Incumbent, decide

    inc = Incumbent("3", "abc", True)
    good, worse = {"fd": 1.0, "copy_rate": 0.0}, {"fd": 2.0, "copy_rate": 0.0}
    d = decide("4", good, None, None, primary="fd", max_copy_rate=0.5)
    assert d.won and d.text(["champion-abc", "champion"]) == "v4 is the new champion (champion-abc, champion): no champion on this data yet."
    d = decide("4", good, inc, worse, primary="fd", max_copy_rate=0.5, diff_ci=(-1.5, -0.5))
    assert d.won and d.text(["champion"]) == ("v4 is the new champion (champion): fd 1 beats v3's 2, re-scored here, beyond the "
                                              "interval (difference -1 [-1.5, -0.5], paired bootstrap).")
    d = decide("4", good, inc, worse, primary="fd", max_copy_rate=0.5, diff_ci=(-1.5, 0.2))  # lower, within the noise
    assert not d.won and d.text() == ("v4 registered as candidate; champion v3 kept: fd 1 does not beat v3's 2 beyond the "
                                      "interval, re-scored here (difference -1 [-1.5, 0.2], paired bootstrap).")
    d = decide("4", {"fd": 0.1, "copy_rate": 0.9}, inc, worse, primary="fd", max_copy_rate=0.5)
    assert not d.won and d.text() == ("v4 registered as candidate but disqualified: it copies 90% of its samples "
                                      "(evaluate.max_copy_rate 50%); champion v3 kept.")
    d = decide("4", worse, inc, {"fd": 0.1, "copy_rate": 0.9}, primary="fd", max_copy_rate=0.5)
    assert d.won and d.text(["champion"]).endswith(": champion v3 copies 90% of its samples.")
    d = decide("4", worse, inc, None, primary="fd", max_copy_rate=0.5)  # the incumbent could not be loaded
    assert d.won and d.text(["champion"]).endswith(": champion v3 could not be re-scored here.")
