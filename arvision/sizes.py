"""The prior size registry (arvision.priors), per kind. Plain Python, no torch, so params validation is quick."""

from __future__ import annotations

from typing import Any

# Reference settings at which each size's ``params`` (millions) is stated.
REFERENCE: dict[str, dict[str, Any]] = {
    # ImageNet 256² through a 16× tokenizer (LlamaGen): 16×16 codes of a 16384-entry codebook
    "gpt": dict(vocab_size=16384, layout=[(16, 16)], num_classes=1000),
    # VAR on ImageNet 256²: 10 scales up to 16×16 (680 tokens), 4096 codes, Cvae 32
    "var": dict(vocab_size=4096, layout=[(s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)], num_classes=1000, embed_dim=32),
}

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        # CPU demo / tests: ~0.26M params at vocab 512 / 8×8; trains in minutes on 2 cores
        "tiny": dict(n_layer=3, dim=64, n_head=4, params=2.36),
        "small": dict(n_layer=8, dim=384, n_head=6, params=27.1),
        # one GPU, 64² data, ~10k-50k images (42M at 8×8 codes of 1024): with dropout / drop_path
        "medium": dict(n_layer=12, dim=512, n_head=8, params=58.2),
        "B": dict(n_layer=12, dim=768, n_head=12, params=111.0),  # LlamaGen GPT-B: 111M
        "L": dict(n_layer=24, dim=1024, n_head=16, params=343.0),  # LlamaGen GPT-L: 343M
        "XL": dict(n_layer=36, dim=1280, n_head=20, params=775.0),  # LlamaGen GPT-XL: 775M
    },
    "var": {
        # width 64·depth, heads = depth (head dim 64), MLP ratio 4; ``tiny`` for the CPU
        "tiny": dict(depth=3, width=96, heads=3, params=1.08),
        # one GPU, 64² data, a few thousand images (39M at 6 scales to 8×8, 1024 codes)
        # one GPU, 64² data, a few thousand images: VAR's rule at gpt small's scale
        "d6": dict(depth=6, width=384, heads=6, params=18.49),
        "d8": dict(depth=8, width=512, heads=8, params=41.3),
        # one GPU, 64² data, ~10k-50k images (130M at 6 scales to 8×8): with dropout / drop_path
        "d12": dict(depth=12, width=768, heads=12, params=133.2),
        "d16": dict(depth=16, width=1024, heads=16, params=310.0),  # VAR-d16: 310M
        "d20": dict(depth=20, width=1280, heads=20, params=601.0),  # VAR-d20: 600M
        "d24": dict(depth=24, width=1536, heads=24, params=1033.0),  # VAR-d24: 1.0B
        "d30": dict(depth=30, width=1920, heads=30, params=2010.0),  # VAR-d30: 2.0B
    },
}
