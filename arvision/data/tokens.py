"""Token shards: encode prepared image shards with a tokenizer, in process or on Ray Data.

The library half of the ``tokens`` stage (``stages/tokens.py`` writes ``data/tokens`` with it;
``bench/gpu_tokens.py`` measures it). Both paths encode the same batches (rows
``[k·b, (k+1)·b)`` of a split) and so give the same codes:

- in process, :func:`encode_split`: the prepared shards decoded ``batch_size`` images at a time,
  encoded and written by a :class:`~arvision.data.parquet_io.ShardWriter` (memory holds one batch
  and one output shard);
- on Ray Data, :func:`encode_split_ray`: CPU tasks decode the PNGs
  (:func:`~arvision.data.parquet_io.decode_png_batch`), a pool of :class:`EncodeActor`
  (:data:`ACTORS_PER_GPU` on each GPU where there are GPUs, else one a CPU) encodes, and the
  driver writes their codes in order. :func:`use_ray` says when that pays.

Each train image may be encoded with its views (:class:`~arvision.data.views.ViewSpec`): one
row per (image, view), an int32 ``view`` column (:func:`token_schema`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from arvision.config import Params
from arvision.data.parquet_io import ShardWriter, decode_png_batch, iter_image_batches, read_parquet_files, shard_paths, split_rows
from arvision.data.views import ViewSpec, expand_views
from arvision.progress import bar as progress_bar
from arvision.tokenizers import load_tokenizer
from arvision.train.common import encode_images

log = logging.getLogger("arvision")

#: encoder actors sharing each GPU: one copies its batch in and its codes out while the other
#: computes (64², bench/gpu_tokens.py: 2 actors 19-24k img/s, 1 actor 12-13k)
ACTORS_PER_GPU = 2
#: decoded pixels an encoder actor takes a call, in whole ``tokens.batch_size`` batches (it
#: encodes them one batch at a time, so the codes do not change): fewer, larger hand-overs
#: through Ray's object store. 48 MiB: 8 batches of 512 at 64², 2 of 128 at 256²
CALL_BYTES = 48 << 20


def batches_per_call(batch_size: int, image_bytes: int) -> int:
    """Whole batches an encoder actor call takes: about :data:`CALL_BYTES` of pixels, at least one."""
    return max(1, round(CALL_BYTES / (batch_size * image_bytes)))

#: a split of this many rows or more is encoded on Ray Data (parallel decoding, GPU actors)
RAY_MIN_ROWS = 20_000


def token_schema(vocab_size: int, seq_len: int, metadata: dict[str, str], views: bool = False) -> pa.Schema:
    """``id``, ``label`` (int32), ``codes`` (fixed-size list of uint16, or int32 past 65,536 codes),
    and with ``views`` (augmented data) ``view`` (int32, 0: the image itself)."""
    code_type = pa.uint16() if vocab_size <= 65536 else pa.int32()
    fields = [("id", pa.string()), ("label", pa.int32()), ("codes", pa.list_(code_type, seq_len))]
    return pa.schema(fields + ([("view", pa.int32())] if views else []), metadata={k: v.encode() for k, v in metadata.items()})


def code_dtype(vocab_size: int) -> type:
    """The numpy dtype of stored codes: uint16, or int32 past 65,536 codes."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def codes_table(ids, labels: np.ndarray, codes: np.ndarray, schema: pa.Schema, views: np.ndarray | None = None) -> pa.Table:
    """One batch of rows of the token schema; ``codes`` ``(b, L)`` already of :func:`code_dtype`;
    ``views`` ``(b,)`` for a schema with a ``view`` column (None: all view 0)."""
    seq_len = schema.field("codes").type.list_size
    flat = pa.array(np.ascontiguousarray(codes).reshape(-1), type=schema.field("codes").type.value_type)
    columns = [pa.array(list(ids), pa.string()), pa.array(np.asarray(labels, np.int32), pa.int32()),
               pa.FixedSizeListArray.from_arrays(flat, seq_len)]
    if "view" in schema.names:
        columns.append(pa.array(np.zeros(len(columns[0]), np.int32) if views is None else np.asarray(views, np.int32), pa.int32()))
    return pa.Table.from_arrays(columns, schema=schema)


