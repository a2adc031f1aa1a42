"""Build ``.dvc/plots_offline.html``: DVC's plots page with Vega inlined, so it opens offline.

``dvc plots show`` writes a page that loads vega, vega-lite and vega-embed from a CDN (the
``{scripts}`` placeholder of its template). This template has no ``{scripts}``: it carries the
same versions that DVC 3 asks the CDN for, inlined, and ``.dvc/config`` names it
(``plots.html_template``), so plain ``dvc plots show`` and ``make plots`` need no network.

Made once, from the npm packages (BSD-3-Clause; their notices are kept in the page):

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python scripts/offline_plots_template.py vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots_offline.html"
#: the placeholders dvc-render fills by plain text replacement; the inlined code must not hold them
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


def _read(tgz: Path, member: str) -> str:
    with tarfile.open(tgz) as tar:
        return tar.extractfile(f"package/{member}").read().decode("utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vega", type=Path)
    ap.add_argument("vega_lite", type=Path)
    ap.add_argument("vega_embed", type=Path)
    args = ap.parse_args()
    notices, scripts = [], []
    for tgz, js in [(args.vega, "build/vega.min.js"), (args.vega_lite, "build/vega-lite.min.js"),
                    (args.vega_embed, "build/vega-embed.min.js")]:
        code = _read(tgz, js)
        assert not any(p in code for p in PLACEHOLDERS) and "</script" not in code, f"{tgz}: cannot inline {js}"
        notices.append(f"{tgz.name.removesuffix('.tgz')} ({js}):\n{_read(tgz, 'LICENSE').strip()}")
        scripts.append(f"<script>{code}</script>")
    page = "\n".join([
        "<!DOCTYPE html>",
        "<!-- Made by scripts/offline_plots_template.py. Inlined, unmodified:\n\n"
        + "\n\n".join(notices).replace("--", "- -") + "\n-->",
        "<html>",
        "<head>",
        "    {refresh_tag}",
        '    <meta charset="utf-8">',
        "    <title>DVC Plot</title>",
        *scripts,
        "    <style>table { border-spacing: 15px; }</style>",
        "</head>",
        "<body>",
        "    {plot_divs}",
        "</body>",
        "</html>",
        "",
    ])
    OUT.write_text(page, encoding="utf-8")
    print(f"wrote {OUT} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main()
