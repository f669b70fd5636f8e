"""Every link and every file name the repository's text mentions points to a file that exists.

Two checks over the tracked text files (.py, .md, .ipynb, .toml):

* every relative Markdown link ``[text](target)`` in a .md file or a notebook's
  Markdown cell resolves from the file's folder, and its ``#anchor``, when the
  target is a .md page, is one of that page's headings (GitHub's slugs);
* every path the text mentions, a ``*.md`` or ``*.ipynb`` name, a ``docs/...``
  path or a ``tinymrcnn/...py`` file, exists, from the file's folder or from
  the repository root (with its ``#anchor`` checked as above).

URLs are skipped; so are names that are patterns, not files (``NN_<name>.ipynb``,
``*.md``) and files that code writes at run time, listed in ``GENERATED``. A bare
name without a folder (``torchvision.md``) passes if a file of that name exists
somewhere in the repository.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml"}

# Files that the code writes when it runs (the student handout's README, a
# converted checkpoint's notes, ...), mentioned by name but not in the repository.
GENERATED = {"notebooks/_run/09_ablations_executed.ipynb"}  # docs/ablations.md's command writes it

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s)>\]\"'`]*")
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
# A mentioned path: a .md / .ipynb name (with an optional #anchor), a docs/ path,
# or a tinymrcnn/ .py file. (?<![\w/.<*{-]) keeps the match whole: no tail of a longer
# name, no pattern such as NN_<name>.ipynb or *.md.
MENTION = re.compile(
    r"(?<![\w/.<>*{}$-])"
    r"((?:\.\.?/)*(?:[\w.-]+/)*[\w-][\w.-]*\.(?:md|ipynb)(?:#[\w-]+)?"
    r"|(?:\.\./)*docs/(?:[\w.-]+/)*[\w.-]*[\w/]"
    r"|(?:\.\./)*tinymrcnn/(?:[\w-]+/)*[\w-]+\.py)"
    r"(?![\w<>*{}$-]|/[\w<*{])"
)


def text_files() -> list[Path]:
    """The repository's tracked (and new, not ignored) text files."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        paths = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        paths = [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    return sorted(
        p for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file() and ".git" not in p.relative_to(ROOT).parts
    )


def read_text(path: Path) -> tuple[str, str]:
    """(all text, Markdown text) of a file; for a notebook, its cells' sources."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        cells = json.loads(raw)["cells"]
        src = ["".join(c["source"]) for c in cells]
        md = [s for c, s in zip(cells, src) if c["cell_type"] == "markdown"]
        return "\n".join(src), "\n".join(md)
    return raw, (raw if path.suffix == ".md" else "")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """The anchors of a Markdown page's headings (duplicates get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return frozenset(out)


def resolve(target: str, bases: list[Path]) -> tuple[Path | None, str]:
    """(the existing file or folder ``target`` names from one of ``bases``, its anchor)."""
    path, _, anchor = target.partition("#")
    for base in bases:
        p = (base / path).resolve() if path else None
        if p is not None and p.exists():
            return p, anchor
    return None, anchor


@lru_cache(maxsize=None)
def names_in_repository() -> dict[str, Path]:
    return {p.name: p for p in text_files()}


def check_target(src: Path, target: str, bases: list[Path], bare_names: bool = False) -> str | None:
    """None if ``target`` is fine, else what is wrong with it.

    bare_names: a target without a folder may name a file anywhere in the repository.
    """
    path = target.partition("#")[0]
    if not path:  # "#anchor": this page
        p, anchor = src, target[1:]
    else:
        p, anchor = resolve(target, bases)
        if p is None and bare_names and "/" not in path:
            p = names_in_repository().get(path)
        if p is None:
            return "no such file"
    if anchor and p.suffix == ".md" and anchor not in anchors(p):
        shown = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
        return f"{shown} has no heading with the anchor #{anchor}"
    return None


def problems() -> list[str]:
    out = []
    for f in text_files():
        if f == Path(__file__).resolve():  # its own examples are made up on purpose
            continue
        rel = f.relative_to(ROOT)
        text, md = read_text(f)
        text, md = URL.sub("", text), URL.sub("", md)
        # 1. Markdown links, relative to the file's folder (outside code blocks)
        lines, in_code = [], False
        for line in md.splitlines():
            if FENCE.match(line):
                in_code = not in_code
            elif not in_code:
                lines.append(re.sub(r"`[^`]*`", "", line))
        for target in MD_LINK.findall("\n".join(lines)):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # mailto: and the like
                continue
            why = check_target(f, target, [f.parent])
            if why:
                out.append(f"{rel}: link ({target}): {why}")
        # 2. paths mentioned anywhere in the text (Markdown links were checked above)
        if f.suffix in (".md", ".ipynb"):
            text = MD_LINK.sub("", text)
        for target in MENTION.findall(text):
            if target.partition("#")[0] in GENERATED:
                continue
            why = check_target(f, target, [f.parent, ROOT], bare_names=True)
            if why:
                out.append(f"{rel}: mentions {target}: {why}")
    return sorted(set(out))


def test_every_link_and_mentioned_file_exists():
    bad = problems()
    assert not bad, "broken references:\n  " + "\n  ".join(bad)


def test_the_checker_finds_what_it_should(tmp_path):
    """The parts of the checker on a page made up here: slugs, anchors, mentions."""
    assert slug("5. RoIAlign") == "5-roialign"
    assert slug("RoI pooling versus RoIAlign: the worked example") == "roi-pooling-versus-roialign-the-worked-example"
    assert slug("The paper's ablations") == "the-papers-ablations"
    assert slug("`roi_align` and [links](x.md)") == "roi_align-and-links"
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Step\n## Step\n```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"title", "step", "step-1"}
    assert check_target(page, "#step-1", [tmp_path]) is None
    assert "no heading" in check_target(page, "page.md#not-a-heading", [tmp_path])
    assert check_target(page, "missing.md", [tmp_path]) == "no such file"
    found = MENTION.findall(
        URL.sub(
            "",
            "see docs/walkthrough.md#5-roialign, tinymrcnn/ops/nms.py and "
            "NN_<name>.ipynb, *.md, https://x.org/a.md and ../docs/index.md.",
        )
    )
    assert found == ["docs/walkthrough.md#5-roialign", "tinymrcnn/ops/nms.py", "../docs/index.md"]
    assert MD_LINK.findall('a [b](c.md#d) and ![img](images/x.png "t")') == ["c.md#d", "images/x.png"]


@pytest.mark.parametrize("name", ["walkthrough.md", "semantics.md"])
def test_the_reference_pages_exist(name):
    assert (ROOT / "docs" / name).is_file()