def encode_views(tok, ids, images: np.ndarray, labels: np.ndarray, views: ViewSpec, *, batch_size: int, device,
                 ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Both paths' encoding: each ``batch_size`` images of uint8 ``images`` ``(n, H, W, C)`` with
    their views (:func:`~arvision.data.views.expand_views`), encoded ``batch_size`` at a time →
    ``(ids, labels, view int32, codes int64 (n·v, L))``, the rows of each image together. The
    chunks are cut from the image batch the same way in both paths, so the codes agree."""
    if views.n_views == 1:  # the codes exactly as before augmentation existed
        codes = encode_images(tok, images, batch_size=batch_size, device=device)
        return list(ids), np.asarray(labels), np.zeros(len(ids), np.int32), codes.numpy()
    out_ids: list[str] = []
    out_labels, out_views, out_codes = [], [], []
    for a in range(0, len(ids), batch_size):
        v_ids, v_images, v_labels, v_views = expand_views(list(ids[a : a + batch_size]), images[a : a + batch_size],
                                                          labels[a : a + batch_size], views)
        out_ids += v_ids
        out_labels.append(v_labels)
        out_views.append(v_views)
        out_codes.append(encode_images(tok, v_images, batch_size=batch_size, device=device).numpy())
    if not out_codes:
        return [], np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, tok.seq_len), np.int64)
    return out_ids, np.concatenate(out_labels), np.concatenate(out_views), np.concatenate(out_codes)


def encode_split(tok, split_dir: Path, writer: ShardWriter, *, batch_size: int, device, desc: str = "",
                 views: ViewSpec = ViewSpec()) -> int:
    """In-process: encode ``split_dir`` batch by batch (with ``views`` of each image) into
    ``writer``; returns the rows written."""
    np_type = code_dtype(tok.vocab_size)
    with progress_bar(split_rows(split_dir), desc, "img") as bar:
        for ids, images, labels in iter_image_batches(split_dir, batch_size):
            r_ids, r_labels, r_views, codes = encode_views(tok, ids, images, labels, views, batch_size=batch_size, device=device)
            writer.write(codes_table(r_ids, r_labels, codes.astype(np_type), writer.schema, r_views))
            bar.update(len(ids))
    return writer.rows


def inference_ready(tok, device) -> Any:
    """``tok`` in eval mode on ``device``; on a GPU also channels-last with cuDNN autotuning
    (the input of :func:`~arvision.train.common.encode_images` is channels-last already), as
    ``bench/tokenizer.py`` measures the bare encode."""
    import torch

    tok = tok.to(device).eval()
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        tok = tok.to(memory_format=torch.channels_last)
    return tok


class EncodeActor:
    """A Ray Data actor: loads the tokenizer once, then turns decoded batches (``id``, ``label``,
    ``pixels``) into ``id``, ``label``, ``codes`` (b·v, L) of :func:`code_dtype` and ``view``, each
    image with its ``views`` (:func:`encode_views`, as the in-process path)."""

    def __init__(self, tokenizer_dir: str, device: str, batch_size: int, views: ViewSpec = ViewSpec()):
        self.device, self.batch_size, self.views = device, batch_size, views
        self.tok = inference_ready(load_tokenizer(Path(tokenizer_dir)), device)
        self.np_type = code_dtype(self.tok.vocab_size)
        if device == "cuda":  # kernels load and cuDNN autotunes now, while the first blocks are read and decoded
            shape = (batch_size, self.tok.resolution, self.tok.resolution, self.tok.channels)
            encode_images(self.tok, np.zeros(shape, np.uint8), batch_size=batch_size, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, labels, views, codes = encode_views(self.tok, batch["id"], batch["pixels"], batch["label"].astype(np.int32),
                                                 self.views, batch_size=self.batch_size, device=self.device)
        return {"id": np.asarray(ids, dtype=object), "label": labels.astype(np.int32), "codes": codes.astype(self.np_type), "view": views}


def tokens_dataset(
    params: Params, tokenizer_dir: Path, split_dir: Path, *, actors_per_gpu: int = ACTORS_PER_GPU,
    calls_of: int | None = None, views: ViewSpec = ViewSpec(),
):
    """The Ray Data pipeline of a split: one read task a shard → blocks of exactly
    ``tokens.batch_size`` rows → PNG decoding in CPU tasks → :class:`EncodeActor` pool
    (``actors_per_gpu`` actors on each GPU where the cluster has GPUs, each call ``calls_of``
    batches, by default about :data:`CALL_BYTES` of pixels; else one actor a CPU, leaving two
    for reading and the driver, a batch a call), each image with its ``views``. Call inside
    :func:`ray_data_context`."""
    import ray
    import ray.data

    cfg = params.tokens
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.device != "cpu" and gpus > 0  # auto or cuda, and the cluster has GPUs
    if use_gpu:  # actors_per_gpu on each GPU: one copies and converts while another computes
        resources: dict[str, Any] = {"num_gpus": 1 / actors_per_gpu, "compute": ray.data.ActorPoolStrategy(size=gpus * actors_per_gpu)}
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        resources = {"num_cpus": 1, "compute": ray.data.ActorPoolStrategy(size=max(1, min(16, cpus - 2)))}
    # one read task a shard; Ray's read_parquet spent ~0.1 s a file listing them (5 s for 49)
    files = [str(p.resolve()) for p in shard_paths(split_dir)]
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    ds = ds.map_batches(read_parquet_files, fn_kwargs={"columns": ["id", "image", "label"]}, batch_size=1, num_cpus=1)
    # blocks of exactly batch_size rows (the last fewer): every batch an actor encodes is the
    # batch the in-process path encodes, so both give the same codes
    try:
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size, strict=True)
    except TypeError:  # a Ray without ``strict``
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    # decoding fans out over CPU tasks; the actors (one a GPU) only encode
    # (decode_png_batch lives in a module without torch: each decoding worker imports it)
    ds = ds.map_batches(decode_png_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1)
    # an actor call takes whole blocks, so each of its batch_size chunks is a block: the same batches
    if calls_of is None and use_gpu:
        meta = json.loads((tokenizer_dir / "config.json").read_text())
        calls_of = batches_per_call(cfg.batch_size, meta["channels"] * meta["resolution"] ** 2)
    calls_of = calls_of or 1  # CPU actors compute as long as they copy: a batch a call keeps them all busy
    return ds.map_batches(
        EncodeActor, fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir.resolve()),
                                            "device": "cuda" if use_gpu else "cpu", "batch_size": cfg.batch_size,
                                            "views": views},
        batch_size=cfg.batch_size * calls_of, batch_format="numpy", **resources,
    )


@contextlib.contextmanager
def ray_data_context():
    """Rows in file order, no Ray progress bars (ours counts images), restored afterwards."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    was = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = was


def encode_split_ray(params: Params, tokenizer_dir: Path, root: Path, split_dir: Path, writer: ShardWriter, *,
                     desc: str = "", **options) -> int:
    """On Ray Data (:func:`tokens_dataset`), on the cluster of ``params.ray`` (a local one kept
    under ``root``): codes written here, in row order; returns the rows written. Ray Data's
    per-operator statistics go to the ``arvision`` logger at DEBUG."""
    from arvision.cluster import init_ray

    init_ray(params.ray, root)
    with ray_data_context():
        ds = tokens_dataset(params, tokenizer_dir, split_dir, **options)
        with progress_bar(split_rows(split_dir), desc, "img") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.write(codes_table(batch["id"], batch["label"], batch["codes"], writer.schema, batch["view"]))
                bar.update(int((batch["view"] == 0).sum()))  # images, not their views
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tokens on Ray Data, %s:\n%s", split_dir.name, ds.stats())
    return writer.rows


def use_ray(params: Params, rows: int) -> bool:
    """:func:`arvision.cluster.ray_data_pays` for a split of ``rows`` rows: a named cluster, or
    :data:`RAY_MIN_ROWS` rows and more with GPUs (unless ``tokens.device: cpu``) or 4 cores
    and more; never for an empty split."""
    from arvision.cluster import ray_data_pays

    return ray_data_pays(rows, RAY_MIN_ROWS, params.ray, gpu_work=params.tokens.device != "cpu")
