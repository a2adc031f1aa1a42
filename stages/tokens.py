"""Stage ``tokens``: encode ``data/prepared`` with ``models/tokenizer`` → ``data/tokens/{train,val}``.

Deterministic: the same inputs give byte-identical shards, so DVC sees no change.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from arvision.config import Params
from arvision.data.parquet_io import load_images, write_shards
from arvision.tokenizers import load_tokenizer
from arvision.tracking import Tracker
from arvision.train.common import encode_images
from stages.common import Paths, atomic_dir, dvc_hashes, read_json, resolve_device, stage_main


def token_schema(vocab_size: int, seq_len: int, metadata: dict[str, str]) -> pa.Schema:
    """``id``, ``label`` (int32), ``codes`` (fixed-size list of uint16, or int32 past 65,536 codes)."""
    code_type = pa.uint16() if vocab_size <= 65536 else pa.int32()
    return pa.schema(
        [("id", pa.string()), ("label", pa.int32()), ("codes", pa.list_(code_type, seq_len))],
        metadata={k: v.encode() for k, v in metadata.items()},
    )


def run(params: Params, paths: Paths, tracker: Tracker) -> dict[str, Any]:
    cfg = params.tokens
    device = resolve_device(cfg.device)
    tok = load_tokenizer(paths.tokenizer, device=device)
    reg = read_json(paths.tokenizer / "registry.json") if (paths.tokenizer / "registry.json").exists() else {}
    meta = {
        "arvision.tokenizer.kind": tok.kind,
        "arvision.tokenizer.layout": json.dumps([list(x) for x in tok.layout]),
        "arvision.tokenizer.vocab_size": str(tok.vocab_size),
        "arvision.tokenizer.model_uri": reg.get("model_uri", ""),
        "arvision.tokenizer.dvc_hash": dvc_hashes(paths.root, ["models/tokenizer"]).get("models/tokenizer", ""),
    }
    schema = token_schema(tok.vocab_size, tok.seq_len, meta)
    np_type = np.uint16 if tok.vocab_size <= 65536 else np.int32
    counts = {}
    with atomic_dir(paths.tokens) as out:
        for split in ("train", "val"):
            ids, images, labels = load_images(paths.prepared / split)
            with tqdm(total=len(images), desc=f"tokens/{split}", unit="img", leave=False) as bar:
                codes = encode_images(tok, images, batch_size=cfg.batch_size, device=device, progress=bar.update)
            codes = codes.numpy().astype(np_type)
            flat = pa.array(codes.reshape(-1), type=schema.field("codes").type.value_type)
            table = pa.Table.from_arrays(
                [pa.array(ids, pa.string()), pa.array(labels, pa.int32()), pa.FixedSizeListArray.from_arrays(flat, tok.seq_len)],
                schema=schema,
            )
            write_shards(table, out / split, cfg.shard_size)
            counts[split] = len(ids)
    return {"train_sequences": counts["train"], "val_sequences": counts["val"], "seq_len": tok.seq_len, "vocab_size": tok.vocab_size}


def main() -> None:
    stage_main("tokens", run, reads=["data/prepared", "models/tokenizer"])


if __name__ == "__main__":
    main()
