#!/usr/bin/env python3
"""A client that never starts TLS, on a server that requires it (issue 14).

Usage: nbd_clear.py HOST PORT EXPORT
Sends NBD_OPT_LIST, NBD_OPT_INFO, NBD_OPT_GO and NBD_OPT_STRUCTURED_REPLY in the
clear and prints each reply's type in hex; then NBD_OPT_EXPORT_NAME, after which
the server may only close: prints "closed" or "data: N bytes" if anything came
back (the size and flags of an export would be a leak).
"""
import socket
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(f"closed after {len(b)} of {n} bytes")
        b += c
    return b


def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def reply(s):
    magic, opt, typ, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    recv_exact(s, length)
    return typ


def main():
    host, port, export = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    s = socket.create_connection((host, port), timeout=10)
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC", greeting
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    info = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    for name, opt, data in [
        ("list", 3, b""),
        ("info", 6, info),
        ("go", 7, info),
        ("structured", 8, b""),
    ]:
        option(s, opt, data)
        print(f"{name} {reply(s):#x}")
    option(s, 1, export)
    try:
        got = s.recv(1 << 16)
    except (ConnectionResetError, socket.timeout):
        got = b""
    print("closed" if not got else f"data: {len(got)} bytes")


if __name__ == "__main__":
    main()
