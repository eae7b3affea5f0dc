"""The one error type raised by the core's parsers and validators."""


class PacketError(ValueError):
    """Bytes that are not a packet the gateway can describe.

    Only the slow, descriptive parser (:func:`gateway.core.packet.describe`)
    raises it; the per-packet path returns drop reasons instead of raising.
    """


class ModelError(ValueError):
    """A configuration that breaks a rule of the outbound model.

    ``key`` names the offending configuration key (dotted, with list
    indices) so that the CLI can print file, key and problem on one line.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StateError(ValueError):
    """A saved table (the state file) that cannot be restored: not JSON, another
    format or version, or a record that contradicts itself.

    Raised by :func:`gateway.core.restore.restore` before it changes the table,
    so a refused file leaves a fresh table behind (the adapter logs it and starts
    empty).
    """
