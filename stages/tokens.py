"""Stage ``tokens``: encode ``data/prepared`` with ``models/tokenizer`` → ``data/tokens/{train,val}``.

Deterministic: the same inputs give byte-identical shards, so DVC sees no change.

Each split streams through :mod:`arvision.data.tokens`: in this process, or, for a large split
(:data:`~arvision.data.tokens.RAY_MIN_ROWS` rows or more) where there are GPUs or 4 cores and
more, or any split when ``ray.address`` / ``$RAY_ADDRESS`` names a cluster, on Ray Data. Both
paths encode the same batches and give the same files.

Augmentation (``tokens.hflip``, ``tokens.crops``): each train image is encoded with its views
(:mod:`arvision.data.views`, made from the decoded uint8 batch just before encoding, in both
paths), one row per (image, view), the image's views together and in order, with an int32
``view`` column (0: the image itself) and the views named in the schema metadata
(``arvision.tokens.views``). The val split holds view 0 only (same schema). Without views the
shards are as before: no ``view`` column.
"""

from __future__ import annotations

import json
from typing import Any

from arvision.config import Params
from arvision.data.parquet_io import ShardWriter, split_rows
from arvision.data.tokens import encode_split, encode_split_ray, inference_ready, token_schema, use_ray
from arvision.data.views import ViewSpec
from arvision.tokenizers import load_tokenizer
from arvision.tracking import Tracker
from stages.common import Paths, atomic_dir, dvc_hashes, read_json, resolve_device, stage_main


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    cfg = params.tokens
    device = resolve_device(cfg.device)
    tok = load_tokenizer(paths.tokenizer)  # on the CPU: on Ray Data the actors encode, not this process
    reg = read_json(paths.tokenizer / "registry.json") if (paths.tokenizer / "registry.json").exists() else {}
    meta = {
        "arvision.tokenizer.kind": tok.kind,
        "arvision.tokenizer.layout": json.dumps([list(x) for x in tok.layout]),
        "arvision.tokenizer.vocab_size": str(tok.vocab_size),
        "arvision.tokenizer.model_uri": reg.get("model_uri", ""),
        "arvision.tokenizer.dvc_hash": dvc_hashes(paths.root, ["models/tokenizer"]).get("models/tokenizer", ""),
    }
    views = ViewSpec.of(cfg)
    if views.n_views > 1:  # without views the shards stay as they were (no view column)
        meta["arvision.tokens.views"] = views.metadata()
    schema = token_schema(tok.vocab_size, tok.seq_len, meta, views=views.n_views > 1)
    counts = {}
    with atomic_dir(paths.tokens) as out:
        for split in ("train", "val"):
            split_dir = paths.prepared / split
            writer = ShardWriter(out / split, schema, cfg.shard_size)
            split_views = views if split == "train" else ViewSpec()  # val: view 0 only
            if use_ray(params, split_rows(split_dir)):
                encode_split_ray(params, paths.tokenizer, paths.root, split_dir, writer, desc=f"tokens/{split}", views=split_views)
            else:
                tok = inference_ready(tok, device)  # once: a second call finds it ready
                encode_split(tok, split_dir, writer, batch_size=cfg.batch_size, device=device, desc=f"tokens/{split}",
                             views=split_views)
            writer.close()
            counts[split] = writer.rows
    return {"train_sequences": counts["train"], "val_sequences": counts["val"], "views": views.n_views,
            "seq_len": tok.seq_len, "vocab_size": tok.vocab_size}


def main() -> None:
    stage_main("tokens", run, reads=["data/prepared", "models/tokenizer"])


if __name__ == "__main__":
    main()
