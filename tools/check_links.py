#!/usr/bin/env python3
"""Check that every relative link in the repository's Markdown files resolves.

For each tracked ``*.md`` file, every ``[text](target)`` whose target is not a URL must name an
existing file or folder (relative to the Markdown file), and a ``#fragment`` must match a heading
of the file it points into (GitHub's anchor rules: lower case, punctuation dropped, spaces as
hyphens). Run from anywhere; ``scripts/test`` runs it. Exits non-zero listing every broken link.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def anchors(path: Path) -> set[str]:
    out: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and not in_code:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def links(path: Path):
    in_code = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield n, m.group(1) or m.group(2)


def main() -> int:
    files = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    broken = []
    for name in files:
        md = ROOT / name
        for line, target in links(md):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # a URL (http:, https:, mailto:, ...)
            file_part, _, fragment = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                broken.append(f"{name}:{line}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{name}:{line}: {target} (no such heading)")
    for b in broken:
        print(b)
    print(f"{len(files)} Markdown files checked, {len(broken)} broken links")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
