"""Moved: the NAT report is part of the coordinator's wire format, so it lives in :mod:`tcppunch.wire.natreport`.

Kept only while code written before the move is updated; import from ``tcppunch.wire.natreport``.
"""

from tcppunch.wire.endpoint import Endpoint as Endpoint
from tcppunch.wire.natreport import *  # noqa: F403
