"""Write docs/recipes.md, the recipe reference, from the schema's field docstrings.

Usage:
    .venv/bin/python scripts/gen_recipe_docs.py           # regenerate docs/recipes.md
    .venv/bin/python scripts/gen_recipe_docs.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowtune.recipe.docs import DOCS_PATH, render_recipe_docs

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args(argv)

    target = ROOT / DOCS_PATH
    text = render_recipe_docs()
    current = target.read_text(encoding="utf-8") if target.exists() else None
    if args.check:
        if current != text:
            print(f"{DOCS_PATH} is out of date; run: python scripts/gen_recipe_docs.py", file=sys.stderr)
            return 1
        print(f"{DOCS_PATH} is up to date")
        return 0
    if current == text:
        print(f"{DOCS_PATH} is already up to date")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
