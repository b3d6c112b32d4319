"""Connects to URI, writes 4 KiB at 128 KiB, waits for a line on stdin, then writes 64 KiB of byte 0x22 at 0.
Prints "ACK" or "ERR <message>". Then, on the same connection, writes 64 KiB of byte
0x44 at 64 KiB and flushes: prints "ACK2", or "ERR2 <message>" if that failed (the
server ended the connection)."""
import sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
# A first write opens the connection's session at the primary.
h.pwrite(b"\x11" * 4096, 128 << 10)
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"\x22" * (64 << 10), 0)
    print("ACK", flush=True)
except nbd.Error as e:
    print(f"ERR {e}", flush=True)
try:
    h.pwrite(b"\x44" * (64 << 10), 64 << 10)
    h.flush()
    print("ACK2", flush=True)
except nbd.Error as e:
    print(f"ERR2 {e}", flush=True)
