"""Build a third development set from a registry package: OpenMoji's colour emoji, rasterised.

OpenMoji (https://openmoji.org, CC BY-SA 4.0) ships 4,495 colour SVGs in its npm package with a
table of their Unicode groups. This fetches the package with ``npm pack`` (the npm registry is
the only network it needs; or give ``--tarball``), keeps one drawing per emoji (skin-tone
variants left out: they are the same drawing recoloured) in the groups with at least
``--min-per-class`` drawings, rasterises each on white at ``--size``² with cairosvg, and writes
one Parquet source the pipeline reads as ``data.source: parquet``::

    pip install cairosvg            # needs the system's libcairo
    python scripts/build_openmoji.py --out data/openmoji      # -> data/openmoji/openmoji.parquet

Columns: ``image`` (PNG bytes), ``label`` (the group, e.g. ``animals-nature``), ``hexcode`` and
``annotation``. The same package version and size give the same bytes.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "17.0.0"


def fetch(version: str, into: Path) -> Path:
    out = subprocess.run(["npm", "pack", f"openmoji@{version}", "--silent", "--pack-destination", str(into)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"npm pack openmoji@{version} failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return into / out.stdout.strip().splitlines()[-1]


def build(tarball: Path, out_dir: Path, size: int, min_per_class: int) -> Path:
    import cairosvg
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    with tarfile.open(tarball) as tar:
        table = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("package/data/openmoji.csv"), "utf-8")))
        rows = [r for r in table if not r["skintone"] and r["group"] not in ("component", "")]
        counts = collections.Counter(r["group"] for r in rows)
        keep = sorted(g for g, n in counts.items() if n >= min_per_class)
        images, labels, hexcodes, notes = [], [], [], []
        skipped, unrendered = 0, []
        for r in sorted((r for r in rows if r["group"] in keep), key=lambda r: r["hexcode"]):
            member = f"package/color/svg/{r['hexcode']}.svg"
            try:
                svg = tar.extractfile(member).read()
            except KeyError:
                skipped += 1
                continue
            try:
                png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
            except Exception as e:  # noqa: BLE001 - a drawing cairosvg cannot render is left out and counted
                unrendered.append(f"{r['hexcode']} ({type(e).__name__})")
                continue
            rgba = Image.open(io.BytesIO(png)).convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            buf = io.BytesIO()
            flat.save(buf, format="PNG", optimize=True)
            images.append(buf.getvalue())
            labels.append(r["group"])
            hexcodes.append(r["hexcode"])
            notes.append(r["annotation"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "openmoji.parquet"
    tbl = pa.table({"image": pa.array(images, pa.binary()), "label": labels, "hexcode": hexcodes, "annotation": notes})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(tbl, tmp, row_group_size=1024)
    tmp.replace(path)
    per = collections.Counter(labels)
    print(f"{path}: {len(images)} images at {size}x{size}, {len(per)} classes"
          + (f", {skipped} listed without a drawing" if skipped else "")
          + (f", {len(unrendered)} not rendered: {', '.join(unrendered[:5])}" if unrendered else ""))
    for g in keep:
        print(f"  {g:<18} {per[g]}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/openmoji", help="folder for openmoji.parquet")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--min-per-class", type=int, default=80)
    ap.add_argument("--tarball", help="a downloaded openmoji-*.tgz (default: npm pack openmoji@%s)" % VERSION)
    ap.add_argument("--version", default=VERSION)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(args.tarball) if args.tarball else fetch(args.version, Path(tmp))
        build(tarball, Path(args.out), args.size, args.min_per_class)


if __name__ == "__main__":
    main()
