"""MLflow helpers that need no MLflow store: dotted params."""

from pathlib import Path

import yaml

from arvision.dag import complete_params
from arvision.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]


def _flatten_before(d: dict, prefix: str = "") -> dict:
    """``tracking.flatten`` as written by hand before ``pandas.json_normalize`` (main at 10a6ad8)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_before(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_flatten_gives_the_params_of_before():
    for raw in (yaml.safe_load((ROOT / "params.yaml").read_text()), complete_params({})):
        flat = flatten(raw)
        assert flat == _flatten_before(raw) and len(flat) > 50
        assert all(type(flat[k]) is type(v) for k, v in _flatten_before(raw).items())  # plain Python values, no numpy
    edge = {"a": {"b": {"c": 1.5}}, "empty": {}, "none": None, "list": [1, {"x": 2}], "s": "x"}
    assert flatten(edge) == {"a.b.c": 1.5, "none": None, "list": [1, {"x": 2}], "s": "x"} == _flatten_before(edge)
