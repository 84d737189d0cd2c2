"""README's figures, taken from the committed results files.

README marks each place a result goes:

    <!-- results ops/bench/results/routing.md "Routing modes side by side" -->
    ...generated...
    <!-- /results -->

and this script fills it with that section of that file (a section runs from its heading to the
next heading of the same or a higher level; ``"*"`` takes the whole report but its title and its
Command and Commit lines), opened
by a line naming the file, the command that made it and its commit. A unit test checks that
README holds what this script would write, so a figure can only change with its results file.

    python ops/bench/readme.py            # rewrite README.md's result blocks
    python ops/bench/readme.py --check    # exit 1 when they differ from the results files
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r'(<!-- results (\S+) "([^"]+)" -->\n)(.*?)(<!-- /results -->)', re.DOTALL)
HEADING = re.compile(r"^(#+) (.*)$")


def section(text: str, title: str) -> str:
    """The body of the section headed ``title`` (``*``: everything after the report's title)."""
    lines = text.splitlines()
    if title == "*":
        start = next(i for i, line in enumerate(lines) if line.startswith("# ")) + 1
        # The block's first line names the command and the commit already.
        body = [line for line in lines[start:] if not re.match(r"(Command|Commit): `", line)]
    else:
        found = [i for i, line in enumerate(lines) if HEADING.match(line) and HEADING.match(line).group(2) == title]
        if not found:
            raise KeyError(f"no section '{title}'")
        level = len(HEADING.match(lines[found[0]]).group(1))
        body = []
        for line in lines[found[0] + 1:]:
            m = HEADING.match(line)
            if m and len(m.group(1)) <= level:
                break
            body.append(line)
    return "\n".join(body).strip("\n")


def provenance(text: str) -> str:
    """The results file's Command and Commit lines, as one sentence."""
    command = re.search(r"^Command: `([^`]+)`", text, re.MULTILINE)
    commit = re.search(r"^Commit: `([^`]+)`", text, re.MULTILINE)
    return (f"`{command.group(1)}`" if command else "command not recorded") + \
        (f", commit `{commit.group(1)}`" if commit else ", commit not recorded")


def render(readme: str, root: Path = ROOT) -> str:
    """README with every result block filled from its results file."""
    def fill(m: re.Match) -> str:
        path, title = m.group(2), m.group(3)
        text = (root / path).read_text()
        body = section(text, title)
        # Headings inside a block would break README's outline: they become bold lines.
        body = "\n".join(f"**{HEADING.match(line).group(2)}**" if HEADING.match(line) else line
                         for line in body.splitlines())
        return f"{m.group(1)}*From [`{path}`]({path}): {provenance(text)}.*\n\n{body}\n{m.group(5)}"

    return BLOCK.sub(fill, readme)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    path = ROOT / "README.md"
    current = path.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's result blocks differ from the results files: run python ops/bench/readme.py")
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
