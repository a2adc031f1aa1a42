"""Typed parameters: one class per section of ``params.yaml``.

Configuration enters once, at the edge: :func:`load_params` reads the YAML file, validates
every section and raises :class:`ParamsError` naming the key path and what is allowed, before
any work starts. Unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from arvision.errors import UserError


class ParamsError(UserError):
    """A parameter is unknown, of the wrong type or out of range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixup(cls, value: Any, info: ValidationInfo) -> Any:
        """A YAML ``true`` is not the number 1, and a ``1`` is not ``true``: both are refused.

        Pydantic's lax mode takes either for the other; the rest of lax coercion stays (YAML
        reads ``1e-3`` as a string, which must still pass as a float).
        """
        annotation = cls.model_fields[info.field_name].annotation
        is_bool_field = annotation is bool
        if isinstance(value, bool) and not (is_bool_field or bool in get_args(annotation)):
            raise ValueError(f"expected a value of type {_type_name(cls, info.field_name)}, not a boolean")
        if is_bool_field and not isinstance(value, bool):
            raise ValueError("expected true or false")
        if _mentions_float(annotation) and any(_non_finite(v) for v in (value if isinstance(value, list) else [value])):
            # before the range checks, which would refuse nan for the wrong reason ("less than 1")
            raise ValueError(f"expected {'finite numbers' if isinstance(value, list) else 'a finite number'}, "
                             "not NaN or infinity")
        return value


def _mentions_float(annotation: Any) -> bool:
    """Whether a field's type is, or holds, a float (``float``, ``Optional[float]``, ``list[float]``)."""
    return annotation is float or any(_mentions_float(a) for a in get_args(annotation))


