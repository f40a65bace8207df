"""References to the repository's own documents and files resolve: no stale paths in code, comments or docs.

Every tracked text file (``git ls-files``: .py .md .cpp .h .cu .cuh .toml .yaml .yml .cfg and Makefiles) is read
line by line, and four kinds of reference are checked:

* the old name of the design document (the shared note, ``DESIGN`` + ``.md``, or "DESIGN section", "DESIGN §"):
  it now lives in the repository as docs/design.md, so any such mention is a failure
  (``PENDING_OLD_NAME`` lists files whose owners have yet to change theirs; none today);
* ``docs/<name>.md``: the file must exist under the repository's docs/;
* a repository path such as ``minillm_fast/distill/methods/okd.py`` or ``distill/okd.py`` (a path of two or more
  components, the first one a directory name of the repository, ending in a source or data extension): some tracked
  file must be that path or end with it, so short forms relative to a package (``distill/ppo.py``,
  ``methods/lm.py``) count, and a path that a move left behind does not;
* in .md files, markdown links and images ``[text](target)`` and reference definitions ``[id]: target``: a relative
  target must exist (relative to the .md file); ``http(s):``/``mailto:`` targets are skipped; an anchor
  (``file.md#section`` or ``#section``) must be one of the target file's headings under GitHub's slug rule (lower
  case, punctuation other than ``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` ... for repeats) or an
  explicit ``id=``/``name=`` anchor. Fenced code blocks and inline code spans are not links.

The checker is a plain function of a directory and a file list, so ``test_checker_reports_planted_breakage`` runs it
on a temporary tree with known breakage and asserts that each is reported (and nothing else): the test can fail.
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Iterable, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXT_SUFFIXES = (".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".toml", ".yaml", ".yml", ".cfg")
TEXT_NAMES = ("Makefile",)

# Files allowed to spell the design document's old name: none (the checker takes a set so the planted-breakage test can
# exercise an exemption).
OLD_NAME_ALLOWED = frozenset()
# Files whose owners have yet to replace the old name (they were out of bounds for the change that moved the
# citations to docs/design.md). Remove an entry once its file cites docs/design.md: a test fails while a listed
# file no longer needs it, so the list cannot go stale silently.
PENDING_OLD_NAME = frozenset()

# Path-like strings that are not references to this repository's files.
NOT_REFERENCES = frozenset({
    "tests/x.py",  # a made-up pytest node id in tests/test_gpu_check.py's sample pytest log
    "demo/data/pretrain.txt",  # a file that minillm_fast/demo/__init__.py's usage example writes
})

# Concatenated so that this file does not itself spell the old name.
_OLD = "DESIGN"
OLD_NAME = re.compile(_OLD + r"(?:\.md\b| section\b| §)")
DOCS_REF = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)\b")
PATH_REF = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|cpp|h|cu|cuh|toml|yaml|yml|cfg|json|csv|txt|sh))"
                      r"(?![\w/-])")
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
MD_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
ATX = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*?(?:name|id)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def is_text(path: str) -> bool:
    return path.endswith(TEXT_SUFFIXES) or os.path.basename(path) in TEXT_NAMES


def tracked_paths(root: str) -> Optional[list[str]]:
    """Every tracked path (any kind of file), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in out.decode("utf-8").split("\0") if p]


