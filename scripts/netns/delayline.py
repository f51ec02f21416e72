#!/usr/bin/env python3
"""A fixed-delay line for kernels without sch_netem (used by cluster.sh --delay-mode tun).

Opens TUN device NAME in the current network namespace and writes every IP packet it reads
back into the same device DELAY_US microseconds later, in arrival order (packets pass through
opaque, virtio-net header included). cluster.sh routes the
node-to-node traffic of its hub namespace through the device (policy routing on the input
port), so each packet crosses the line once: DELAY is the one-way latency between two nodes.
Exits on SIGTERM/SIGINT. Standard library only.

    delayline.py NAME DELAY_US
"""

import collections
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# With a virtio-net header on every packet the kernel may hand over (and take back) TCP
# segmentation-offload super-packets of up to 64 KiB instead of MTU-sized ones: far fewer
# packets for this loop to move, which is what lets it keep up with 1 Gbit/s.
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
READ_SIZE = 65536 + 256


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: delayline.py TUN_NAME DELAY_US", file=sys.stderr)
        return 2
    name, delay_us = sys.argv[1], sys.argv[2]
    try:
        delay = int(delay_us) / 1e6
    except ValueError:
        print(f"delayline.py: DELAY_US {delay_us!r} is not an integer", file=sys.stderr)
        return 2
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as e:
        print(f"delayline.py: opening TUN device {name}: {e} (needs root and /dev/net/tun)",
              file=sys.stderr)
        return 1
    os.set_blocking(fd, False)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    # Every packet gets the same delay, so a FIFO is also ordered by due time.
    queue: collections.deque = collections.deque()
    print(f"delayline.py: {name} up, delay {delay * 1e3:g} ms", file=sys.stderr, flush=True)
    while not stop:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            try:
                os.write(fd, queue.popleft()[1])
            except OSError:
                pass  # a packet the kernel refuses (no route any more): drop it, like a wire
        # select(2) takes microseconds (poll and epoll only milliseconds).
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.2
        try:
            readable, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        if readable:
            arrived = time.monotonic()
            while True:
                try:
                    pkt = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                queue.append((arrived + delay, pkt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
