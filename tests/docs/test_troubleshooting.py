"""docs/troubleshooting.md stays in step with the library's real error messages.

Markup the page follows: every entry is a `### ` heading whose block holds exactly one line starting with
`**Message:**`, then a `**Cause:**` and a `**Fix:**` paragraph. The code spans (single backticks) on the Message
line are literal fragments of the message; each must occur word for word in some .py file under jaxpeft/, so a
reworded message in the code makes this test fail until the page follows. Standard library only.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "troubleshooting.md"
SOURCE_DIR = ROOT / "jaxpeft"
MIN_ENTRIES = 30
MIN_FRAGMENT_CHARS = 8  # shorter fragments ("is empty") would match almost anything

MESSAGE_PREFIX = "**Message:**"
CODE_SPAN = re.compile(r"`([^`]+)`")


def _entries() -> list[tuple[str, list[str]]]:
    """[(heading, lines of its block)] for every `### ` entry of the page, in order."""
    entries: list[tuple[str, list[str]]] = []
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            entries.append((line[4:].strip(), []))
        elif line.startswith("## ") or line.startswith("# "):
            if entries:
                entries.append(("", []))  # a new section ends the previous entry's block
        elif entries:
            entries[-1][1].append(line)
    return [(h, body) for h, body in entries if h]


def _message_lines(body: list[str]) -> list[str]:
    return [line for line in body if line.startswith(MESSAGE_PREFIX)]


def _fragments() -> list[tuple[str, str]]:
    """[(entry heading, quoted fragment)] from every Message line of the page."""
    out = []
    for heading, body in _entries():
        for line in _message_lines(body):
            out.extend((heading, frag) for frag in CODE_SPAN.findall(line[len(MESSAGE_PREFIX):]))
    return out


def _library_source() -> str:
    files = sorted(SOURCE_DIR.rglob("*.py"))
    assert files, f"no .py files under {SOURCE_DIR}"
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def test_page_has_at_least_30_entries():
    entries = _entries()
    assert len(entries) >= MIN_ENTRIES, f"{PAGE.name} has {len(entries)} entries, expected >= {MIN_ENTRIES}"


def test_every_entry_has_one_message_line_with_a_fragment_and_a_cause_and_a_fix():
    problems = []
    for heading, body in _entries():
        messages = _message_lines(body)
        if len(messages) != 1:
            problems.append(f"{heading!r}: {len(messages)} '{MESSAGE_PREFIX}' lines, expected 1")
        elif not CODE_SPAN.findall(messages[0][len(MESSAGE_PREFIX):]):
            problems.append(f"{heading!r}: the Message line quotes no fragment in backticks")
        for label in ("**Cause:**", "**Fix:**"):
            if not any(line.startswith(label) for line in body):
                problems.append(f"{heading!r}: no {label} paragraph")
    assert not problems, "\n".join(problems)


def test_message_fragments_are_long_enough_to_be_distinctive():
    short = [(h, f) for h, f in _fragments() if len(f.strip()) < MIN_FRAGMENT_CHARS]
    assert not short, f"fragments shorter than {MIN_FRAGMENT_CHARS} characters: {short}"


def test_every_message_fragment_occurs_verbatim_in_the_library_source():
    fragments = _fragments()
    assert fragments, f"no Message fragments found in {PAGE}"
    source = _library_source()
    missing = [(h, f) for h, f in fragments if f not in source]
    assert not missing, ("fragments quoted in docs/troubleshooting.md that no .py file under jaxpeft/ contains "
                         "(the message changed: update the page):\n"
                         + "\n".join(f"  {h}: {f!r}" for h, f in missing))
