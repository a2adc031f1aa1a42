"""The MLflow Model Registry side: pyfunc wrappers, registration, aliases, loading.

``arvision-tokenizer``: PNG images in, codes out. ``arvision-generator``: labels in, PNG images
out (it bundles tokenizer and prior). ``candidate`` always names the newest version; which one
is ``champion`` is decided in :mod:`arvision.champion`.

Each logged model is self-contained: it carries the part of the ``arvision`` package that its
pyfunc imports (``code_paths``) and pins the versions of the libraries that code needs, so it
loads and serves where arvision is not installed (``mlflow models serve``).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from arvision.config import SamplingConfig
from arvision.errors import UserError
from arvision.tracking import GENERATOR_MODEL, TOKENIZER_MODEL, deferred_client, interrupts_deferred

#: the modules of ``arvision`` the pyfuncs import at load and predict time (this one, the
#: models, the generator, PNG encoding); copied into each model as its code
_CODE = [
    "__init__.py", "errors.py", "images.py", "tracking.py", "registry.py", "generator.py", "viz.py", "sizes.py", "config.py",
    "priors", "tokenizers",
]
#: the distributions that code imports, pinned to the installed versions (MLflow adds its own
#: pin and cloudpickle's)
_REQUIREMENTS = ["torch", "einops", "numpy", "pillow", "pandas", "pydantic", "pyyaml"]
#: the most labels one request may ask for (one image each, sampled in one batch)
MAX_LABELS = 256


def _pinned_requirements() -> list[str]:
    """``name==version`` of the installed distributions, without a local tag (``+cpu``), which
    no public index serves."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in _REQUIREMENTS]


def _code_dir(tmp: Path) -> Path:
    """A copy of the modules in :data:`_CODE` as ``tmp/arvision`` (no caches), for ``code_paths``."""
    src = Path(__file__).resolve().parent
    dst = tmp / "arvision"
    dst.mkdir()
    for name in _CODE:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src / name, dst / name)
    return dst


def _invalid(message: str) -> mlflow.exceptions.MlflowException:
    """A request the caller must fix: the scoring server answers HTTP 400 with this message."""
    return mlflow.exceptions.MlflowException.invalid_parameter_value(message)


