"""Writes 64 KiB chunks into SLOTS slots starting at BASE (bytes): write i goes to slot
i % SLOTS, filled with byte (TAG * 31 + i) % 251 + 1, and is followed by a flush every
FLUSH_EVERY writes. Prints "try i" before and "acked i" once a write (and its flush, if
any) is acknowledged. On an error it prints "error ..." and stops, or with RETRY=1
reconnects after 200 ms and goes on with the next write. Stops after COUNT writes or
when the file STOP exists.
Usage: jwriter.py URI TAG BASE SLOTS COUNT FLUSH_EVERY STOP [RETRY]"""
import os
import sys
import time
import nbd

uri, tag, base, slots, count, flush_every, stop = sys.argv[1:8]
retry = len(sys.argv) > 8 and sys.argv[8] == "1"
tag, base, slots, count, flush_every = int(tag), int(base), int(slots), int(count), int(flush_every)


def connect():
    while True:
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            return h
        except nbd.Error:
            if not retry or os.path.exists(stop):
                raise
            time.sleep(0.2)


h = connect()
CHUNK = 64 << 10
for i in range(count):
    if os.path.exists(stop):
        break
    print(f"try {i}", flush=True)
    try:
        h.pwrite(bytes([(tag * 31 + i) % 251 + 1]) * CHUNK, base + (i % slots) * CHUNK)
        if flush_every and i % flush_every == 0:
            h.flush()
    except nbd.Error as e:
        print(f"error {e}", flush=True)
        if not retry:
            sys.exit(0)
        time.sleep(0.2)
        try:
            h.shutdown()
        except nbd.Error:
            pass
        h = connect()
        continue
    print(f"acked {i}", flush=True)
    time.sleep(0.005)
print("done", flush=True)
