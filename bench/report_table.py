"""The one table printer the benchmarks share: plain fixed-width columns, or Markdown for cards."""
from __future__ import annotations


def format_table(head: list[str], lines: list[list[str]], markdown: bool = False) -> str:
    """Header and rows of already formatted cells -> the table as one string."""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(ln) + " |" for ln in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(ln, widths)) for ln in lines]
    return "\n".join(out)
