#!/usr/bin/env python
"""Render the embedded emoji data set: ``arvision/data/emoji/emoji.parquet``.

Every ``fully-qualified`` emoji of Unicode's ``emoji-test.txt`` is drawn with the Noto Color
Emoji font, composited on white, cropped to the glyph, padded to a square, resized to 32×32
RGB and labelled with its Unicode group (the "Component" group, skin-tone and hair swatches,
is left out). Sequences the font does not draw as one glyph are dropped, and so are images
whose pixels equal an earlier one's. The pipeline never needs the font: it reads the Parquet.

Needs (Debian): ``apt-get install fonts-noto-color-emoji unicode-data`` and a Pillow built
with raqm (``PIL.features.check('raqm')``; Debian's ``libraqm0`` provides it).

    python scripts/make_emoji.py [--out arvision/data/emoji/emoji.parquet] [--side 32]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont, features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from arvision.data.parquet_io import write_table  # noqa: E402  (the project's one Parquet writer)

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_SIZE = 109  # the only size the font's CBDT bitmaps come in
SIDE = 32  # output resolution, pixels
SKIP_GROUPS = {"Component"}
CANVAS = (4 * 136, 160)  # one glyph advances 136 px at size 109; room for a few


def parse_emoji_test(path: str) -> tuple[list[str], list[tuple[str, str, int]]]:
    """``emoji-test.txt`` → (group names, [(codepoints, name, group index)]) for fully-qualified lines."""
    groups: list[str] = []
    rows: list[tuple[str, str, int]] = []
    group = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            if group not in SKIP_GROUPS:
                groups.append(group)
            continue
        if not line.strip() or line.startswith("#"):
            continue
        cps, rest = line.split(";", 1)
        status, comment = rest.split("#", 1)
        if status.strip() != "fully-qualified" or group in SKIP_GROUPS:
            continue
        # comment: "😀 E1.0 grinning face": glyph, emoji version, CLDR short name
        name = comment.strip().split(" ", 2)[2]
        rows.append((" ".join(cps.split()), name, len(groups) - 1))
    return groups, rows


def render(text: str, font: ImageFont.FreeTypeFont, side_px: int = SIDE) -> Image.Image | None:
    """One emoji → ``side_px``² RGB on white; None when the font does not draw it as one glyph."""
    single = font.getlength("\U0001F600")  # advance of one glyph
    if font.getlength(text) > 1.5 * single:  # shaped into several glyphs: not one emoji image
        return None
    canvas = Image.new("RGBA", CANVAS, (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((16, 16), text, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:  # nothing drawn
        return None
    glyph = Image.alpha_composite(Image.new("RGBA", canvas.size, (255, 255, 255, 255)), canvas)
    glyph = glyph.convert("RGB").crop(bbox)
    w, h = glyph.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - w) // 2, (side - h) // 2))
    return square.resize((side_px, side_px), Image.Resampling.LANCZOS, reducing_gap=None)


def png_bytes(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":  # lossless, about 3/4 of the PNG's size at 64x64
        img.save(buf, format="WEBP", lossless=True, method=6)
    else:
        img.save(buf, format="PNG", optimize=True)  # no metadata chunks; deterministic for a given zlib
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "arvision/data/emoji/emoji.parquet"))
    ap.add_argument("--font", default=FONT)
    ap.add_argument("--emoji-test", default=EMOJI_TEST)
    ap.add_argument("--side", type=int, default=SIDE,
                    help="output resolution (the shipped set: 32; `--side 64 --out data/emoji64/emoji.parquet` for 64x64)")
    ap.add_argument("--format", choices=("png", "webp"), default="png", help="image bytes: PNG, or lossless WebP (smaller)")
    args = ap.parse_args()
    for path, pkg in ((args.font, "fonts-noto-color-emoji"), (args.emoji_test, "unicode-data")):
        if not Path(path).exists():
            sys.exit(f"{path} not found: apt-get install {pkg}")
    if not features.check("raqm"):
        sys.exit("Pillow has no raqm layout (emoji sequences need it): apt-get install libraqm0")

    groups, rows = parse_emoji_test(args.emoji_test)
    font = ImageFont.truetype(args.font, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    seen: set[str] = set()
    out = {"image": [], "label": [], "name": [], "codepoints": []}
    dropped_shape = dropped_dup = 0
    # rows stay in emoji-test.txt order (Unicode's own, grouped): deterministic
    for cps, name, label in rows:
        img = render("".join(chr(int(c, 16)) for c in cps.split()), font, args.side)
        if img is None:
            dropped_shape += 1
            continue
        key = hashlib.sha256(img.tobytes()).hexdigest()
        if key in seen:
            dropped_dup += 1
            continue
        seen.add(key)
        out["image"].append(png_bytes(img, args.format))
        out["label"].append(label)
        out["name"].append(name)
        out["codepoints"].append(cps)

    meta = {
        "arvision.class_names": json.dumps(groups),
        "arvision.source": "Noto Color Emoji (Apache-2.0), rendered by scripts/make_emoji.py",
        "arvision.resolution": str(args.side),
    }
    schema = pa.schema(
        [("image", pa.binary()), ("label", pa.int32()), ("name", pa.string()), ("codepoints", pa.string())],
        metadata=meta,
    )
    table = pa.Table.from_pydict(out, schema=schema)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_table(table, args.out)
    counts = np.bincount(out["label"], minlength=len(groups))
    print(f"{len(rows)} fully-qualified emoji, {dropped_shape} not one glyph, {dropped_dup} duplicate images")
    print(f"wrote {table.num_rows} images to {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")
    for g, c in zip(groups, counts):
        print(f"  {c:5d}  {g}")


if __name__ == "__main__":
    main()
