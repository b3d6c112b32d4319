"""Connects to URI, writes 64 KiB of byte 0x11 at 0, flushes and prints "connected".
Waits for a line on stdin, then writes 1 MiB of byte 0x22 at 0 and flushes, and prints
"WRITTEN" or "ERR <message>"."""
import sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * (64 << 10), 0)
h.flush()
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b"\x22" * (1 << 20), 0)
    h.flush()
    print("WRITTEN", flush=True)
except nbd.Error as e:
    print(f"ERR {e}", flush=True)
