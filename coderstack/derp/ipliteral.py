"""Whether a host string is an IP address literal rather than a name.

The client dials a literal as it is and IDNA-encodes a name; the relay reports a peer's address
in ``PeerPresent`` only when it is a literal (a unix-socket peer has a path there).
"""

from __future__ import annotations

import ipaddress


def is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True
