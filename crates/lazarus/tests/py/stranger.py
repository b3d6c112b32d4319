"""Acts as a peer on a cluster RPC port (a node's or the recovery server's): sends one
well-formed RPC frame and prints what came back: "reply STATUS" (a reply frame with its
status byte) or "refused: WHY" (the connection failed or closed before any reply).

Usage: stranger.py HOST PORT MODE KIND BODY
  MODE  plain          no TLS at all
        tls-anonymous  TLS without a client certificate
        tls:DIR        TLS with the certificate in DIR (node.crt, node.key)
  KIND  the request kind byte; BODY the frame's body (JSON text)."""
import socket
import ssl
import struct
import sys

host, port, mode, kind, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5].encode()


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise EOFError("connection closed")
        out += b
    return out


try:
    s = socket.create_connection((host, port), timeout=10)
    if mode != "plain":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The stranger does not check who answers: only whether it gets served.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if mode.startswith("tls:"):
            d = mode[4:]
            ctx.load_cert_chain(d + "/node.crt", d + "/node.key")
        s = ctx.wrap_socket(s)
    s.sendall(struct.pack(">IQB", 9 + len(body), 1, kind) + body)
    n, = struct.unpack(">I", recv_exact(s, 4))
    rest = recv_exact(s, n)
    print(f"reply {rest[8]}", flush=True)
except Exception as e:  # noqa: BLE001 -- any failure is a refusal to this peer
    print(f"refused: {type(e).__name__}: {e}", flush=True)
