"""dvc.yaml agrees with the code: the stage list, the params each stage reads, and the library
code each stage imports (so that a change to that code makes the stage stale)."""

import ast
from pathlib import Path

import yaml

from arvision import config
from arvision.dag import LISTING_STAGE, PARAM_SECTIONS, STAGES, UNTRACKED_KEYS

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

#: imported by stages but cannot change any output: where results are logged, how progress is
#: shown, how a run's processes end (lifetime) and how a registration DVC never recorded is
#: undone (journal), package markers
NO_RESULT = {"arvision/tracking.py", "arvision/progress.py", "arvision/lifetime.py", "arvision/journal.py",
             "arvision/__init__.py", "arvision/train/__init__.py"}
#: dependencies whose own imports are not followed: the registry wraps models built elsewhere
#: (its generator wrapper imports the priors, which the tokenizer stage does not use), and the
#: config imports the prior size registry only to validate ``prior.size``
LEAF = {"arvision/registry.py", "arvision/config.py"}

SECTION_CLASSES = {
    "data": config.DataConfig, "tokenizer": config.TokenizerConfig, "tokens": config.TokensConfig,
    "prior": config.PriorConfig, "ray": config.RayConfig, "features": config.FeaturesConfig,
    "evaluate": config.EvaluateConfig,
}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for base in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if base.exists():
            return base
    return None


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in ``path`` (function-level ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def _closure(start: Path) -> set[str]:
    """Project files reachable from ``start`` through imports of arvision / stages modules."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        rel = str(f.relative_to(ROOT))
        if rel in seen:
            continue
        seen.add(rel)
        if rel in LEAF:
            continue
        for name in _imports(f):
            if name.split(".")[0] in ("arvision", "stages"):
                target = _module_file(name)
                if target is not None:
                    todo.append(target)
    return seen


def test_stage_list_matches_dvc_yaml():
    assert list(DVC) == [LISTING_STAGE, *STAGES]
    for stage, spec in DVC.items():
        assert spec["cmd"] == f"python -m stages.{stage}"


def test_every_imported_module_is_a_dependency():
    for stage in STAGES:
        deps = [d for d in DVC[stage]["deps"] if not d.startswith("${")]
        missing = []
        for rel in sorted(_closure(ROOT / "stages" / f"{stage}.py")):
            if rel in NO_RESULT or rel == "stages/__init__.py":
                continue
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                missing.append(rel)
        assert not missing, f"dvc.yaml stage {stage} imports but does not depend on: {missing}"


def test_params_tracked_key_by_key():
    for stage in STAGES:
        tracked = set()
        for entry in DVC[stage].get("params", []):
            name = entry if isinstance(entry, str) else next(iter(entry))
            tracked.add(name)
        # every tracked name lies in a section the stage reads
        assert {t.split(".")[0] for t in tracked} <= PARAM_SECTIONS[stage], stage
        # every key of those sections is tracked (whole section or key), unless it cannot change a result
        for section in PARAM_SECTIONS[stage] - {"seed"}:
            if section in tracked:
                assert not any(k.startswith(section + ".") for k in UNTRACKED_KEYS), \
                    f"{stage}: {section} tracked whole, but some of its keys should not be"
                continue
            for key in SECTION_CLASSES[section].model_fields:
                full = f"{section}.{key}"
                assert (full in tracked) != (full in UNTRACKED_KEYS), f"{stage}: {full}"


def test_params_yaml_has_every_section():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {"seed", *SECTION_CLASSES}
    config.parse_params(raw)
