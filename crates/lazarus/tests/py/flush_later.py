"""Connects to URI, writes 64 KiB of byte 0x11 at 0 and flushes, then writes 64 KiB of
byte 0x22 at 0 (acknowledged, not flushed) and prints "written". Waits for a line on
stdin, then flushes and prints "FLUSH ACK" or "FLUSH ERR <message>", then reads the
64 KiB back (retrying on errors for up to 20 s) and prints "READ <first byte> <all
bytes equal>"."""
import sys
import time
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * (64 << 10), 0)
h.flush()
h.pwrite(b"\x22" * (64 << 10), 0)
print("written", flush=True)
sys.stdin.readline()
try:
    h.flush()
    print("FLUSH ACK", flush=True)
except nbd.Error as e:
    print(f"FLUSH ERR {e}", flush=True)
deadline = time.monotonic() + 20
while True:
    try:
        b = h.pread(64 << 10, 0)
        print(f"READ {b[0]:#x} {b == bytes([b[0]]) * len(b)}", flush=True)
        break
    except nbd.Error as e:
        if time.monotonic() > deadline:
            print(f"READ ERR {e}", flush=True)
            break
        time.sleep(0.2)
