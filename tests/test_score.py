"""``arvision score`` on a tiny project built by the real stage code (prepare + features: emoji
at 16², a feature net of 30 CPU steps), and the evaluate stage's sample grid.

- the project's own val images score as val itself: FD about 0, below the floor (train vs
  val); the same images blurred (down to 2², back up) score far above it;
- a corrupt file is skipped and counted; images of another size and mode are normalised as
  ``prepare`` does; a flat folder is unlabelled (no class accuracy);
- ``--out`` writes metrics/eval.json's keys; the user's mistakes are one line, no traceback;
- the sample grid has a full row for a class that is rare in val.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from arvision import cli
from arvision.config import parse_params
from arvision.data.feed import ImageSplit
from arvision.score import score_path
from arvision.tracking import NullTracker
from stages import features, prepare
from stages.common import Paths

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "seed": 0,
    "data": {"source": "emoji", "path": str(ROOT / "arvision/data/emoji"), "resolution": 16, "val_fraction": 0.25,
             "max_images": 240, "shard_size": 256},
    "tokenizer": {"kind": "vq", "width": 8, "channel_mult": [1, 2], "codebook_size": 16, "code_dim": 4,
                  "steps": 4, "batch_size": 16, "warmup_steps": 1, "device": "cpu"},
    "features": {"width": 8, "dim": 16, "steps": 30, "batch_size": 32, "device": "cpu"},
    "prior": {"kind": "gpt", "size": "tiny"},
    "evaluate": {"num_samples": 40, "samples_per_class": 3, "batch_size": 64, "nearest_k": 3, "device": "cpu"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, list[str]]:
    """(root, val images, val labels, class names) of a project with data/prepared and models/features."""
    root = tmp_path_factory.mktemp("score") / "proj"
    root.mkdir()
    params = parse_params(PARAMS)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    prepare.run(params, Paths(root), NullTracker())
    features.run(params, Paths(root), NullTracker())
    val = ImageSplit(root / "data" / "prepared" / "val")
    names = json.loads((root / "data" / "prepared" / "manifest.json").read_text())["class_names"]
    return root, val[: len(val)], val.labels, names


def _save(img_HWC: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img_HWC[..., 0] if img_HWC.shape[-1] == 1 else img_HWC).save(path)


def _score_cli(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["score", *args, "--project", str(root)])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_val_scores_below_the_floor_and_blurred_images_far_above(project, tmp_path):
    root, val, labels, names = project
    for i, (img, lab) in enumerate(zip(val, labels)):  # one sub-folder per class, named as the project's
        _save(img, tmp_path / "val" / names[lab] / f"{i:04d}.png")
    m, got = score_path(root, tmp_path / "val")
    assert m["num_images"] == len(val) and m["labelled_images"] == len(val) and m["skipped_images"] == 0
    assert m["fd"] < 1e-6 < m["floor_fd"]  # the very val images: their statistics are val's
    assert m["precision"] == m["recall"] == 1.0 and 0 <= m["class_accuracy"] <= 1

    def blur(x: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(x).resize((2, 2), Image.BILINEAR).resize((16, 16), Image.BILINEAR))

    np.savez(tmp_path / "blurred.npz", images=np.stack([blur(x) for x in val]), labels=labels)
    b, _ = score_path(root, tmp_path / "blurred.npz")
    assert b["fd"] > 4 * b["floor_fd"] and b["num_images"] == len(val) and "class_accuracy" in b
    assert b["floor_fd"] == m["floor_fd"]  # the same number of images: the same floor


def test_a_folder_of_other_sizes_with_a_corrupt_file(project, tmp_path, capsys):
    root, val, labels, names = project
    d = tmp_path / "samples"
    for i, img in enumerate(val):  # 40² RGBA (alpha 255), flat: unlabelled
        big = np.asarray(Image.fromarray(img).resize((40, 40), Image.BICUBIC).convert("RGBA"))
        _save(big, d / f"{i:04d}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    (d / "notes.txt").write_text("not an image")  # not an image extension: not looked at

    code, out, err = _score_cli(root, str(d), "--out", str(tmp_path / "m.json"), capsys=capsys)
    assert code == 0, err
    assert "skipped 1 that could not be decoded" in out and "broken.png" in out and "unlabelled" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  fd ")] == ["fd"]
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("fd", "floor_fd", "precision", "floor_precision", "density", "floor_density", "copy_rate", "kid"):
        assert isinstance(m[key], float), key
    assert m["num_images"] == len(val) and m["skipped_images"] == 1 and m["labelled_images"] == 0
    assert "class_accuracy" not in m  # unlabelled
    assert m["fd"] < m["floor_fd"]  # resized up and back down, near the originals: still val-like


def test_npz_of_another_size_is_normalised_as_prepare_does(project, tmp_path):
    from arvision.data.prepare import normalise
    from arvision.score import read_images

    root, val, labels, _ = project
    grey_NHW = np.stack([np.asarray(Image.fromarray(x).convert("L").resize((24, 20))) for x in val[:6]])
    np.savez(tmp_path / "g.npz", images=grey_NHW)
    manifest = json.loads((root / "data" / "prepared" / "manifest.json").read_text())
    got = read_images(tmp_path / "g.npz", manifest)
    assert got.images_NHWC.shape == (6, 16, 16, 3) and (got.labels_N == -1).all()
    assert np.array_equal(got.images_NHWC[0], normalise(grey_NHW[0], 16, 3))


def test_the_users_mistakes_are_one_line(project, tmp_path, capsys):
    root, val, _, _ = project
    np.savez(tmp_path / "noimages.npz", pictures=val)
    np.savez(tmp_path / "float.npz", images=val.astype(np.float32))
    (tmp_path / "empty").mkdir()
    (tmp_path / "few").mkdir()
    _save(val[0], tmp_path / "few" / "a.png")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    cases = [
        (root, tmp_path / "nothing-here", "no such file or folder"),
        (root, tmp_path / "empty", "no images found"),
        (root, tmp_path / "few", "scoring needs more than evaluate.nearest_k"),
        (root, tmp_path / "noimages.npz", "no `images` array"),
        (root, tmp_path / "float.npz", "must be uint8"),
        (root, tmp_path / "bad.npz", "cannot read it as an .npz"),
        (tmp_path / "empty", tmp_path / "few", "run `arvision run` first"),
    ]
    for proj, path, says in cases:
        code, out, err = _score_cli(proj, str(path), capsys=capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (path, err)


def test_the_sample_grid_is_full_for_a_class_rare_in_val(project, monkeypatch):
    """The scored samples follow val's class proportions (a rare class gets fewer than
    samples_per_class); the grid draws its own, samples_per_class for every class."""
    import torch

    from arvision.judge import sample_labels
    from arvision.priors import build_prior, save_prior
    from stages import evaluate, tokenizer

    root, _, labels, names = project
    params, paths = parse_params(PARAMS), Paths(root)
    cfg = params.evaluate
    scored = np.bincount(sample_labels(labels, len(names), cfg.num_samples, cfg.seed), minlength=len(names))
    assert scored.min() < cfg.samples_per_class  # a class rare in val: the old grid had a hole there
    tokenizer.run(params, paths, NullTracker())
    from arvision.tokenizers import load_tokenizer

    tok = load_tokenizer(paths.tokenizer)
    torch.manual_seed(0)
    prior = build_prior(params.prior, vocab_size=tok.vocab_size, layout=[list(x) for x in tok.layout], num_classes=len(names))
    save_prior(prior, paths.prior, extra={"class_names": names})
    (paths.prior / "meta.json").write_text(json.dumps({"class_names": names}))
    grids = []
    monkeypatch.setattr(evaluate, "save_grid", lambda path, rows, **kw: grids.append((rows, kw["row_names"])))
    evaluate.run(params, paths, NullTracker())
    (rows, row_names), = grids
    assert row_names == names and [len(r) for r in rows] == [cfg.samples_per_class] * len(names)
    assert all(r.shape[1:] == (16, 16, 3) for r in rows)