class TokenizerPyfunc(mlflow.pyfunc.PythonModel):
    """``predict``: a DataFrame with an ``image`` column of PNG bytes → a ``codes`` column."""

    def load_context(self, context) -> None:
        from arvision.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(Path(context.artifacts["tokenizer"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch
        from PIL import Image

        from arvision.tokenizers import images_to_tensor

        mode = "L" if self.tokenizer.channels == 1 else "RGB"
        res = self.tokenizer.resolution
        imgs = []
        for b in model_input["image"]:
            im = Image.open(io.BytesIO(b)).convert(mode).resize((res, res), Image.BICUBIC)
            arr = np.asarray(im)
            imgs.append(arr[..., None] if arr.ndim == 2 else arr)
        with torch.no_grad():
            codes = self.tokenizer.encode(images_to_tensor(np.stack(imgs)))
        return pd.DataFrame({"codes": [c.tolist() for c in codes]})


class GeneratorPyfunc(mlflow.pyfunc.PythonModel):
    """``predict``: a DataFrame with a ``label`` column → an ``image`` column of PNG bytes.

    Sampling settings come as ``params`` (cfg_scale, temperature, top_k, top_p, seed).
    """

    def load_context(self, context) -> None:
        import torch

        from arvision.generator import Generator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = Generator.load(context.artifacts["tokenizer"], context.artifacts["prior"], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from arvision.viz import png_bytes

        labels = self._labels(model_input)
        settings = _sampling_settings(params)
        imgs = self.generator.generate(labels, **settings)
        return pd.DataFrame({"image": [png_bytes(im) for im in imgs]})

    def _labels(self, model_input: pd.DataFrame) -> list[int]:
        """The requested class ids, checked: 1..MAX_LABELS integers the model knows."""
        if not isinstance(model_input, pd.DataFrame) or "label" not in model_input.columns:
            raise _invalid('expected a "label" column of class ids, e.g. {"inputs": {"label": [0, 1]}}')
        n = self.generator.num_classes
        if not 1 <= len(model_input) <= MAX_LABELS:
            raise _invalid(f"give 1 to {MAX_LABELS} labels per request, got {len(model_input)}")
        values = list(model_input["label"])
        odd = next(((i, x) for i, x in enumerate(values) if not _whole_number(x)), None)
        if odd is not None:  # int() would make 1.5 class 1, and "2" class 2
            raise _invalid(f"labels must be integers in 0..{n - 1}; label {odd[0]} is {odd[1]!r}")
        labels = [int(x) for x in values]
        bad = sorted({x for x in labels if not 0 <= x < n})
        if bad:
            raise _invalid(f"labels {bad[:8]} out of range: this model knows classes 0..{n - 1}")
        return labels


def _whole_number(x: Any) -> bool:
    """An integer (any int type but bool), or a float with no fractional part (JSON's 1.0)."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    return isinstance(x, (float, np.floating)) and float(x).is_integer()


def _sampling_settings(params: dict[str, Any] | None) -> dict[str, Any]:
    """A request's sampling params on top of :class:`~arvision.config.SamplingConfig`'s
    defaults, within its bounds (``evaluate``'s); a value out of them is the caller's error."""
    from pydantic import ValidationError

    try:
        return SamplingConfig(**{k: v for k, v in (params or {}).items() if k in SamplingConfig.model_fields}).model_dump()
    except ValidationError as err:
        e = err.errors()[0]
        ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
        rule = f"must be {ops[e['type']]} {next(iter(e['ctx'].values()))}" if e["type"] in ops else e["msg"].lower()
        raise _invalid(f"{e['loc'][0]} {rule}, got {e['input']}") from None


def _signature(name: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if name == TOKENIZER_MODEL:
        return ModelSignature(inputs=Schema([ColSpec("binary", "image")]))
    params = ParamSchema([ParamSpec(name, "long" if field.annotation is int else "double", field.default)
                          for name, field in SamplingConfig.model_fields.items()])
    return ModelSignature(inputs=Schema([ColSpec("long", "label")]), outputs=Schema([ColSpec("binary", "image")]), params=params)


def _input_example(name: str) -> pd.DataFrame | None:
    """What a request looks like (MLflow stores it and checks the model answers it)."""
    return pd.DataFrame({"label": [0]}) if name == GENERATOR_MODEL else None


def _log_and_register(
    run_id: str,
    name: str,
    model: mlflow.pyfunc.PythonModel,
    artifacts: dict[str, str],
    tags: dict[str, str],
    *,
    metrics: dict[str, float] | None = None,
    description: str | None = None,
    recorded_as: list[str] | None = None,
) -> tuple[str, str, str]:
    """Log ``model`` (with its code, pinned requirements and input example) to ``run_id`` as an
    MLflow 3 logged model, register it as a new version of ``name`` and point ``candidate`` at it.

    Idempotent: the version is keyed by the content of the model's files
    (:func:`arvision.journal.outputs_key`, tag ``arvision.outputs_md5``), and outputs already
    registered give back their version rather than a new one. In a stage, the registration is
    journaled (:mod:`arvision.journal`) and stands only once DVC has recorded the outputs it
    stands for, which will lie at ``recorded_as`` (paths from the project root).

    The logged model carries the params (:func:`_model_params`); the version carries lineage
    tags (:func:`lineage_tags`: ``tags`` and what it reads from the run and the model's files)
    and ``description`` (default: one line naming the model, :func:`_headline`). ``metrics``, if
    given, are logged to the run linked to the logged model (:func:`link_metrics`); a stage that
    logs its metrics itself links them through its tracker's ``model_id`` instead. Returns
    ``(model_uri, version, model_id)``.
    """
    import logging

    from arvision import journal

    prior_dir = Path(artifacts["prior"]) if "prior" in artifacts else None
    # every write waits out a stage's Ctrl-C (or its run's death): one cut short can leave the
    # SQLite store locked, and the stage could then neither end its run nor undo this
    client = deferred_client()
    key = journal.outputs_key([Path(artifacts["tokenizer"])] + ([prior_dir] if prior_dir else []))
    entry = journal.begin(client, name, key, recorded_as or [], run_id, mlflow.get_tracking_uri())
    found = journal.find_version(client, name, key)
    if found is not None:  # these very outputs are registered already: no second version
        version, model_id = str(found.version), logged_model_id(found)
        client.set_registered_model_alias(name, "candidate", version)
        return f"models:/{model_id}", version, model_id
    params = _model_params(client, run_id, Path(artifacts["tokenizer"]), prior_dir)
    version_tags = lineage_tags(client, run_id, Path(artifacts["tokenizer"]), prior_dir, params, tags)

    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # the cloudpickle notice, every time
    logging.getLogger("mlflow.models.model").setLevel(logging.ERROR)  # "validating the serving input example"
    import warnings

    with (interrupts_deferred(), tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id),
          warnings.catch_warnings()):
        # the tokenizer has no input example (PNG bytes; checking one would load and run it): MLflow
        # says so in colour codes, in every log
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            signature=_signature(name),
            name=name.replace("arvision-", ""),
            python_model=model,
            artifacts=artifacts,
            code_paths=[str(_code_dir(Path(tmp)))],
            pip_requirements=_pinned_requirements(),
            input_example=_input_example(name),
            params={k: str(v)[:6000] for k, v in params.items()},
            model_type=name,
        )
        # registered from the logged model (models:/<model_id>), so the version knows its model_id
        # and shows that model's metrics; registered_model_name= above would register runs:/...
        mv = mlflow.register_model(info.model_uri, name, await_registration_for=0)
    version = str(mv.version)
    journal.created(entry, version)
    client.set_model_version_tag(name, version, journal.KEY_TAG, key)  # first: what a re-run looks it up by
    for k, v in version_tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.update_model_version(name, version, description=description or _headline(version_tags))
    client.set_registered_model_alias(name, "candidate", version)
    if metrics:
        link_metrics(client, run_id, info.model_id, metrics)
    return info.model_uri, version, info.model_id


def logged_model_id(mv) -> str | None:
    """The logged model a registered version was made from: its ``model_id``, or (a store that
    keeps none, as the SQL registry) the id in its source, ``models:/<model_id>``."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(getattr(mv, "source", "") or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _model_params(client: mlflow.MlflowClient, run_id: str, tokenizer_dir: Path, prior_dir: Path | None) -> dict[str, Any]:
    """The params that made the model: its own config (``tokenizer.*``, ``prior.*``) and the
    params of the run that logs it, or of its parent (the pipeline run holds all of params.yaml)."""
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    run_params = dict(run.data.params)
    if parent:
        run_params = {**client.get_run(parent).data.params, **run_params}
    tok = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    params: dict[str, Any] = {"tokenizer.kind": tok["kind"], **{f"tokenizer.{k}": v for k, v in tok["cfg"].items()}}
    if prior_dir is not None:
        prior = json.loads((Path(prior_dir) / "config.json").read_text())["config"]
        params.update({f"prior.{k}": v for k, v in prior.items() if k != "layout"})
    params.update(run_params)
    return params


#: family of a model by its tokenizer kind (DESIGN.md, "The three families as configuration")
FAMILY = {"palette": "pixel-level", "vq": "token-level", "rq": "token-level", "fsq": "token-level", "msvq": "scale-level"}


def lineage_tags(client: mlflow.MlflowClient, run_id: str, tokenizer_dir: Path, prior_dir: Path | None,
                 params: dict[str, Any], tags: dict[str, str]) -> dict[str, str]:
    """A version's tags: what it is and where it came from, no metric (those are the logged
    model's): family and kinds, data content hash, git commit, ``params.hash`` (sha256 of
    :func:`_model_params`, 12 hex), the DVC hashes of the inputs of the run that logs it
    (``dvc.dep.*``), and ``tags``."""
    import hashlib

    run = client.get_run(run_id)
    tok_kind = json.loads((Path(tokenizer_dir) / "config.json").read_text())["kind"]
    out = {"family": FAMILY.get(tok_kind, tok_kind), "tokenizer.kind": tok_kind,
           "git.commit": run.data.tags.get("git.commit", "unknown")}
    if prior_dir is not None:
        prior = json.loads((Path(prior_dir) / "config.json").read_text())["config"]
        out.update({"prior.kind": prior["kind"], "prior.size": str(prior.get("size"))})
    out.update({k: v for k, v in run.data.tags.items() if k.startswith("dvc.dep.") or k == "data.content_hash"})
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    out["params.hash"] = hashlib.sha256(blob).hexdigest()[:12]
    out.update({k: str(v) for k, v in tags.items()})
    return out


def link_metrics(client: mlflow.MlflowClient, run_id: str, model_id: str, metrics: dict[str, float]) -> None:
    """Log ``metrics`` to ``run_id`` linked to the logged model ``model_id`` (MLflow 3): the run
    shows them as its metrics, the logged model and its registered version as the model's."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, 0, model_id=model_id) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def _headline(tags: dict[str, str]) -> str:
    """A version's first line: family, kinds, size, data, commit."""
    what = f"{tags['tokenizer.kind']} tokenizer ({tags['family']})"
    if "prior.kind" in tags:
        size = tags["prior.size"] + (f", {int(tags['prior.params']) / 1e6:.2f}M parameters" if "prior.params" in tags else "")
        what = f"**{tags['family']} generator**: {tags['tokenizer.kind']} tokenizer + {tags['prior.kind']} prior ({size})"
    data = tags.get("data.content_hash", "unknown")
    return f"{what}, trained on data `{data[:12]}` at commit `{tags['git.commit'][:12]}`."


def describe_generator(version: str, tags: dict[str, str], metrics: dict[str, float], data: dict[str, Any],
                       decision: str, num_samples: int) -> str:
    """The model page's description (markdown, a few lines): what the model is, the data, FD
    against its floor (the champion metric) with the other headline figures, the champion
    decision, and how to sample and serve it."""
    def num(key: str, fmt: str = ".3g") -> str:
        v = metrics.get(key)
        text = "—" if v is None else format(v, fmt)
        if f"{key}_ci_low" in metrics:
            text += f" [{metrics[key + '_ci_low']:{fmt}}, {metrics[key + '_ci_high']:{fmt}}]"
        return text

    counts = data.get("counts", {})
    shape = f"{data.get('resolution', '?')}² px, {data.get('num_classes', 0) or 'no'} classes"
    uri = f"models:/{GENERATOR_MODEL}/{version}"
    lines = [
        _headline(tags),
        "",
        f"Data: {data.get('source', '?')}, {counts.get('train', '?')} train / {counts.get('val', '?')} val images, {shape}.",
        "",
        f"**FD {num('fd')}** against a floor of {num('floor_fd')} (training images against val: what a perfect "
        f"generator scores), in the pipeline's own feature space, {num_samples} samples. "
        f"Precision {num('precision', '.2f')}, recall {num('recall', '.2f')}, copies {num('copy_rate', '.1%')} of samples"
        + (f", val bits/dim {metrics['val_bpd']:.4f}" if "val_bpd" in metrics else "") + ".",
        "",
        decision,
        "",
        f"Sample it: `arvision sample {uri} -n 8 --out grid.png`; serve it: "
        f"`mlflow models serve -m {uri} --env-manager local`. Every metric: this version's logged model "
        "(or the source run); params: the logged model's.",
    ]
    return "\n".join(lines)[:5000]


def set_description(name: str, version: str, text: str) -> None:
    mlflow.MlflowClient().update_model_version(name, version, description=text)


def register_tokenizer(run_id: str, tokenizer_dir: Path, tags: dict[str, str]) -> dict[str, str]:
    """Log the tokenizer pyfunc to ``run_id`` and register it; returns uri, version and the
    logged model's id (its metrics: the stage's, linked through ``model_id``)."""
    uri, version, model_id = _log_and_register(run_id, TOKENIZER_MODEL, TokenizerPyfunc(), {"tokenizer": str(tokenizer_dir)}, tags,
                                               recorded_as=["models/tokenizer"])
    # the run that made the version (an earlier one where these outputs were registered before):
    # the same outputs give the same registry.json
    made_by = mlflow.MlflowClient().get_model_version(TOKENIZER_MODEL, version).run_id or run_id
    return {"model_uri": f"models:/{TOKENIZER_MODEL}/{version}", "logged_uri": uri, "version": version, "run_id": made_by,
            "model_id": model_id}


def register_generator(
    run_id: str, tokenizer_dir: Path, prior_dir: Path, tags: dict[str, str], metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Register the generator as a new version of ``arvision-generator`` and point ``candidate``
    at it; ``tags`` go into its lineage tags, ``metrics`` (if given) are linked to its logged
    model (``evaluate`` links its metrics through its tracker instead, and writes the
    description once the champion is decided: :func:`describe_generator`).

    Whether it becomes champion is decided by the caller, on scores made in the same run
    (:mod:`arvision.champion`). Returns the version, the logged model's id and the version's tags.
    """
    _, version, model_id = _log_and_register(
        run_id, GENERATOR_MODEL, GeneratorPyfunc(), {"tokenizer": str(tokenizer_dir), "prior": str(prior_dir)}, tags,
        recorded_as=["models/tokenizer", "models/prior"], metrics=metrics,
    )
    mv = mlflow.MlflowClient().get_model_version(GENERATOR_MODEL, version)
    return {"version": version, "model_id": model_id, "tags": dict(mv.tags)}


def load_generator(source: str, device: str | None = None):
    """A :class:`~arvision.generator.Generator` from ``models:/...`` (or any MLflow model URI) or
    from a directory holding ``tokenizer/`` and ``prior/`` (the stage outputs, ``models/``)."""
    import torch

    from arvision.generator import Generator

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(source)
    if path.is_dir():
        if not (path / "tokenizer").is_dir() or not (path / "prior").is_dir():
            raise UserError(f"{source}: expected a directory with tokenizer/ and prior/ (e.g. models/)")
        return Generator.load(path / "tokenizer", path / "prior", device=device)
    if ":" not in source:
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise UserError(f"{source}: {what}; give a directory of stage outputs with tokenizer/ and prior/ "
                        f"(models/, after `arvision run` or `dvc pull`) or an MLflow model URI "
                        f"(e.g. models:/{GENERATOR_MODEL}@champion)")
    try:
        model = mlflow.pyfunc.load_model(source)
    except Exception as err:  # unknown name/alias, unreachable store
        raise UserError(f"cannot load {source}: {str(err).splitlines()[0]}") from None
    return model.unwrap_python_model().generator

