"""The promotion-rate SLO controller.

Promotion rate = faults on evicted pages per evicted page per minute (Google's
far-memory SLO is 0.2%/min), measured from the VMs' reported statuses over a
sliding window. Once per window and VM with an SLO:

* above the SLO: back off one level (cold_after ×2, any cap ÷2; see
  ``policies.apply_adjustment``), up to ``max_level``;
* below ``tighten_fraction`` of the SLO for ``tighten_windows`` windows in a
  row: tighten one level, back towards the operator's policy and never past it.

The controller only decides; the scheduler persists each decision as an
:class:`Adjustment` (a new policy version and a POLICY_ADJUSTED event).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tiermem.model import VmStatus

__all__ = ["SloConfig", "SloController", "SloDecision"]


@dataclass(frozen=True)
class SloConfig:
    """Controller parameters."""

    window_ms: int = 60_000
    """Length of the measurement window; a VM is evaluated once per window."""
    tighten_fraction: float = 0.25
    """A window below this fraction of the SLO counts as "far below"."""
    tighten_windows: int = 3
    """Consecutive far-below windows before tightening one level."""
    max_level: int = 5
    """Most back-off levels (cold_after ×32 at most)."""
    min_evicted_pages: int = 16
    """Windows with fewer evicted pages on average carry too little signal to back off."""


@dataclass(frozen=True)
class SloDecision:
    """A level change for one VM and why."""

    vm_id: str
    level: int
    previous: int
    rate: float
    slo: float
    reason: str


@dataclass
class _Track:
    samples: deque[tuple[int, int, int]] = field(default_factory=deque)  # (ms, faults, evicted)
    last_eval_ms: int = 0
    low_windows: int = 0
    rate: float | None = None


class SloController:
    """Samples statuses, measures promotion rates, decides back-off and tightening."""

    def __init__(self, config: SloConfig | None = None) -> None:
        self.config = config or SloConfig()
        self._tracks: dict[str, _Track] = {}

    def observe(self, status: VmStatus, now_ms: int) -> None:
        """Take one status sample (repeated or older samples are ignored)."""
        t = status.updated_unix_ms or now_ms
        tr = self._tracks.setdefault(status.vm_id, _Track())
        if tr.samples and t <= tr.samples[-1][0]:
            return
        if tr.samples and status.faults_served < tr.samples[-1][1]:
            tr.samples.clear()  # the agent's counter restarted (re-attach, agent restart)
        tr.samples.append((t, status.faults_served, status.evicted_pages))
        horizon = t - 2 * self.config.window_ms
        while len(tr.samples) > 2 and tr.samples[0][0] < horizon:
            tr.samples.popleft()

    def forget(self, vm_id: str) -> None:
        """Drop a VM's samples (deregistered)."""
        self._tracks.pop(vm_id, None)

    def measure(self, vm_id: str, now_ms: int) -> tuple[float, float] | None:
        """(promotion rate per evicted page per minute, mean evicted pages) over the last window, or None."""
        tr = self._tracks.get(vm_id)
        if tr is None:
            return None
        start = now_ms - self.config.window_ms
        window = [s for s in tr.samples if s[0] >= start]
        older = [s for s in tr.samples if s[0] < start]
        if older:
            window.insert(0, older[-1])  # the sample just before the window anchors its start
        if len(window) < 2:
            return None
        span_ms = window[-1][0] - window[0][0]
        if span_ms < self.config.window_ms // 2:
            return None
        faults = window[-1][1] - window[0][1]
        evicted = sum(s[2] for s in window) / len(window)
        if evicted < 1:
            return 0.0, evicted
        return faults / evicted / (span_ms / 60_000), evicted

    def rate(self, vm_id: str) -> float | None:
        """The rate measured at the VM's last evaluation, if any."""
        tr = self._tracks.get(vm_id)
        return tr.rate if tr else None

    def evaluate(self, vm_id: str, slo: float, level: int, now_ms: int) -> SloDecision | None:
        """Once per window: a new level for the VM, or None to keep ``level``."""
        tr = self._tracks.get(vm_id)
        if tr is None or slo <= 0:
            return None
        if tr.last_eval_ms and now_ms - tr.last_eval_ms < self.config.window_ms:
            return None
        m = self.measure(vm_id, now_ms)
        if m is None:
            return None
        rate, evicted = m
        tr.last_eval_ms = now_ms
        tr.rate = rate
        cfg = self.config
        if rate > slo:
            tr.low_windows = 0
            if level >= cfg.max_level or evicted < cfg.min_evicted_pages:
                return None
            return SloDecision(
                vm_id,
                level + 1,
                level,
                rate,
                slo,
                f"promotion rate {rate:.4%}/min exceeds the SLO {slo:.4%}/min: backing off to level {level + 1}",
            )
        if rate < cfg.tighten_fraction * slo:
            tr.low_windows += 1
            if level > 0 and tr.low_windows >= cfg.tighten_windows:
                tr.low_windows = 0
                return SloDecision(
                    vm_id,
                    level - 1,
                    level,
                    rate,
                    slo,
                    f"promotion rate {rate:.4%}/min is far below the SLO {slo:.4%}/min for "
                    f"{cfg.tighten_windows} windows: tightening to level {level - 1}",
                )
            return None
        tr.low_windows = 0
        return None
