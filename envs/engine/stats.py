"""What the engine has observed so far that a policy may read: the online statistics behind
the predicted output length, Continuum's tool-pause TTL and VTC's fair-share counters.

Non-privileged by construction: every number here is learned from what already happened (calls
that finished, tools that returned, tokens served), never from a call's true output length or
true tool latency ahead of time, so a feature built from them may enter an RL observation.
"""

from __future__ import annotations

import numpy as np


class OnlineStats:
    """Running sums per (role, tenant), per role and per tenant, updated by the engine."""

    def __init__(self) -> None:
        # output tokens of finished calls, as [sum, count]
        self.output_stats: dict[tuple[int, int], list[float]] = {}  # (role, tenant) -> [sum, count]
        self.role_output_stats: dict[int, list[float]] = {}  # role -> [sum, count]
        # their means as a (role, tenant) table, built by features.py when a decision needs it;
        # None whenever a call finished or a tenant appeared since (then rebuilt)
        self.mean_outputs: np.ndarray | None = None
        self.tool_stats: dict[int, list[float]] = {}  # role -> [sum, count] of observed tool pauses
        self._tools_seen: set[int] = set()  # calls whose tool pause is counted
        # tenants, by first appearance, and VTC's counters
        self.tenants: dict[str, int] = {}  # tenant name -> id
        self.tenant_service = np.zeros(0)  # (tenants,) VTC's weighted tokens served
        self.tenant_backlog = np.zeros(0, dtype=np.int64)  # (tenants,) calls queued or running
        self.num_vtc_lifts = 0

    def tenant_id(self, name: str) -> int:
        """The tenant's id, registering a new one (one more column in every per-tenant table)."""
        tenant = self.tenants.setdefault(name, len(self.tenants))
        if tenant >= len(self.tenant_service):
            self.tenant_service = np.append(self.tenant_service, 0.0)
            self.tenant_backlog = np.append(self.tenant_backlog, 0)
            self.mean_outputs = None
        return tenant

    def observe_output(self, role: int, tenant: int, output_tokens: float) -> None:
        """A call of ``role`` and ``tenant`` finished after ``output_tokens`` tokens."""
        for stats in (
            self.output_stats.setdefault((role, tenant), [0.0, 0.0]),
            self.role_output_stats.setdefault(role, [0.0, 0.0]),
        ):
            stats[0] += output_tokens
            stats[1] += 1.0
        self.mean_outputs = None

    def observe_tool(self, call: int, role: int, pause_s: float) -> None:
        """The tool after ``call`` (of ``role``) returned after ``pause_s``; counted once per call."""
        if call in self._tools_seen:
            return
        self._tools_seen.add(call)
        stats = self.tool_stats.setdefault(role, [0.0, 0.0])
        stats[0] += pause_s
        stats[1] += 1.0

    def forget_call(self, call: int) -> None:
        """A streaming engine dropped the call's tree: its tool mark is no longer needed."""
        self._tools_seen.discard(call)

    def observed_tool_pause_s(self, role: int) -> tuple[float, float]:
        """(mean, count) of the tool pauses observed after finished calls of ``role`` (0, 0
        before the first): what Continuum's TTL and the RETAIN features predict from."""
        total, count = self.tool_stats.get(role, (0.0, 0.0))
        return (total / count if count else 0.0), count

    def lift_due(self, tenant: int) -> bool:
        """VTC: the tenant is about to turn backlogged while another one is."""
        backlog = self.tenant_backlog
        return backlog[tenant] == 0 and bool((backlog > 0).any())

    def lift(self, tenant: int) -> None:
        """VTC's lift: a tenant turning backlogged starts no lower than the least-served
        backlogged tenant, so it banks no credit from idling. Never lowers a counter."""
        floor = float(self.tenant_service[np.flatnonzero(self.tenant_backlog > 0)].min())
        if self.tenant_service[tenant] < floor:
            self.tenant_service[tenant] = floor
            self.num_vtc_lifts += 1
