"""Output helpers shared by commands: ``--output table|json`` and plain aligned tables."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.python import usage


class OutputOption(usage.Options):
    """``--output``; listed before the command's own base (``class ListOptions(OutputOption, Command)``)."""

    optParameters = [["output", "o", "table", "Output format: table or json."]]

    def postOptions(self) -> None:
        if self["output"] not in ("table", "json"):
            raise usage.UsageError(f"invalid value for --output: {self['output']!r} (table or json)")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def ago(iso: str | None, now: datetime | None = None) -> str:
    if not iso:
        return "never"
    then = datetime.fromisoformat(iso)
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    if seconds < 5:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
