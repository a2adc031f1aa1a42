"""The end-of-run summary of ``arvision run``: FD against its floor first, shares in one unit."""

import json

from arvision.cli import summary


def test_summary_puts_fd_against_its_floor_first_and_shares_as_percents(tmp_path):
    (tmp_path / "metrics").mkdir()
    ev = {"fd": 2.63, "fd_ci_low": 1.54, "fd_ci_high": 4.49, "floor_fd": 0.616, "precision": 0.972, "recall": 0.755,
          "copy_rate": 0.0, "class_accuracy": 0.774, "val_bpd": 0.1212, "tokenizer_psnr": 21.3, "tokenizer_rfd": 0.413,
          "tokenizer_usage": 0.4902}
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(ev))
    results = [{"stage": "evaluate", "ran": True, "seconds": 12.0}]
    lines = [ln.strip() for ln in summary(tmp_path, results, None, 12.0).splitlines()]
    numbers = lines[lines.index("evaluate   ran         12.0 s") + 2:]
    assert numbers[0] == "FD 2.63 [1.54, 4.49] against a floor of 0.616 (4.3× the floor; lower is better)"
    assert numbers[1] == "precision 97.2% | recall 75.5% | copies 0.0% | class acc 77.4% | val bits/dim 0.1212"
    assert numbers[2] == "tokenizer: PSNR 21.30 dB | rFD 0.413 | codebook usage 49.0%"
