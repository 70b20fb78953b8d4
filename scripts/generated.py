"""What the generators in scripts/ share: write a generated file, or with
``--check`` fail when the file in the tree is not what would be written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_or_check(out: Path, render, description: str, argv: list[str] | None = None) -> int:
    """The generator's command line. ``render()`` returns the file's text."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{shown} is out of date; run scripts/{Path(sys.argv[0]).name}",
                  file=sys.stderr)
            return 1
        print(f"{shown} is current")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {shown}")
    return 0
