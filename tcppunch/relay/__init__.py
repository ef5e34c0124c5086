"""The relay byte pump (splice where possible).

The coordinator authenticates two relay connections, turns each into a :class:`RelayEnd` with
:func:`detach`, and calls :func:`relay` to splice them together, under byte budgets per source
address and per token from :class:`RelayAccounting`. See docs/relay.md for the design and measured throughput.
"""

from tcppunch.relay.endpoint import DetachError, RelayEnd, detach
from tcppunch.relay.limits import ByteBudget, RelayAccounting, RelayLimits
from tcppunch.relay.meter import Direction, EndReason, RelayMeter, RelayStats
from tcppunch.relay.pump import relay

__all__ = [
    "ByteBudget",
    "DetachError",
    "Direction",
    "EndReason",
    "RelayAccounting",
    "RelayEnd",
    "RelayLimits",
    "RelayMeter",
    "RelayStats",
    "detach",
    "relay",
]
