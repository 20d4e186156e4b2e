"""The machine a benchmark ran on, and writing the dated sections in docs/."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """CPU model, core count and memory, e.g. 'Intel(R) Xeon(R) Processor, 2 cores, 24 GiB'."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def write_section(doc: Path, title: str, text: str) -> None:
    """Put `text` in place of the section of `doc` whose heading starts with `title` (up to the
    next '## ' heading), or append it."""
    body = doc.read_text() if doc.exists() else ""
    start = body.find(title)
    if start >= 0:
        end = body.find("\n## ", start + len(title))
        rest = body[end + 1:] if end >= 0 else ""
        body = body[:start] + (text.rstrip("\n") + "\n\n" + rest if rest else text)
    else:
        body = body.rstrip() + "\n\n" + text
    doc.write_text(body)
