"""Typed parameters: one class per section of ``params.yaml``.

Configuration enters once, at the edge: :func:`load_params` reads the YAML file, validates
every section and raises :class:`ParamsError` naming the key path and what is allowed, before
any work starts. Unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from arvision.errors import UserError


class ParamsError(UserError):
    """A parameter is unknown, of the wrong type or out of range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where images come from and how they are normalised (stage ``prepare``)."""

    source: Literal["emoji", "folder", "mnist", "parquet"] = "emoji"
    path: Optional[str] = None  # folder / mnist dir / parquet file; unused for emoji
    resolution: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_images: Optional[int] = Field(None, ge=2)  # cap, for quick experiments
    shard_size: int = Field(2048, ge=16)  # rows per Parquet shard
    image_column: str = "image"  # parquet source only
    label_column: Optional[str] = "label"  # parquet source only; None = unlabelled

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source != "emoji" and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class TokenizerConfig(_Section):
    """The image tokenizer (stage ``tokenizer``). Fields a kind does not use are ignored by it."""

    kind: Literal["palette", "vq", "rq", "fsq", "msvq"] = "vq"
    # convolutional encoder/decoder
    width: int = Field(48, ge=8)  # channels of the first encoder level
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2])  # one entry per level; downsample = 2**(len-1)
    num_res_blocks: int = Field(0, ge=0, le=8)
    # quantiser
    codebook_size: int = Field(512, ge=2, le=65536)
    code_dim: int = Field(8, ge=1)  # lookup dimension (low-dim, l2-normalised lookup)
    l2_norm: bool = True  # vq: l2-normalised lookup; msvq: latent on the unit sphere; rq: ignored
    ema: bool = True
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    kmeans_init: bool = True
    dead_code_restart: bool = True
    dead_code_threshold: float = Field(1.0, ge=0.0)  # EMA count under which a code is restarted
    commitment: float = Field(0.25, ge=0.0)
    rq_depth: int = Field(4, ge=1, le=16)
    fsq_levels: list[int] = Field(default_factory=lambda: [8, 5, 5, 5])
    scales: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 6, 8])
    palette_size: int = Field(16, ge=2, le=4096)
    # optional adversarial loss
    adversarial: bool = False
    disc_start: int = Field(2000, ge=0)
    disc_weight: float = Field(0.1, ge=0.0)
    # training
    steps: int = Field(1000, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0.0)
    log_every: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError("tokenizer.channel_mult must be a non-empty list of positive integers")
        if any(lv < 2 for lv in self.fsq_levels) or not self.fsq_levels:
            raise ValueError("tokenizer.fsq_levels must be a non-empty list of integers >= 2")
        if self.scales != sorted(set(self.scales)) or self.scales[0] < 1:
            raise ValueError("tokenizer.scales must be strictly increasing positive integers")
        return self


class TokensConfig(_Section):
    """Token precompute (stage ``tokens``)."""

    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(4096, ge=16)  # rows per Parquet shard
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PriorConfig(_Section):
    """The autoregressive prior (stage ``prior``)."""

    kind: Literal["gpt", "var"] = "gpt"
    size: str = "tiny"  # a name of the size registry (arvision.priors.SIZES)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # for classifier-free guidance
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker, per micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)  # 0 disables the EMA
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)


class RayConfig(_Section):
    """Where the prior trains."""

    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local instance
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)


class EvaluateConfig(_Section):
    """Evaluation and sampling (stage ``evaluate``)."""

    samples_per_class: int = Field(8, ge=1)
    cfg_scale: float = Field(2.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1: off
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    max_val_images: Optional[int] = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile_sampling: bool = False  # CUDA: compiled sampler in CUDA graphs (pays off for large priors)


class Params(_Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokens: TokensConfig = TokensConfig()
    prior: PriorConfig = PriorConfig()
    ray: RayConfig = RayConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _cross(self) -> "Params":
        from arvision.sizes import SIZES  # no torch: validation stays quick

        sizes = SIZES[self.prior.kind]
        if self.prior.size not in sizes:
            raise ValueError(
                f"prior.size '{self.prior.size}' is not a {self.prior.kind} size; allowed: {', '.join(sizes)}"
            )
        if self.prior.kind == "var" and self.tokenizer.kind != "msvq":
            raise ValueError("prior.kind 'var' needs tokenizer.kind 'msvq' (next-scale prediction)")
        if self.prior.strategy == "fsdp" and not self.ray.use_gpu:
            raise ValueError("prior.strategy 'fsdp' shards over GPUs and needs ray.use_gpu: true; on CPU use 'ddp'")
        if self.tokenizer.kind == "msvq" and self.prior.kind != "var":
            raise ValueError("tokenizer.kind 'msvq' needs prior.kind 'var'")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in e["loc"][:-1])
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys{' in ' + parent if parent else ''}: {', '.join(allowed)}"
        elif "input" in e and e["type"] not in ("missing",):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _allowed_keys(section: str) -> list[str]:
    cls: type[BaseModel] = Params
    for part in [p for p in section.split(".") if p]:
        ann = cls.model_fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return []
    return list(cls.model_fields)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ParamsError` with every problem listed."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such file (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))
