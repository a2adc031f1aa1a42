"""The autoregressive priors: ``gpt`` (next token, LlamaGen-style) and ``var`` (next scale).

- :data:`SIZES` is the size registry, per kind; each entry's ``params`` is the parameter count
  (in millions) at the kind's reference setting in :data:`REFERENCE` (checked by the tests).
- :func:`build_prior` builds one from the ``prior`` section (:class:`arvision.config.PriorConfig`)
  and the codes it models; the model itself takes a frozen architecture record
  (:class:`~arvision.priors.gpt.GPTArch`, :class:`~arvision.priors.var.VARArch`).
- :func:`save_prior` / :func:`load_prior`: ``config.json`` (everything needed to rebuild,
  independent of later registry changes) + ``weights.pt`` (a plain state dict).

A saved ``var`` prior stores what it needs of the tokenizer to be *built* (``embed_dim``,
``scales``), but its forward pass, loss and sampling call the tokenizer (teacher-forcing input,
next-scale input): pass it at load, ``load_prior(dir, tokenizer=tok)``, or set
``prior.tokenizer = tok`` later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arvision.config import PriorConfig
from arvision.priors.blocks import Prior, count_params
from arvision.sizes import REFERENCE, SIZES

__all__ = ["SIZES", "REFERENCE", "Prior", "build_prior", "save_prior", "load_prior", "count_params", "param_count"]

def _arch(kind: str, size: str) -> dict[str, Any]:
    if kind not in SIZES:
        raise ValueError(f"unknown prior kind '{kind}'; allowed: {', '.join(SIZES)}")
    if size not in SIZES[kind]:
        raise ValueError(f"prior.size '{size}' is not a {kind} size; allowed: {', '.join(SIZES[kind])}")
    return {k: v for k, v in SIZES[kind][size].items() if k != "params"}


def _from_config(config: dict[str, Any], tokenizer: Any = None) -> Prior:
    """Rebuild a prior from its ``config`` dict (what :func:`save_prior` writes)."""
    c = dict(config)
    kind = c.pop("kind")
    c.pop("size", None)
    c["layout"] = tuple(tuple(x) for x in c["layout"])
    if kind == "gpt":
        from arvision.priors.gpt import GPT, GPTArch

        return GPT(GPTArch(**c))
    if kind == "var":
        from arvision.priors.var import VAR, VARArch

        return VAR(VARArch(**c), tokenizer=tokenizer)
    raise ValueError(f"unknown prior kind '{kind}'")


def build_prior(cfg: PriorConfig, *, vocab_size: int, layout: list, num_classes: int, tokenizer: Any = None) -> Prior:
    """A fresh prior of ``cfg.kind`` / ``cfg.size`` for codes of ``vocab_size`` laid out as ``layout``.

    ``var`` needs the tokenizer (``embed_dim``, ``scales`` and its two input methods).
    """
    config: dict[str, Any] = dict(
        kind=cfg.kind, vocab_size=int(vocab_size), layout=[list(x) for x in layout], num_classes=int(num_classes),
        dropout=cfg.dropout, class_dropout=cfg.class_dropout, drop_path=cfg.drop_path, **_arch(cfg.kind, cfg.size),
    )
    if cfg.kind == "var":
        if tokenizer is None:
            raise ValueError("prior.kind 'var' needs the msvq tokenizer (tokenizer=...)")
        config["embed_dim"] = int(tokenizer.embed_dim)
    model = _from_config(config, tokenizer)
    model.config["size"] = cfg.size
    return model


def param_count(kind: str, size: str, **overrides: Any) -> int:
    """Parameters of ``kind``/``size`` at the reference setting (or ``overrides``), built on the
    meta device (nothing is allocated)."""
    cfg = PriorConfig(kind=kind, size=size)
    config = dict(kind=kind, **{**REFERENCE[kind], **overrides}, dropout=cfg.dropout, class_dropout=cfg.class_dropout,
                  **_arch(kind, size))
    with torch.device("meta"):
        model = _from_config(config, tokenizer=None)
    return count_params(model)


def save_prior(model: nn.Module, directory: Path, extra: dict | None = None) -> None:
    """Write ``config.json`` (architecture, vocab, layout, classes, ``extra``) and ``weights.pt``."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": 1, "config": model.config, "extra": extra or {}}
    (directory / "config.json").write_text(json.dumps(payload, indent=2, default=str))
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / "weights.pt")


def load_prior(directory: Path, *, tokenizer: Any = None, device: str | torch.device = "cpu") -> Prior:
    """Rebuild a saved prior (eval mode, on ``device``). ``var`` needs ``tokenizer`` to run."""
    directory = Path(directory)
    payload = json.loads((directory / "config.json").read_text())
    model = _from_config(payload["config"], tokenizer=tokenizer)
    model.config["size"] = payload["config"].get("size")
    model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval()
