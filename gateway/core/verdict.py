"""What the core decides for one packet, as the queue adapters act on it.

The values are the queue protocol's: 0 and 1 are the kernel's ``NF_DROP`` and
``NF_ACCEPT`` (docs/kernel.md, "Diverting packets"); 2 and 3 ask the adapter
to send the rewritten bytes back, 3 also with the "translated" mark that lets
return traffic through the FORWARD filter.
"""

from __future__ import annotations

from enum import IntEnum


class Verdict(IntEnum):
    """A packet's fate; the per-packet path returns the module-level aliases."""

    DROP = 0
    #: Unchanged (the queue client batches these; the core itself never returns it).
    ACCEPT = 1
    ACCEPT_MODIFIED = 2
    #: Modified, and marked as translated (out2in: the FORWARD filter lets only these in).
    ACCEPT_MODIFIED_MARK = 3


#: Module-level names for the per-packet path: a global lookup is ten times
#: cheaper than ``Verdict.DROP`` (an enum class attribute).
DROP, ACCEPT, ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK = Verdict
