#!/usr/bin/env python3
"""Opens N idle client connections through a PostgreSQL proxy and measures the proxy's RSS.

Used by benches/proxy.sh. Speaks just enough of the protocol: a 3.0 StartupMessage, then it
reads messages until ReadyForQuery (trust authentication: AuthenticationOk comes first, no
password exchange). Connections are opened in waves so that PostgreSQL's backend forks, not
this script, set the pace; then every one is held open, idle, while VmRSS is read again.

usage: idle_conns.py HOST PORT USER DATABASE COUNT PROXY_PID
Prints `rss_before_kib=... rss_after_kib=... connections=... kib_per_connection=...`.
"""

import selectors
import socket
import struct
import sys
import time


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608)  # protocol 3.0
    for k, v in (("user", user), ("database", database), ("application_name", "idle_conns")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


class Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.ready = False

    def feed(self, data: bytes) -> None:
        """Consumes whole messages; raises on ErrorResponse."""
        self.buf += data
        while len(self.buf) >= 5:
            tag = self.buf[0:1]
            (length,) = struct.unpack("!I", self.buf[1:5])
            if len(self.buf) < 1 + length:
                return
            body = self.buf[5 : 1 + length]
            self.buf = self.buf[1 + length :]
            if tag == b"E":
                raise RuntimeError("server error: " + body.decode("utf-8", "replace"))
            if tag == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                raise RuntimeError("server asked for a password: use trust authentication")
            if tag == b"Z":
                self.ready = True


def open_wave(host, port, pkt, n, sel, timeout=60.0):
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, port))
        s.sendall(pkt)
        s.setblocking(False)
        c = Conn(s)
        sel.register(s, selectors.EVENT_READ, c)
        conns.append(c)
    waiting = n
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{waiting} connections not ready after {timeout}s")
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            data = c.sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed during startup")
            c.feed(data)
            if c.ready:
                sel.unregister(c.sock)
                waiting -= 1
    return conns


def main() -> None:
    host, port, user, database, count, pid = sys.argv[1:7]
    port, count, pid = int(port), int(count), int(pid)
    pkt = startup_packet(user, database)
    sel = selectors.DefaultSelector()
    # Let the proxy settle (freed buffers of earlier work are not our concern here).
    time.sleep(1.0)
    before = vm_rss_kib(pid)
    conns = []
    wave = 50
    while len(conns) < count:
        conns += open_wave(host, port, pkt, min(wave, count - len(conns)), sel)
    time.sleep(1.0)
    after = vm_rss_kib(pid)
    assert all(c.ready for c in conns)
    per = (after - before) / len(conns)
    print(
        f"rss_before_kib={before} rss_after_kib={after} connections={len(conns)} "
        f"kib_per_connection={per:.1f}"
    )
    for c in conns:
        try:
            c.sock.sendall(b"X\0\0\0\4")  # Terminate
        except OSError:
            pass
        c.sock.close()


if __name__ == "__main__":
    main()
