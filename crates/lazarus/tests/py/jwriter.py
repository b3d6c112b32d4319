"""Writes 64 KiB chunks into SLOTS slots starting at BASE (bytes): write i goes to slot
i % SLOTS, filled with byte (TAG * 31 + i) % 251 + 1, and is followed by a flush every
FLUSH_EVERY writes. Prints "acked i" once a write (and its flush, if any) is
acknowledged. Stops at the first error (printing it), after COUNT writes, or when the
file STOP exists. Usage: jwriter.py URI TAG BASE SLOTS COUNT FLUSH_EVERY STOP"""
import os
import sys
import time
import nbd

uri, tag, base, slots, count, flush_every, stop = sys.argv[1:8]
tag, base, slots, count, flush_every = int(tag), int(base), int(slots), int(count), int(flush_every)
h = nbd.NBD()
h.connect_uri(uri)
CHUNK = 64 << 10
for i in range(count):
    if os.path.exists(stop):
        break
    try:
        h.pwrite(bytes([(tag * 31 + i) % 251 + 1]) * CHUNK, base + (i % slots) * CHUNK)
        if flush_every and i % flush_every == 0:
            h.flush()
    except nbd.Error as e:
        print(f"error {e}", flush=True)
        sys.exit(0)
    print(f"acked {i}", flush=True)
    time.sleep(0.005)
print("done", flush=True)
