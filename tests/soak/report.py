"""The soak's results: what each fault did, the resources before and after, and the report.

Separate from the harness (tests/soak/harness.py), which runs the soak; this only judges
and renders what it measured.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from tests.soak.load import COMPLETED, FAILED, LOST, Load


@dataclass
class FaultResult:
    fault: str
    worker: int
    detected_s: float | None
    recovered_s: float | None
    bound_s: float | None
    error: str = ""
    # The restart reasons the supervisor gave (restarts_by_reason, what moved).
    reasons: str = ""


@dataclass
class Resources:
    fds: int
    rss: int
    metric_files: int
    dead_metric_files: int
    shm: int
    descendants: int


def resource_violations(before: Resources, after: Resources | None) -> list[str]:
    """What grew or was left between the first fault and the end."""
    if after is None:
        return ["resources could not be read at the end"]
    found = []
    if after.fds > before.fds + 4:
        found.append(f"supervisor fds grew: {before.fds} -> {after.fds}")
    if after.dead_metric_files:
        found.append(f"{after.dead_metric_files} metric file(s) of dead processes left")
    if after.metric_files > before.metric_files:
        found.append(f"metric files grew: {before.metric_files} -> {after.metric_files}")
    if after.shm > before.shm:
        found.append(f"/dev/shm files grew: {before.shm} -> {after.shm}")
    if after.descendants != before.descendants:
        found.append(f"supervisor's processes: {before.descendants} -> {after.descendants}")
    if after.rss > before.rss + 32 * 2**20:
        found.append(f"supervisor RSS grew by {(after.rss - before.rss) / 2**20:.0f} MiB")
    return found


def _med_max(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def _fault_rows(results: list[FaultResult], skipped: dict[str, str]) -> list[str]:
    lines = ["| fault | injected | recovered | detection median / max (s) | bound (s) "
             "| back to serving median / max (s) | restart reason |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r.fault for r in results):
        rows = [r for r in results if r.fault == name]
        ok = [r for r in rows if r.recovered_s is not None and not r.error]
        det = [r.detected_s for r in ok if r.detected_s is not None]
        rec = [r.recovered_s for r in ok if r.recovered_s is not None]
        bound = rows[0].bound_s
        reasons = ", ".join(sorted({r.reasons for r in rows if r.reasons})) or "-"
        lines.append(f"| {name} | {len(rows)} | {len(ok)} | {_med_max(det)} | "
                     f"{'' if bound is None else f'{bound:.1f}'} | {_med_max(rec)} | "
                     f"{reasons} |")
    for name, reason in skipped.items():
        lines.append(f"| {name} | 0 | - | not run: {reason} | | | |")
    return lines


def _request_rows(load: Load) -> list[str]:
    counts = load.counts()
    sent = sum(counts.values())
    lines = ["", "| requests sent | completed | failed with an explicit error | lost |",
             "|---|---|---|---|",
             f"| {sent} | {counts[COMPLETED]} | {counts[FAILED]} | {counts[LOST]} |", ""]
    failures: dict[str, int] = {}
    for outcome in load.outcomes:
        if outcome.result != COMPLETED:
            key = f"{outcome.result}: {re.sub(r'[0-9]+', 'N', outcome.detail)[:90]}"
            failures[key] = failures.get(key, 0) + 1
    if failures:
        lines += ["| outcome | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])]
        lines.append("")
    return lines


def _resource_rows(before: Resources, after: Resources | None) -> list[str]:
    lines = ["| resource | before | after |", "|---|---|---|"]
    for name in ("fds", "rss", "metric_files", "dead_metric_files", "shm", "descendants"):
        b = getattr(before, name)
        a = getattr(after, name) if after is not None else "?"
        if name == "rss":
            b = f"{b / 2**20:.0f} MiB"
            a = f"{a / 2**20:.0f} MiB" if isinstance(a, int) else a
        lines.append(f"| {name.replace('_', ' ')} | {b} | {a} |")
    return lines


def render_report(results: list[FaultResult], skipped: dict[str, str], load: Load,
                  resources: tuple[Resources, Resources | None], notes: list[str],
                  violations: list[str]) -> str:
    """The Markdown report: faults, requests, resources, notes and violations."""
    lines = [*_fault_rows(results, skipped), *_request_rows(load), *_resource_rows(*resources)]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    lines += ["", "Violations: " + ("none" if not violations else "")]
    lines += [f"- {v}" for v in violations]
    return "\n".join(lines) + "\n"
