"""The job's network: a namespace of its own with loopback up, and nothing else.

Each spare process (see ``launcher``) makes its network namespace before its
job is known, so neither creating it nor setting ``lo`` up is on the way of a
launch, and every namespace serves exactly one job: a port one job bound, a
socket it left, are gone for the next.  The namespace dies with the job's
last process.

``lo`` is set up with one ``RTM_NEWLINK`` request, encoded once by the
worker (with ``struct``: 32 bytes, no library) and sent on a plain netlink
socket in each new namespace: a pyroute2 ``IPRoute`` per namespace costs
three times as much (about 1 ms of CPU against 0.35 here).
"""

from __future__ import annotations

import os
import socket
import struct

LOOPBACK_INDEX = 1  # lo is always the first interface of a new namespace
NLMSG_ERROR = 2


# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if.h)
RTM_NEWLINK = 16
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
IFF_UP = 0x1
AF_UNSPEC = 0
# struct nlmsghdr (len, type, flags, seq, pid) and struct ifinfomsg (family, pad, type,
# index, flags, change), native byte order as the kernel reads them.
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")


def loopback_up_request() -> bytes:
    """The netlink message that sets interface 1 (``lo``) up, with an ACK requested.

    Encoded with ``struct``: importing pyroute2 for these 32 bytes would cost the
    worker about 9 MB of RSS for its whole life (``tests`` check the bytes against
    pyroute2's own encoding).
    """
    body = _IFINFOMSG.pack(AF_UNSPEC, 0, LOOPBACK_INDEX, IFF_UP, IFF_UP)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWLINK,
                            NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    return header + body


def send_netlink(request: bytes) -> None:
    """Send one rtnetlink request in the current namespace; raise unless it is ACKed.

    Stdlib only: this runs in the launcher's spares.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(request)
        reply = sock.recv(65536)
    # struct nlmsghdr (len, type, flags, seq, pid), then for NLMSG_ERROR an int errno
    if len(reply) < 20:
        raise OSError(f"short netlink reply ({len(reply)} bytes)")
    kind = struct.unpack_from("=H", reply, 4)[0]
    error = -struct.unpack_from("=i", reply, 16)[0]
    if kind != NLMSG_ERROR:
        raise OSError(f"unexpected netlink reply type {kind}")
    if error:
        raise OSError(error, f"setting lo up: {os.strerror(error)}")
