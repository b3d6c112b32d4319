"""Connects to URI, waits for a line on stdin, then writes 64 KiB of byte 0x22 at 0
and flushes. Prints "ACK" if both were acknowledged, else "ERR <message>"."""
import sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"\x22" * (64 << 10), 0)
    h.flush()
    print("ACK", flush=True)
except nbd.Error as e:
    print(f"ERR {e}", flush=True)