def walk_paths(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    return out


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link is its text
    text = re.sub(r"<[^>]*>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_lines(text: str) -> list[Optional[str]]:
    """The lines of a markdown file with inline code removed; None for the lines of fenced code blocks."""
    out: list[Optional[str]] = []
    fence = None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            out.append(None)
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and line.strip() == m.group(1):
                fence = None
            out.append(None)
        else:
            out.append(CODE_SPAN.sub("", line))
    return out


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a markdown file: its headings' slugs (repeats numbered) and explicit ids."""
    seen: dict[str, int] = {}
    out = set()
    lines = markdown_lines(text)
    raw = text.split("\n")
    for i, line in enumerate(lines):
        if line is None:
            continue
        heading = None
        m = ATX.match(raw[i])
        if m:
            heading = m.group(1) or ""
        elif (i + 1 < len(lines) and lines[i + 1] is not None and SETEXT.match(raw[i + 1]) and line.strip()
              and not ATX.match(raw[i]) and not line.lstrip().startswith(("|", "-", "*", ">"))):
            heading = line.strip()
        if heading is not None:
            slug = github_slug(heading)
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(a for a in HTML_ANCHOR.findall(raw[i]))
    return out


class Checker:
    def __init__(self, root: str, paths: Iterable[str], *, old_name_allowed: Iterable[str] = OLD_NAME_ALLOWED,
                 not_references: Iterable[str] = NOT_REFERENCES):
        self.root = root
        self.paths = sorted(set(paths))
        self.old_name_allowed = frozenset(old_name_allowed)
        self.not_references = frozenset(not_references)
        self.known = set(self.paths)
        self.dirs = set()
        for p in self.paths:
            parts = p.split("/")
            for k in range(1, len(parts)):
                self.known.add("/".join(parts[k:]))           # every tail: "distill/ppo.py" of a deeper file
                self.dirs.add("/".join(parts[:k]))
        self.dir_names = {d.rsplit("/", 1)[-1] for d in self.dirs}
        self._anchors: dict[str, set[str]] = {}
        self.problems: list[str] = []

    def exists(self, rel: str) -> bool:
        rel = os.path.normpath(rel).replace(os.sep, "/")
        return rel in self.known or rel in self.dirs or os.path.exists(os.path.join(self.root, rel))

    def anchors_of(self, rel: str) -> set[str]:
        if rel not in self._anchors:
            with open(os.path.join(self.root, rel), encoding="utf-8") as f:
                self._anchors[rel] = anchors(f.read())
        return self._anchors[rel]

    def report(self, path: str, lineno: int, what: str) -> None:
        self.problems.append(f"{path}:{lineno}: {what}")

    def run(self) -> list[str]:
        for path in self.paths:
            if is_text(path) and os.path.isfile(os.path.join(self.root, path)):
                with open(os.path.join(self.root, path), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                self.check_text(path, text)
                if path.endswith(".md"):
                    self.check_links(path, text)
        return self.problems

    def check_text(self, path: str, text: str) -> None:
        for lineno, line in enumerate(text.split("\n"), 1):
            if path not in self.old_name_allowed:
                for m in OLD_NAME.finditer(line):
                    self.report(path, lineno, f"cites the design document as {m.group(0)!r}: "
                                              "write docs/design.md section N")
            for m in DOCS_REF.finditer(line):
                if not os.path.isfile(os.path.join(self.root, "docs", m.group(1))):
                    self.report(path, lineno, f"docs/{m.group(1)} does not exist")
            for m in PATH_REF.finditer(line):
                ref = m.group(1)
                if ref.startswith("docs/") or ref in self.not_references:
                    continue
                if ref.split("/", 1)[0] not in self.dir_names:
                    continue                                   # not a path into this repository
                if not (self.exists(ref) or self.exists(os.path.join(os.path.dirname(path), ref))):
                    self.report(path, lineno, f"{ref}: no such file in the repository")

    def check_links(self, path: str, text: str) -> None:
        here = os.path.dirname(path)
        for lineno, line in enumerate(markdown_lines(text), 1):
            if line is None:
                continue
            targets = [m.group(1) for m in MD_LINK.finditer(line)]
            m = MD_REF_DEF.match(line)
            if m:
                targets.append(m.group(1))
            for target in targets:
                if SCHEME.match(target):
                    continue                                   # http(s):, mailto:, ...
                file_part, _, anchor = target.partition("#")
                file_part = file_part.split("?", 1)[0]
                rel = (os.path.normpath(os.path.join(here, file_part)).replace(os.sep, "/") if file_part
                       else path)
                if file_part and (rel.startswith("../") or not self.exists(rel)):
                    self.report(path, lineno, f"link to {target}: {rel} does not exist")
                    continue
                if anchor and rel.endswith(".md") and os.path.isfile(os.path.join(self.root, rel)):
                    if anchor not in self.anchors_of(rel):
                        self.report(path, lineno, f"link to {target}: {rel} has no heading #{anchor}")


def test_repository_references_resolve():
    paths = tracked_paths(ROOT)
    if paths is None:
        pytest.skip("not a git checkout")
    # this file is not checked: its planted-breakage test spells broken references on purpose
    paths = [p for p in paths if p != "tests/test_docs_links.py"]
    problems = Checker(ROOT, paths, old_name_allowed=OLD_NAME_ALLOWED | PENDING_OLD_NAME).run()
    assert not problems, f"{len(problems)} broken reference(s):\n" + "\n".join(problems)


def test_pending_old_name_entries_are_still_needed():
    stale = []
    for path in sorted(PENDING_OLD_NAME):
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full) or not OLD_NAME.search(open(full, encoding="utf-8").read()):
            stale.append(path)
    assert not stale, f"no longer cite the design document's old name; remove from PENDING_OLD_NAME: {stale}"


def _write(root, rel: str, text: str) -> None:
    full = os.path.join(root, rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
        f.write(text)


def test_checker_reports_planted_breakage(tmp_path):
    root = str(tmp_path)
    old = _OLD + ".md"
    _write(root, "README.md", "\n".join([
        f"An exempted file may still say {old} section 4.",                      # 1 allowed here (exempted below)
        "[design](docs/good.md#2-the-second-part) and [dup](docs/good.md#dup-1)",  # 2 fine
        "[gone](docs/nope.md)",                                                  # 3 broken link (+ docs ref)
        "[bad anchor](docs/good.md#no-such-heading)",                            # 4 broken anchor
        "[web](https://example.com/x.md) [mail](mailto:a@b.c) [top](#title)",     # 5 fine
        "```",
        "[in a fence](missing.md)",                                               # 7 code, not a link
        "```",
        "`[inline](missing.md)` and ![img](pkg/logo.png)",                         # 9 broken image only
        "[ref]: pkg/sub/mod.py",                                                  # 10 fine
        "[ref2]: pkg/sub/old.py",                                                 # 11 broken ref definition
        "# Title",
    ]))
    _write(root, "docs/good.md", "# Good\n\n## 2. The second part\n\n## Dup\n\n## Dup\n\n[up](../README.md#title)\n"
                                 "[self](#missing-here)\n")                       # 10 broken same-file anchor
    _write(root, "pkg/sub/mod.py", "\n".join([
        '"""See docs/good.md section 2 and docs/missing.md.',                   # 1 docs/missing.md
        f"Math ({_OLD} section 2), notation as in {old}.",                      # 2 two old-name mentions
        "Lives in pkg/sub/mod.py (also sub/mod.py); moved from sub/old.py.",      # 3 sub/old.py
        'Not ours: other/dir/file.py, tests/x.py::t."""',                         # 4 fine
    ]))
    _write(root, "Makefile", f"# the floor: {_OLD} §4\n")                          # 1 old name
    _write(root, "notes.txt", f"{old} in a file that is not scanned\n")
    problems = Checker(root, walk_paths(root), not_references={"tests/x.py"}, old_name_allowed={"README.md"}).run()
    where = sorted(p.split(": ", 1)[0] for p in problems)
    assert where == sorted([
        "Makefile:1",
        "README.md:3", "README.md:3", "README.md:4", "README.md:9", "README.md:11", "README.md:11",
        "docs/good.md:10",
        "pkg/sub/mod.py:1", "pkg/sub/mod.py:2", "pkg/sub/mod.py:2", "pkg/sub/mod.py:3",
    ]), "\n".join(problems)
    joined = "\n".join(problems)
    for needle in ("docs/nope.md does not exist", "no heading #no-such-heading", "pkg/logo.png does not exist",
                   "docs/missing.md does not exist", "sub/old.py: no such file", "no heading #missing-here",
                   "write docs/design.md section N"):
        assert needle in joined, needle


def test_github_slug():
    assert github_slug("4. The performance model") == "4-the-performance-model"
    assert github_slug("3.4 The reference implementation's defaults that the config follows") == \
        "34-the-reference-implementations-defaults-that-the-config-follows"
    assert github_slug("OKD: online knowledge distillation") == "okd-online-knowledge-distillation"
    assert github_slug("`bench/`: the [micro](x.md) benchmarks") == "bench-the-micro-benchmarks"
    assert github_slug("KL(p ‖ q) and  two spaces") == "klp--q-and--two-spaces"
