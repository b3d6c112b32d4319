"""Writes 64 KiB chunks (chunk i filled with byte i % 251 + 1) at offset i * 64 KiB,
each followed by a flush, and prints "acked i" once the flush is acknowledged. Stops at
the first error (printing it) or after COUNT chunks, pausing PAUSE seconds (default 0)
after each. Usage: writer.py URI COUNT [PAUSE]"""
import sys
import time
import nbd

uri, count = sys.argv[1], int(sys.argv[2])
pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
h = nbd.NBD()
h.connect_uri(uri)
CHUNK = 64 << 10
for i in range(count):
    try:
        h.pwrite(bytes([i % 251 + 1]) * CHUNK, i * CHUNK)
        h.flush()
    except nbd.Error as e:
        print(f"error {e}", flush=True)
        sys.exit(0)
    print(f"acked {i}", flush=True)
    if pause:
        time.sleep(pause)
