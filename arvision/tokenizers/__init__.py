"""Image tokenizers: one module per kind, one registry, save/load, and the uint8 ↔ tensor helpers.

The package: ``interface`` (the :class:`Tokenizer` interface), ``conv`` (encoder, decoder and the
base of the trained kinds), ``quantizer`` (the vector quantiser and its k-means), ``resize``
(bicubic resizing as matmuls), and one module per kind.

Tokenizers are configured by a :class:`arvision.config.TokenizerConfig`. They only read its
attributes, and the modules import without pydantic (the config is imported for type hints
only), so a tool on a machine without pydantic (``bench/tokenizer.py``) can pass an object with
the same fields; :func:`load_tokenizer` builds a ``TokenizerConfig`` and needs pydantic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from arvision.errors import UserError
from arvision.images import images_to_tensor, tensor_to_images  # noqa: F401  (re-exported: the tokenizers' I/O)
from arvision.tokenizers.fsq import FSQTokenizer
from arvision.tokenizers.interface import Tokenizer
from arvision.tokenizers.msvq import MSVQTokenizer
from arvision.tokenizers.palette import PaletteTokenizer
from arvision.tokenizers.rq import RQTokenizer
from arvision.tokenizers.vq import VQTokenizer

if TYPE_CHECKING:
    from arvision.config import TokenizerConfig

TOKENIZERS: dict[str, type[Tokenizer]] = {
    "palette": PaletteTokenizer,
    "vq": VQTokenizer,
    "rq": RQTokenizer,
    "fsq": FSQTokenizer,
    "msvq": MSVQTokenizer,
}

__all__ = [
    "TOKENIZERS",
    "Tokenizer",
    "build_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "images_to_tensor",
    "tensor_to_images",
    "config_to_dict",
]

WEIGHTS = "weights.pt"


def build_tokenizer(cfg: TokenizerConfig, *, channels: int, resolution: int) -> Tokenizer:
    """A fresh tokenizer of ``cfg.kind`` for images of ``channels`` × ``resolution``²."""
    if cfg.kind not in TOKENIZERS:
        raise UserError(f"tokenizer.kind '{cfg.kind}' is unknown; allowed: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[cfg.kind](cfg, channels=channels, resolution=resolution)


def config_to_dict(cfg: TokenizerConfig) -> dict[str, Any]:
    """The config as plain JSON values (``vars`` of a stand-in object without ``model_dump``)."""
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump()
    return dict(vars(cfg))


def _config_from_dict(d: dict[str, Any]) -> TokenizerConfig:
    """The saved config, validated; keys that ``TokenizerConfig`` no longer has are dropped
    (configs saved by older versions), missing ones take its defaults."""
    from arvision.config import TokenizerConfig  # here: importing the package needs no pydantic

    return TokenizerConfig.model_validate({k: v for k, v in d.items() if k in TokenizerConfig.model_fields})


def save_tokenizer(tok: Tokenizer, directory: Path) -> None:
    """``config.json`` (kind, cfg, channels, resolution) and ``weights.pt`` (the state_dict, on CPU)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": tok.kind,
        "cfg": config_to_dict(tok.cfg),
        "channels": tok.channels,
        "resolution": tok.resolution,
        "vocab_size": tok.vocab_size,
        "layout": [list(e) for e in tok.layout],
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in tok.state_dict().items()}
    torch.save(state, directory / WEIGHTS)


def load_tokenizer(directory: Path, device: str | torch.device = "cpu") -> Tokenizer:
    """The tokenizer saved in ``directory``, on ``device``, in eval mode."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise UserError(f"{directory}: no tokenizer here (config.json missing); run the tokenizer stage first")
    meta = json.loads((directory / "config.json").read_text())
    cfg = _config_from_dict(meta["cfg"])
    tok = build_tokenizer(cfg, channels=meta["channels"], resolution=meta["resolution"])
    tok.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
    return tok.to(device).eval()
