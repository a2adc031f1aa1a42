"""The MLflow Model Registry side: pyfunc wrappers, registration, aliases, loading.

``arvision-tokenizer``: PNG images in, codes out. ``arvision-generator``: labels in, PNG images
out (it bundles tokenizer and prior). ``candidate`` always names the newest version;
``champion`` moves only when a candidate beats it on the primary metric (lower is better).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from arvision.errors import UserError
from arvision.tracking import GENERATOR_MODEL, TOKENIZER_MODEL

# What the pyfunc needs at load time. The environment of a fresh process must already hold
# arvision (models are loaded where the project is installed), so no requirement inference.
_PIP = ["arvision", "torch", "einops", "numpy", "pillow", "pandas"]


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

        p = dict(params or {})
        imgs = self.generator.generate(
            [int(x) for x in model_input["label"]],
            cfg_scale=float(p.get("cfg_scale", 2.0)),
            temperature=float(p.get("temperature", 1.0)),
            top_k=int(p.get("top_k", 0)),
            top_p=float(p.get("top_p", 1.0)),
            seed=int(p.get("seed", 0)),
        )
        return pd.DataFrame({"image": [png_bytes(im) for im in imgs]})


def _signature(name: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if name == TOKENIZER_MODEL:
        return ModelSignature(inputs=Schema([ColSpec("binary", "image")]))
    params = ParamSchema([ParamSpec("cfg_scale", "double", 2.0), ParamSpec("temperature", "double", 1.0),
                          ParamSpec("top_k", "long", 0), ParamSpec("top_p", "double", 1.0), ParamSpec("seed", "long", 0)])
    return ModelSignature(inputs=Schema([ColSpec("long", "label")]), outputs=Schema([ColSpec("binary", "image")]), params=params)


def _log_and_register(run_id: str, name: str, model: mlflow.pyfunc.PythonModel, artifacts: dict[str, str], tags: dict[str, str]):
    import logging

    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)  # the cloudpickle notice, every time
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            signature=_signature(name),
            name=name.replace("arvision-", ""),
            python_model=model,
            artifacts=artifacts,
            pip_requirements=_PIP,
            registered_model_name=name,
            await_registration_for=0,
        )
    client = mlflow.MlflowClient()
    version = info.registered_model_version
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    client.set_registered_model_alias(name, "candidate", str(version))
    return info.model_uri, str(version)


def register_tokenizer(run_id: str, tokenizer_dir: Path, tags: dict[str, str]) -> dict[str, str]:
    """Log the tokenizer pyfunc to ``run_id`` and register it; returns uri and version."""
    uri, version = _log_and_register(run_id, TOKENIZER_MODEL, TokenizerPyfunc(), {"tokenizer": str(tokenizer_dir)}, tags)
    return {"model_uri": f"models:/{TOKENIZER_MODEL}/{version}", "logged_uri": uri, "version": version, "run_id": run_id}


def register_generator(
    run_id: str, tokenizer_dir: Path, prior_dir: Path, metric: str, value: float, tags: dict[str, str]
) -> dict[str, Any]:
    """Register the generator; set ``candidate``; move ``champion`` only if this one is better.

    Lower ``metric`` is better (bits per dimension). Returns version, champion flag and the
    previous champion's value.
    """
    all_tags = dict(tags, **{metric: f"{value:.6f}"})
    _, version = _log_and_register(
        run_id, GENERATOR_MODEL, GeneratorPyfunc(), {"tokenizer": str(tokenizer_dir), "prior": str(prior_dir)}, all_tags
    )
    client = mlflow.MlflowClient()
    previous = None
    try:
        champ = client.get_model_version_by_alias(GENERATOR_MODEL, "champion")
        previous = float(champ.tags.get(metric, "inf"))
    except mlflow.exceptions.MlflowException:
        champ = None
    promote = champ is None or value < previous
    if promote:
        client.set_registered_model_alias(GENERATOR_MODEL, "champion", version)
    return {"version": version, "champion": promote, "previous_champion_value": previous}


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
        raise UserError(f"{source}: neither a directory nor an MLflow model URI (e.g. models:/{GENERATOR_MODEL}@champion)")
    try:
        model = mlflow.pyfunc.load_model(source)
    except Exception as err:  # unknown name/alias, unreachable store
        raise UserError(f"cannot load {source}: {str(err).splitlines()[0]}") from None
    return model.unwrap_python_model().generator

