"""bench/report.py: the Prior section of bench/RESULTS.md made from the raw result JSON (no torch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _item(group, what, metric, unit, result=None, ref=None, goal=None, status="ok", error=None):
    rec = {"group": group, "device": "cuda", "what": what, "metric": metric, "unit": unit, "reference": ref, "goal": goal,
           "status": status, "wall_s": 12.3}
    if result is not None:
        rec["result"] = result
    if error:
        rec["error"] = error
    return rec


def _run(started, history=False, **extra):
    ref = {"value": 576000.0, "source": "LlamaGen GPT-B, batch 128 (test)"}
    return {
        "kind": "prior_bench", "schema": 1, "history": history, "commit": "0123456789abcdef", "dirty": True,
        "command": "/usr/bin/python3 bench/prior.py --device cuda --out /root/out", "device": "NVIDIA H200",
        "torch": "2.11.0+cu130", "settings": {"device": "cuda", "gpt_steps": 40, "cpu_steps": 40}, "started_utc": started,
        "complete": True,
        "items": {
            "gpt_train_regional_b128": _item("gpt_train", "gpt-B train b128", "tokens_per_s", "tok/s",
                                             {"tokens_per_s": 616290.0, "step_ms": 53.2, "mfu": 0.469, "mfu_vs_989": 0.373},
                                             ref=ref, goal=750000.0),
            "var_sample_compile_cudagraph": _item("var_sample", "var-d16 sample", "images_per_s", "img/s",
                                                  status="error", error="RuntimeError: boom | bad"),
            "profile_gpt_decode": _item("profile", "kernels", None, "", {"file": "profile_gpt_decode.txt"}),
        },
        **extra,
    }


def test_prior_section_from_results(tmp_path):
    report = _report()
    results = tmp_path / "results"
    for name, rec in {"2026-12-01-prior-cuda": _run("2026-12-01T10:00:00Z"),
                      "2026-12-02-prior-cuda": _run("2026-12-02T09:30:00Z"),
                      "old-prior-history": _run("2026-11-29T02:48:00Z", history=True, commit=None, note="gone: `flex`")}.items():
        (results / name).mkdir(parents=True)
        (results / name / "prior_bench.json").write_text(json.dumps(rec))
    (results / "other").mkdir()
    (results / "other" / "pipeline.json").write_text("{}")  # not a kind report.py knows: left alone
    md = tmp_path / "RESULTS.md"
    before, after = "# Benchmarks\n\n## Tokenizer\n\nhand-written\n\n## Prior\n\n", "\n\n## Memorisation\n\nkept\n"
    md.write_text(before + "<!-- prior:begin -->\nstale\n<!-- prior:end -->" + after)

    assert report.main(["--results", str(results), "--md", str(md)]) == 0
    text = md.read_text()
    assert text.startswith(before) and text.endswith(after) and "stale" not in text
    newest, older = text.index("### 2026-12-02 09:30 UTC"), text.index("### 2026-12-01 10:00 UTC")
    history = text.index("### History (settings the code no longer has)")
    assert newest < older < history < text.index("#### 2026-11-29 02:48 UTC")
    assert "commit `0123456789` + uncommitted changes" in text and "commit not recorded" in text
    assert "- command: `/usr/bin/python3 bench/prior.py --device cuda --out /root/out`" in text
    assert "[`results/2026-12-02-prior-cuda/prior_bench.json`](results/2026-12-02-prior-cuda/prior_bench.json)" in text
    row = next(line for line in text.splitlines() if line.startswith("| `gpt_train_regional_b128`"))
    assert "616,290 tok/s" in row and "576,000 [1]" in row and "1.07×" in row and "MFU 46.9% (37.3% of 989)" in row
    assert "[1] LlamaGen GPT-B, batch 128 (test)" in text
    assert "error: RuntimeError: boom \\| bad" in text  # a pipe cannot break the table
    assert "(results/2026-12-02-prior-cuda/profile_gpt_decode.txt)" in text
    assert "cpu_steps" not in text and "gone: `flex`" in text
    assert report.main(["--results", str(results), "--md", str(md), "--check"]) == 0  # regenerating changes nothing


def test_results_md_is_generated():
    """bench/RESULTS.md's Prior section is what bench/results/ gives: run `python bench/report.py`."""
    report = _report()
    assert report.render(report.RESULTS_MD, report.RESULTS_DIR) == report.RESULTS_MD.read_text()


def test_gpu_results_page_is_generated():
    """docs/results.md is what bench/results/ gives: run `python3 bench/gpu_report.py`."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_readme_demo_table_is_generated():
    """README.md's demo table is what docs/demo_figures.json (a real run on a fresh clone) gives:
    run `python3 scripts/demo_figures.py render` (or `measure` for new figures)."""
    spec = importlib.util.spec_from_file_location("demo_figures", ROOT / "scripts" / "demo_figures.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    record = json.loads((ROOT / "docs" / "demo_figures.json").read_text())
    text = (ROOT / "README.md").read_text()
    assert demo.readme_with(text, demo.render(record)) == text
