"""Stage ``source`` (DVC only; always run): ``data/source.json``, the listing of ``data.path``
that ``prepare`` depends on instead of the raw files (see :mod:`arvision.data.listing`).
``arvision run`` writes the same file itself before the flow, so it is not one of the flow's
stages; ``dvc repro`` runs it first."""

from __future__ import annotations

import sys
from pathlib import Path

from arvision.config import load_params
from arvision.data.listing import write_listing
from arvision.errors import UserError


def describe(listing: dict) -> str:
    """One line: how many files, how large, what was skipped."""
    line = f"source: {listing['files']} files, {listing['bytes'] / 2**20:.1f} MiB"
    if listing["skipped_count"]:
        named = ", ".join(f"{p} ({why})" for p, why in listing["skipped"][:5])
        line += f"; skipped {listing['skipped_count']}: {named}"
    return line


def main() -> None:
    root = Path.cwd()
    try:
        params = load_params(root / "params.yaml")
        print(describe(write_listing(root, params.data.source, params.data.path)))
    except UserError as err:
        print(f"error: source: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
