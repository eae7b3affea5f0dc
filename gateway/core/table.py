"""The translation table: every flow of one gateway and the policy that creates
them (docs/model.md).

:class:`TranslationTable` is assembled from the jobs listed in
:mod:`gateway.core.state`. Adapters use, and only use:

- :meth:`~gateway.core.in2out.In2Out.in2out` and
  :meth:`~gateway.core.out2in.Out2In.out2in` for every packet: a mutable
  buffer and ``now`` in, a :class:`~gateway.core.verdict.Verdict` out, the
  packet rewritten in place;
- :meth:`get_timer` and :meth:`handle_timer` (aioquic's habit: the loop asks
  when the core next needs to wake);
- :meth:`~gateway.core.reconfigure.Reconfigure.reconfigure` for a reload;
- :attr:`events` (drained and logged by the adapter), :meth:`counters_dict`
  and the snapshots in :mod:`gateway.core.views`.
"""

from __future__ import annotations

from random import Random

from gateway.core.counters import COUNTER_NAMES, Counter
from gateway.core.events import Event
from gateway.core.in2out import In2Out
from gateway.core.model import GatewayModel
from gateway.core.out2in import Out2In


class TranslationTable(In2Out, Out2In):
    """All flows of one gateway, both directions, their timers and counters."""

    def __init__(self, model: GatewayModel, now: float, rng: Random | None = None) -> None:
        super().__init__(model, now, rng)
        self.reconfigure(model, now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next needs to run (None: nothing pending)."""
        due = self.wheel.next_deadline()
        if self._vacant:
            return self._vacant_due if due is None else min(due, self._vacant_due)
        return due

    def handle_timer(self, now: float) -> None:
        """End flows idle past their timeout, re-arm the ones that saw traffic, and
        release standalone backends that have had no flow for the idle timeout."""
        self._expire(now)
        if now >= self._vacant_due:
            self._release_vacant(now)

    def counters_dict(self) -> dict[str, int]:
        return dict(zip(COUNTER_NAMES, self.counters, strict=True))

    def flow_count(self) -> int:
        """Live flows (kept as a count by the one function that adds and the one that ends them)."""
        return self.flows_live

    def count_internal_error(self) -> None:
        """For adapters: a packet dropped because the core raised (a bug, never input)."""
        self.counters[Counter.DROP_INTERNAL] += 1


__all__ = ["Event", "TranslationTable"]
