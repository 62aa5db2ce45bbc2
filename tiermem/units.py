"""Human units: sizes (``512MiB``), durations (``30s``), percentages and rates.

Every parser raises ``InvalidArgument`` with a one-line message on bad input, so
the CLI can print it as is.
"""

from __future__ import annotations

import math
import re

from tiermem.errors import InvalidArgument
from tiermem.model import PAGE_SIZE, EvictionCap

__all__ = [
    "format_bytes",
    "format_duration_ms",
    "format_rate_per_min",
    "parse_duration_ms",
    "parse_eviction_cap",
    "parse_memory",
    "parse_percent",
    "parse_rate_per_min",
    "parse_size",
]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0, "h": 3_600_000.0}
_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_MAX_BYTES = 2**62


def parse_size(text: str) -> int:
    """Parse ``512MiB``, ``1G`` (decimal) or ``4096`` into bytes.

    ``G``/``GB`` are decimal; ``Gi``/``GiB`` are binary. Bare ``1G`` in the
    operator sense of "1 gibibyte" is written ``1GiB``; the VMM's ``--memory 1G``
    follows the QEMU convention and uses ``parse_memory``.
    """
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", text.strip())
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise InvalidArgument(f"invalid size {text!r}: use e.g. 4096, 512MiB, 1GiB, 2GB")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value > _MAX_BYTES:
        raise InvalidArgument(f"size {text!r} is too large")
    return int(value)


def parse_memory(text: str) -> int:
    """Parse a VM memory size QEMU-style: ``256M``, ``1G`` are binary units."""
    m = re.fullmatch(_NUM + r"\s*([kKmMgGtT]?)(i?[bB]?)", text.strip())
    if not m:
        raise InvalidArgument(f"invalid memory size {text!r}: use e.g. 256M, 1G")
    unit = m.group(2).lower()
    if m.group(3).lower().startswith("i") and not unit:
        raise InvalidArgument(f"invalid memory size {text!r}: use e.g. 256M, 1G")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]
    value = float(m.group(1)) * mult
    if value > _MAX_BYTES:
        raise InvalidArgument(f"memory size {text!r} is too large")
    return int(value)


def parse_duration_ms(text: str) -> int:
    """Parse ``30s``, ``500ms``, ``2m``, ``1h`` or a bare number of seconds into milliseconds."""
    m = re.fullmatch(_NUM + r"\s*(ms|s|m|min|h)?", text.strip())
    if not m:
        raise InvalidArgument(f"invalid duration {text!r}: use e.g. 500ms, 30s, 2m, 1h")
    ms = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    if ms > 2**53:
        raise InvalidArgument(f"duration {text!r} is too large")
    return round(ms)


def parse_percent(text: str) -> float:
    """Parse ``20%`` or ``0.2`` into a fraction in [0, 1]."""
    t = text.strip()
    m = re.fullmatch(_NUM + r"\s*(%?)", t)
    if not m:
        raise InvalidArgument(f"invalid fraction {text!r}: use e.g. 20% or 0.2")
    value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"fraction {text!r} must be between 0% and 100%")
    return value


def parse_rate_per_min(text: str) -> float:
    """Parse a promotion-rate SLO such as ``0.2%/min``, ``0.5%/s`` or ``0.002`` into a per-minute fraction."""
    t = text.strip().replace(" ", "")
    m = re.fullmatch(_NUM + r"(%?)(?:/(s|sec|min|m|h|hour))?", t)
    if not m:
        raise InvalidArgument(f"invalid rate {text!r}: use e.g. 0.2%/min")
    value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    per = {"s": 60.0, "sec": 60.0, "min": 1.0, "m": 1.0, "h": 1 / 60, "hour": 1 / 60, None: 1.0}[m.group(3)]
    value *= per
    if not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"rate {text!r} must be between 0 and 100%/min")
    return value


def parse_eviction_cap(text: str) -> EvictionCap:
    """Parse a per-cycle eviction cap: ``20%`` (of the VM), ``512MiB``, ``1000pages`` or ``none``.

    A bare number is refused: ``20`` could mean pages, bytes or percent.
    """
    t = text.strip().lower()
    hint = "use e.g. 20%, 512MiB, 1000pages or none"
    if t in ("none", "unlimited", "off"):
        return EvictionCap()
    if t.endswith("%"):
        return EvictionCap(fraction=parse_percent(t))
    m = re.fullmatch(r"([0-9]+)\s*(pages?|p)", t)
    if m:
        pages = int(m.group(1))
        if pages * PAGE_SIZE > _MAX_BYTES:
            raise InvalidArgument(f"eviction cap {text!r} is too large")
        return EvictionCap(pages=pages)
    if re.fullmatch(_NUM + r"\s*", t):
        raise InvalidArgument(f"eviction cap {text!r} needs a unit: {hint}")
    try:
        return EvictionCap(bytes=parse_size(t))
    except InvalidArgument:
        raise InvalidArgument(f"invalid eviction cap {text!r}: {hint}") from None


def format_duration_ms(ms: float) -> str:
    """Format milliseconds compactly: ``500ms``, ``30s``, ``1.5s``, ``2m``, ``1h30m``."""
    if ms < 1000:
        return f"{ms:.0f}ms"
    if ms < 60_000:
        s = ms / 1000
        return f"{s:.0f}s" if s == int(s) else f"{s:.3g}s"
    if ms < 3_600_000:
        m, s = divmod(round(ms / 1000), 60)
        return f"{m}m{s}s" if s else f"{m}m"
    h, m = divmod(round(ms / 60_000), 60)
    return f"{h}h{m}m" if m else f"{h}h"


def format_rate_per_min(rate: float) -> str:
    """Format a per-minute fraction as a percentage: ``0.002`` -> ``0.2%/min``."""
    return f"{rate * 100:.3g}%/min"


def format_bytes(n: float) -> str:
    """Format a byte count with a binary unit, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
