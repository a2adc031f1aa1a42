"""Stage ``prior``: train the AR prior on ``data/tokens`` under Ray Train → ``models/prior``.

Writes the EMA weights (what sampling uses), ``metrics/prior.json`` and the training curve
``metrics/prior_curve.csv`` for ``dvc plots``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow.parquet as pq
import torch

from arvision.config import Params
from arvision.priors import build_prior, save_prior
from arvision.tokenizers import load_tokenizer
from arvision.tracking import Tracker, tracking_uri
from arvision.train.loop import final_weights
from arvision.train.ray import cleanup_run, fit_prior, run_name
from stages.common import Paths, atomic_dir, read_json, stage_main, write_curve


def token_meta(paths: Paths) -> dict[str, Any]:
    """Tokenizer kind, layout and vocab size from the token shards' schema metadata."""
    first = sorted((paths.tokens / "train").glob("*.parquet"))[0]
    md = {k.decode(): v.decode() for k, v in (pq.read_schema(first).metadata or {}).items()}
    return {
        "kind": md["arvision.tokenizer.kind"],
        "layout": json.loads(md["arvision.tokenizer.layout"]),
        "vocab_size": int(md["arvision.tokenizer.vocab_size"]),
    }


def files_hash(directory) -> str:
    """sha256 over the token shards' bytes (a few MB): the data a training run depends on."""
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*.parquet")):
        h.update(str(f.relative_to(directory)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    meta = token_meta(paths)
    manifest = read_json(paths.prepared / "manifest.json")
    num_classes = max(1, int(manifest["num_classes"]))
    prior_cfg = params.prior.model_dump(mode="json")
    ray_cfg = params.ray.model_dump(mode="json")
    name = run_name({"prior": prior_cfg, "seed": params.seed, "workers": ray_cfg["num_workers"], "meta": meta,
                     "tokens": files_hash(paths.tokens)})
    storage = paths.cache / "ray"
    state = fit_prior(
        prior_cfg=prior_cfg, ray_cfg=ray_cfg, seed=params.seed, token_dir=paths.tokens, tokenizer_dir=paths.tokenizer,
        vocab_size=meta["vocab_size"], layout=meta["layout"], num_classes=num_classes, storage=storage, name=name,
        mlflow_run_id=tracker.run_id, mlflow_uri=tracking_uri(paths.root) if tracker.run_id else None, root=paths.root,
    )
    tok = load_tokenizer(paths.tokenizer) if params.prior.kind == "var" else None
    model = build_prior(params.prior, vocab_size=meta["vocab_size"], layout=meta["layout"], num_classes=num_classes, tokenizer=tok)
    model.load_state_dict(final_weights(state))
    curve = state.get("curve", [])
    with atomic_dir(paths.prior) as out:
        save_prior(model, out, extra={"class_names": manifest.get("class_names", []), "tokenizer": meta, "ray_run": name})
        (out / "meta.json").write_text(json.dumps({"class_names": manifest.get("class_names", []), "tokenizer": meta}, indent=2))
        write_curve(paths.metrics / "prior_curve.csv", curve)
    cleanup_run(storage, name)
    last = curve[-1] if curve else {}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": int(last.get("step", params.prior.steps)),
        "train_loss": float(last.get("loss", float("nan"))),
        "seq_len": sum(int(torch.tensor(x).prod()) for x in meta["layout"]),
    }


def main() -> None:
    stage_main("prior", run, reads=["data/tokens", "models/tokenizer"])


if __name__ == "__main__":
    main()
