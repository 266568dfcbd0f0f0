"""Tagging schemes (IOB1, IOB2, BIOES; BILOU read as BIOES): parsing tags, guessing a file's
scheme, checking one sentence against it and converting it to the tags the model learns
(IOB1 -> IOB2, U-/L- -> S-/E-). The files themselves are read in data/tagging.py."""
from __future__ import annotations

import re

SCHEMES = ("auto", "IOB1", "IOB2", "BIOES")
PREFIXES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}
TAG_RE = re.compile(r"([BIESUL])-(\S+)")


def parse_tag(tag: str) -> tuple[str, str] | None:
    """'B-PER' -> ('B', 'PER'), 'O' -> ('O', ''); None when `tag` does not look like a tag."""
    if tag == "O":
        return "O", ""
    match = TAG_RE.fullmatch(tag)
    return (match.group(1), match.group(2)) if match else None


def entity_types(labels: list[str]) -> list[str]:
    return sorted({parse_tag(t)[1] for t in labels if t != "O"})


def detect_scheme(tag_lists) -> str:
    """BIOES when E-/S- (or BILOU's L-/U-) tags occur; IOB1 when more entities start with I-
    than with B- (IOB1 uses B- only between two adjacent entities of one type); else IOB2."""
    starts_i = starts_b = 0
    for tags in tag_lists:
        prev = ("O", "")
        for tag in tags:
            parsed = parse_tag(tag) or ("O", "")
            if parsed[0] in "ESUL":
                return "BIOES"
            starts_b += parsed[0] == "B"
            starts_i += parsed[0] == "I" and not (prev[0] in "BI" and prev[1] == parsed[1])
            prev = parsed
    return "IOB1" if starts_i > starts_b else "IOB2"


def scheme_tag(tag: str, scheme: str) -> tuple[str, str] | str:
    """(prefix, type) of `tag` in `scheme` (BILOU's U-/L- read as S-/E- in BIOES), or the
    reason it is not one of the scheme's tags."""
    p = parse_tag(tag)
    if p is None:
        return f"not a tag '{tag}' (tags look like O, B-X, I-X, E-X or S-X)"
    prefix = {"U": "S", "L": "E"}.get(p[0], p[0]) if scheme == "BIOES" else p[0]
    if prefix != "O" and prefix not in PREFIXES[scheme]:
        allowed = ", ".join(["O"] + [f"{x}-X" for x in PREFIXES[scheme]])
        return f"tag not of the scheme '{tag}' ({scheme} has {allowed}; set task.scheme)"
    return prefix, p[1]


def to_scheme(tags: list[str], scheme: str) -> tuple[list[str], tuple[int, str] | None]:
    """Check one sentence's tags against `scheme` and convert them (IOB1 -> IOB2, U-/L- ->
    S-/E-). Returns (converted tags, None), or (tags, (position, reason)) when they break it."""
    parsed = []
    for i, tag in enumerate(tags):
        p = scheme_tag(tag, scheme)
        if isinstance(p, str):
            return tags, (i, p)
        parsed.append(p)
    out = []
    for i, (prefix, kind) in enumerate(parsed):
        prev = parsed[i - 1] if i else ("O", "")
        inside = prev[0] in "BI" and prev[1] == kind
        if prefix == "I" and not inside and scheme == "IOB1":
            prefix = "B"  # an IOB1 entity starts with I- unless it touches one of its type
        elif prefix in ("I", "E") and not inside and scheme != "IOB1":
            before = tags[i - 1] if i else "(sentence start)"
            return tags, (i, f"invalid sequence '{before} {tags[i]}' ({scheme}: {tags[i]} must "
                             f"follow B-{kind} or I-{kind})")
        if prefix in ("B", "I") and scheme == "BIOES":
            nxt = parsed[i + 1] if i + 1 < len(parsed) else ("O", "")
            if not (nxt[0] in "IE" and nxt[1] == kind):
                after = tags[i + 1] if i + 1 < len(tags) else "(sentence end)"
                return tags, (i, f"invalid sequence '{tags[i]} {after}' (BIOES: {tags[i]} must "
                                 f"be followed by I-{kind} or E-{kind})")
        out.append("O" if prefix == "O" else f"{prefix}-{kind}")
    return out, None


def complete_tags(types: list[str], scheme: str) -> list[str]:
    """Every tag of `types` in `scheme`, O first: a type seen only in one-word entities in
    training still gets its I- tag, so a validation sentence using it is not dropped."""
    return ["O"] + sorted(f"{p}-{t}" for t in types for p in PREFIXES[scheme])
