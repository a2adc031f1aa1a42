"""The pipeline's stages, in DAG order, and the params each one reads: written once here.

``dvc.yaml`` holds the same DAG for DVC (a test checks the two agree); the Prefect flow and
the CLI take the stage list from here, so the library needs neither Prefect nor DVC for it.
"""

from __future__ import annotations

#: stage names in the order the flow runs them (a topological order of dvc.yaml)
STAGES: list[str] = ["prepare", "tokenizer", "features", "tokens", "prior", "evaluate"]

#: dvc.yaml's first stage, before STAGES: the listing of ``data.path`` that ``prepare`` depends
#: on (``arvision.data.listing``). The flow writes it itself before its stages.
LISTING_STAGE = "source"

#: the params.yaml sections each stage reads (dvc.yaml may track a subset of their keys:
#: keys that cannot change a stage's result, e.g. how often it logs, are left out there)
PARAM_SECTIONS: dict[str, set[str]] = {
    "prepare": {"seed", "data"},
    "tokenizer": {"seed", "tokenizer"},
    "features": {"seed", "features"},
    "tokens": {"tokens"},
    "prior": {"seed", "prior", "ray"},
    "evaluate": {"evaluate"},
}

#: params keys that cannot change a stage's outputs: not tracked by DVC, so changing them
#: re-runs nothing (logging cadence, where Ray runs, how many times a lost worker restarts)
UNTRACKED_KEYS: set[str] = {
    "prior.log_every", "prior.checkpoint_every",
    "ray.address", "ray.cpus_per_worker", "ray.max_failures", "ray.dashboard", "ray.env",
}

#: metrics/<name>.json per stage (evaluate writes metrics/eval.json)
METRICS_FILE: dict[str, str] = {"evaluate": "eval"}


def key_level_sections() -> list[str]:
    """Sections ``dvc.yaml`` tracks key by key (those holding an untracked key). DVC needs each
    of their tracked keys written out in ``params.yaml``: a missing one stops ``dvc repro``."""
    return sorted({k.split(".")[0] for k in UNTRACKED_KEYS})


def missing_tracked_keys(raw: dict) -> dict[str, object]:
    """``{"section.key": default}`` for each key DVC tracks that ``raw`` (params.yaml as read)
    does not write out."""
    defaults = _defaults()
    missing: dict[str, object] = {}
    for section in key_level_sections():
        have = raw.get(section) or {}
        for key, value in defaults[section].items():
            if key not in have and f"{section}.{key}" not in UNTRACKED_KEYS:
                missing[f"{section}.{key}"] = value
    return missing


def complete_params(raw: dict) -> dict:
    """``raw`` with every key of every section written out (defaults where it has none)."""
    full = _defaults()
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(full.get(section), dict):
            full[section].update(values)
        else:
            full[section] = values
    return full


def _defaults() -> dict:
    """Every section's defaults, as params.yaml would write them (``data.path`` unset)."""
    from arvision import config

    out: dict = {"seed": 0}
    for name, field in config.Params.model_fields.items():
        if name == "seed":
            continue
        cls = field.annotation
        out[name] = cls.model_construct().model_dump(mode="json")
    return out