def _non_finite(value: Any) -> bool:
    """NaN or an infinity, as a number or as the string YAML gives for ``nan`` / ``inf``."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def _type_name(cls: type[BaseModel], field: str) -> str:
    ann = cls.model_fields[field].annotation
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


class DataConfig(_Section):
    """Where images come from and how they are normalised (stage ``prepare``)."""

    source: Literal["emoji", "folder", "mnist", "parquet", "webdataset"] = "emoji"
    path: Optional[str] = None  # folder / mnist dir / parquet file / .tar shard(s); unused for emoji
    resolution: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # near-duplicates (within RMS 5/255, arvision/data/prepare.py) on one side of the split
    near_duplicates: bool = True
    max_images: Optional[int] = Field(None, ge=2)  # cap, for quick experiments
    shard_size: int = Field(2048, ge=16)  # rows per Parquet shard
    image_column: str = "image"  # parquet source only
    label_column: Optional[str] = "label"  # parquet: a column; webdataset: a member extension or .json field; None = unlabelled
    label_from: Literal["key", "shard"] = "key"  # webdataset: label_column per sample (key) or the shard's stem (shard)

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source != "emoji" and not self.path:
            raise ValueError(f"data.path: required when data.source is '{self.source}'")
        return self

    def location(self, root: Path) -> Optional[Path]:
        """Where ``data.path`` points, a relative path taken from the project ``root`` (the folder
        of ``params.yaml``); None when unset (the shipped emoji set). Every reader resolves it here."""
        return None if self.path is None else root / Path(self.path).expanduser()


def _adam_betas(betas: list[float]) -> list[float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError("expected [beta1, beta2]: exactly two numbers, each in [0, 1) (AdamW's betas)")
    return betas


#: AdamW's ``[beta1, beta2]`` (every trained section has its own; the trainer takes them)
Betas = Annotated[list[float], AfterValidator(_adam_betas)]


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
    # training
    steps: int = Field(1000, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    betas: Betas = Field(default_factory=lambda: [0.9, 0.99])  # AdamW's
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # the cosine ends at this share of lr
    grad_clip: float = Field(1.0, ge=0.0)
    # the VQGAN recipe (conv kinds: vq, rq, fsq, msvq), off by default. adv_weight > 0 adds a
    # PatchGAN discriminator (hinge loss) whose adversarial loss the decoder gets, scaled by
    # taming's adaptive weight; from step disc_start on (before it neither trains nor counts)
    adv_weight: float = Field(0.0, ge=0.0)  # 0: off; VQGAN / LlamaGen use 0.5
    disc_start: int = Field(0, ge=0)  # first step the discriminator trains and its loss counts
    disc_width: int = Field(64, ge=8)  # channels of the discriminator's first conv
    disc_layers: int = Field(3, ge=1, le=6)  # its strided convs (pix2pix's n_layers; 32² images take at most 3)
    disc_lr: Optional[float] = Field(None, gt=0.0, le=1.0)  # its AdamW's lr (betas 0.5, 0.9); None: tokenizer.lr
    # a perceptual loss that needs no downloaded network: none | disc_features (L1 between the
    # discriminator's features of images and reconstructions) | msssim (1 - MS-SSIM)
    perceptual: Literal["none", "disc_features", "msssim"] = "none"
    perceptual_weight: float = Field(1.0, ge=0.0)
    log_every: int = Field(50, ge=1)
    # a checkpoint every N steps: an interrupted run re-run with the same params and data
    # resumes from the last one (the same weights as an uninterrupted run, on CPU). DVC tracks
    # the tokenizer section whole, so changing it re-runs the stage
    checkpoint_every: int = Field(500, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    # 0: train in the stage's process; N >= 1: on N Ray Train workers (DDP; resources from the
    # ray section), each drawing batch_size / N of the global batch. palette is fitted in-process.
    num_workers: int = Field(0, ge=0)
    # mirror a random half of every training batch (seeded by seed and step: the same flips on
    # resume); palette ignores it (a colour palette does not change under a flip)
    hflip: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError("tokenizer.channel_mult must be a non-empty list of positive integers")
        if any(lv < 2 for lv in self.fsq_levels) or not self.fsq_levels:
            raise ValueError("tokenizer.fsq_levels must be a non-empty list of integers >= 2")
        if self.scales != sorted(set(self.scales)) or self.scales[0] < 1:
            raise ValueError("tokenizer.scales must be strictly increasing positive integers")
        if self.kind == "palette" and (self.adv_weight > 0 or self.perceptual != "none"):
            raise ValueError(
                "tokenizer.adv_weight / tokenizer.perceptual / tokenizer.kind: a palette is fitted by k-means, not "
                "trained, so it takes no adversarial or perceptual loss; set tokenizer.adv_weight: 0 and "
                "tokenizer.perceptual: none, or pick a trained kind (vq, rq, fsq, msvq)"
            )
        if self.uses_discriminator and self.steps > 0 and self.disc_start >= self.steps:
            why = f"tokenizer.adv_weight {self.adv_weight}" if self.adv_weight > 0 else "tokenizer.perceptual disc_features"
            raise ValueError(
                f"tokenizer.disc_start / tokenizer.steps: with {why} the discriminator starts at step {self.disc_start}, "
                f"which training ({self.steps} steps) never reaches; lower tokenizer.disc_start or raise tokenizer.steps"
            )
        if self.perceptual != "none" and self.perceptual_weight == 0:
            raise ValueError(f"tokenizer.perceptual / tokenizer.perceptual_weight: perceptual '{self.perceptual}' with weight 0 "
                             "computes a loss that counts for nothing; set tokenizer.perceptual: none or a weight > 0")
        n = self.num_workers
        if n > 0 and self.kind != "palette" and self.batch_size % n:
            lower, upper = self.batch_size // n * n, -(-self.batch_size // n) * n
            fits = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"tokenizer.batch_size / tokenizer.num_workers: the global batch of {self.batch_size} does not split "
                f"evenly over {n} workers; make tokenizer.batch_size a multiple of {n} (e.g. {fits}) or change tokenizer.num_workers"
            )
        return self

    @property
    def uses_discriminator(self) -> bool:
        """Whether training builds a discriminator: for the adversarial loss, or for the
        feature-matching perceptual loss (which reads its features)."""
        return self.adv_weight > 0 or self.perceptual == "disc_features"


class TokensConfig(_Section):
    """Token precompute (stage ``tokens``)."""

    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(4096, ge=16)  # rows per Parquet shard
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # augmented views of each train image, encoded next to it (arvision/data/views.py): a row per
    # (image, view) and a ``view`` column; the prior draws one view per image each epoch
    hflip: bool = False  # view 1: the horizontal mirror
    crops: int = Field(0, ge=0, le=64)  # this many random resized crops after it, seeded by image id and view
    crop_scale: list[float] = Field(default_factory=lambda: [0.8, 1.0])  # share of the area a crop keeps: [lowest, highest]

    @model_validator(mode="after")
    def _check(self) -> "TokensConfig":
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"tokens.crop_scale must be [lowest, highest] with 0 < lowest <= highest <= 1, got {self.crop_scale}")
        return self


class PriorConfig(_Section):
    """The autoregressive prior (stage ``prior``)."""

    kind: str = "gpt"  # a kind of the prior registry (arvision.sizes.SIZES): gpt | var
    size: str = "tiny"  # a name of the size registry (arvision.priors.SIZES)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # stochastic depth: the last block's rate, rising linearly from 0 at the first (VAR, timm)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # for classifier-free guidance
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=1)  # per worker, per micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: Betas = Field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)  # 0 disables the EMA
    # regional torch.compile of each block: auto = on CUDA, off on CPU (arvision.train.loop.use_compile)
    compile: Union[bool, Literal["auto"]] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    # validation while training: val loss every eval_every steps (0: off); which weights to keep
    eval_every: int = Field(100, ge=0)
    keep: Literal["best", "last"] = "best"  # best: the weights with the lowest val loss
    early_stop_patience: int = Field(0, ge=0)  # stop after this many evals without improvement (0: off)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_setting(cls, value: Any) -> Any:
        # exactly these three: pydantic would otherwise take "yes", "1" or "on" as true
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"expected auto, true or false, got {value!r}")

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        from arvision.sizes import SIZES  # the registry a new prior kind adds itself to

        if kind not in SIZES:
            raise ValueError(f"'{kind}' is not a prior kind; allowed: {', '.join(SIZES)}")
        return kind


class RayConfig(_Section):
    """Where the prior trains (``num_workers`` 0: in the stage's process), and the resources of
    every Ray Train worker and Ray Data task."""

    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local instance
    num_workers: int = Field(1, ge=0)  # the prior: 0 trains in the stage's process, N >= 1 on N Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)  # a lost worker restarts from the last checkpoint this often (-1: always)
    dashboard: bool = False  # start the Ray dashboard with a local instance
    env: dict[str, str] = Field(default_factory=dict)  # set in every worker (e.g. NCCL settings a cluster needs)


class FeaturesConfig(_Section):
    """The image encoder that judges samples (stage ``features``): a classifier when the data
    are labelled, contrastive (SimCLR-style, on augmentations) otherwise."""

    mode: Literal["auto", "classifier", "contrastive", "hybrid"] = "auto"  # auto: classifier iff labelled; hybrid: class CE + NT-Xent
    width: int = Field(32, ge=8)  # channels of the first conv level
    dim: int = Field(128, ge=8)  # feature dimension
    steps: int = Field(400, ge=0)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    betas: Betas = Field(default_factory=lambda: [0.9, 0.999])  # AdamW's (torch's default)
    weight_decay: float = Field(5e-4, ge=0.0)
    # the cosine of the learning rate: warm-up steps, then down to min_lr_ratio · lr at the last step
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(0.0, ge=0.0)  # 0: no clipping
    temperature: float = Field(0.2, gt=0.0)  # contrastive loss temperature
    contrastive_weight: float = Field(0.3, ge=0.0, le=100.0)  # hybrid: loss = class CE + this × NT-Xent
    device: Literal["auto", "cpu", "cuda"] = "auto"


class SamplingConfig(_Section):
    """How images are drawn from a prior: the one set of defaults and bounds for ``evaluate``,
    ``arvision sample`` and the served model's request params."""

    cfg_scale: float = Field(2.0, ge=0.0)  # classifier-free guidance (1: off)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1: off
    seed: int = 0


class EvaluateConfig(SamplingConfig):
    """Evaluation and sampling (stage ``evaluate``)."""

    samples_per_class: int = Field(8, ge=1)  # for the sample grid
    num_samples: int = Field(500, ge=10)  # generated images scored against val (sample metrics)
    primary: Literal["fd", "kid", "val_bpd", "neg_precision", "neg_recall", "copy_rate"] = "fd"  # champion metric, lower is better
    inception_weights: Optional[str] = None  # path to the FID Inception weights file: Inception FID too
    nearest_k: int = Field(5, ge=1)  # k of the k-NN manifolds (precision, recall, density, coverage)
    max_copy_rate: float = Field(0.5, ge=0.0, le=1.0)  # a model copying more of its samples can't be champion
    score_last: bool = False  # with prior.keep best: also score the last weights
    batch_size: int = Field(256, ge=1)
    max_val_images: Optional[int] = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile_sampling: bool = False  # CUDA: compiled sampler in CUDA graphs (pays off for large priors)
    bootstrap: int = Field(200, ge=0)  # resamples for the 95 % intervals and the champion rule (0: none, plain comparison)


class Params(_Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokens: TokensConfig = TokensConfig()
    prior: PriorConfig = PriorConfig()
    ray: RayConfig = RayConfig()
    features: FeaturesConfig = FeaturesConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _cross(self) -> "Params":
        """Checks that span keys or sections: each message starts with the keys it is about."""
        from arvision.sizes import SIZES  # no torch: validation stays quick

        problems: list[str] = []
        sizes = SIZES[self.prior.kind]
        if self.prior.size not in sizes:
            problems.append(f"prior.size / prior.kind: '{self.prior.size}' is not a {self.prior.kind} size; allowed: {', '.join(sizes)}")
        if self.prior.kind == "var" and self.tokenizer.kind != "msvq":
            problems.append(f"prior.kind / tokenizer.kind: prior 'var' (next-scale prediction) needs tokenizer 'msvq', not '{self.tokenizer.kind}'")
        if self.tokenizer.kind == "msvq" and self.prior.kind != "var":
            problems.append(f"tokenizer.kind / prior.kind: tokenizer 'msvq' needs prior 'var', not '{self.prior.kind}'")
        if self.prior.strategy == "fsdp" and not self.ray.use_gpu:
            problems.append("prior.strategy / ray.use_gpu: 'fsdp' shards over GPUs and needs ray.use_gpu: true; on CPU use 'ddp'")
        tok, res = self.tokenizer, self.data.resolution
        if tok.kind != "palette":  # the conv kinds: each level after the first halves the image
            levels, factor = len(tok.channel_mult), 2 ** (len(tok.channel_mult) - 1)
            if factor > res:
                problems.append(
                    f"tokenizer.channel_mult / data.resolution: {levels} levels downsample {factor}x, more than "
                    f"the {res}-pixel side of the images; use at most {res.bit_length()} levels for data.resolution {res}"
                )
            elif res % factor:
                fits = sorted({r for r in (res // factor * factor, -(-res // factor) * factor) if r >= 8})
                problems.append(
                    f"data.resolution / tokenizer.channel_mult: {res} is not divisible by {factor}, the downsampling "
                    f"of {levels} levels (2**(len(tokenizer.channel_mult)-1)); use data.resolution "
                    f"{' or '.join(map(str, fits))}, or another number of levels"
                )
            elif tok.kind == "msvq" and tok.scales[-1] != res // factor:
                problems.append(
                    f"tokenizer.scales / data.resolution: msvq's last scale must be the latent side {res // factor} "
                    f"(data.resolution {res} / {factor}x downsampling), got {tok.scales}"
                )
        if self.tokenizer.uses_discriminator:
            from arvision.tokenizers.discriminator import max_layers, patch_side  # imports torch: only with a discriminator

            if patch_side(self.data.resolution, self.tokenizer.disc_layers) < 1:
                problems.append(
                    f"tokenizer.disc_layers / data.resolution: {self.tokenizer.disc_layers} strided discriminator layers leave "
                    f"no patch logit for {self.data.resolution}² images; use at most {max_layers(self.data.resolution)}"
                )
        # warmup must end inside training (features has no warmup); tokenizer.steps 0 trains nothing
        for name, sec in (("tokenizer", self.tokenizer), ("prior", self.prior)):
            if sec.steps > 0 and sec.warmup_steps >= sec.steps:
                problems.append(
                    f"{name}.warmup_steps / {name}.steps: warmup ({sec.warmup_steps}) must be shorter than training "
                    f"({sec.steps} steps); lower {name}.warmup_steps or raise {name}.steps"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _format_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming its key path (``prior.steps: ...``).

    A check over a whole section or several keys (a model validator) names its keys in its
    own message, so neither "(top level)" nor a dump of the section's values is printed.
    """
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a model-level check
            lines += [f"  {m}" for m in msg.removeprefix("Value error, ").splitlines()]
            continue
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in e["loc"][:-1])
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys{' in ' + parent if parent else ''}: {', '.join(allowed)}"
        elif "input" in e and e["type"] not in ("missing",):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {path or '(params)'}: {msg}")
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


def _check_data_path(data: DataConfig, root: Path) -> None:
    """``data.path`` exists and is the kind of thing its source reads (relative to ``root``)."""
    if data.path is None:
        return
    where = data.location(root)
    if not where.exists():
        raise ParamsError(f"data.path: '{data.path}' does not exist (data.source '{data.source}', looked in {where})")
    need_dir = data.source in ("folder", "mnist")
    if need_dir and not where.is_dir():
        raise ParamsError(f"data.path: '{data.path}' is a file; data.source '{data.source}' reads a folder")
    if data.source == "parquet" and where.is_file() and where.suffix != ".parquet":
        raise ParamsError(f"data.path: '{data.path}' is not a .parquet file (data.source 'parquet': a .parquet file or a folder of them)")
    if data.source == "webdataset" and where.is_file() and where.suffix != ".tar":
        raise ParamsError(f"data.path: '{data.path}' is not a .tar file (data.source 'webdataset': a .tar shard or a folder of them)")
    if data.source == "emoji" and where.is_dir() and not (where / "emoji.parquet").is_file():
        raise ParamsError(f"data.path: '{data.path}' holds no emoji.parquet (data.source 'emoji')")


def _written_out(section: str) -> str:
    """The least that writes ``section`` out with its defaults: ``name: {}`` where DVC tracks the
    section whole; where it tracks keys one by one, those keys (DVC stops on a missing one)."""
    from arvision.dag import key_level_sections, missing_tracked_keys

    if section not in Params.model_fields or not isinstance(Params.model_fields[section].default, BaseModel):
        return f"`{section}: {json.dumps(Params.model_fields[section].default)}`" if section in Params.model_fields else section
    if section not in key_level_sections():
        return f"`{section}: {{}}` (its defaults)"
    keys = {k.split(".", 1)[1]: v for k, v in missing_tracked_keys({}).items() if k.startswith(section + ".")}
    return f"`{section}: {json.dumps(keys, separators=(', ', ': '))}` (the keys DVC tracks, at their defaults)"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``: every section present, every key valid, and
    ``data.path`` (relative to the file's folder, the project root) existing with the right kind."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such file; run arvision in the project root, the folder holding params.yaml and dvc.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    sections = list(Params.model_fields)
    if raw is None:
        raise ParamsError(f"{path} is empty; it needs the sections {', '.join(sections)} (see the project's params.yaml)")
    if isinstance(raw, dict):
        missing = [k for k in sections if k not in raw]
        if missing:  # a missing section would silently run on defaults
            raise ParamsError(
                f"{path}: missing section{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                f"every section must be written out: add {'; '.join(_written_out(k) for k in missing)}"
            )
        raw = {k: ({} if v is None and k != "seed" else v) for k, v in raw.items()}
    params = parse_params(raw, str(path))
    from arvision.dag import missing_tracked_keys

    untracked = missing_tracked_keys(raw)
    if untracked:  # DVC tracks these keys one by one and stops on a missing one
        shown = ", ".join(f"{k}: {json.dumps(v)}" for k, v in untracked.items())
        raise ParamsError(f"{path}: DVC tracks these keys one by one, so they must be written out; "
                          f"add them (the defaults are): {shown}")
    _check_data_path(params.data, path.resolve().parent)
    return params
