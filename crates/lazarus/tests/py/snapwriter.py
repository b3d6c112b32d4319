"""Runs a command (a snapshot) while 4 KiB writes are in flight, and reports what was
acknowledged before it started and what was sent before it ended.

Write s (s = 1, 2, ...) goes to a random slot among SLOTS that has no write in flight
(so the writes to one slot are ordered), QD at a time; the block holds s and the slot
in its first 16 bytes (little-endian u64s). After BEFORE seconds of writing, a thread
runs CMD while the writes go on; they stop 0.3 s after it returns. Prints one JSON
object: "acked_before" (per slot, the last write acknowledged before CMD started, 0
for none), "sent" (per slot, every write sent before CMD returned), "rc" and "out"
(CMD's exit status and output), "writes" (all writes acknowledged).
Usage: snapwriter.py URI SLOTS QD BEFORE CMD..."""
import json
import random
import subprocess
import sys
import threading
import time

import nbd

uri, slots, qd, before = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
cmd = sys.argv[5:]
B = 4096
h = nbd.NBD()
h.connect_uri(uri)
lock = threading.Lock()
acked = [0] * slots
sent = [[] for _ in range(slots)]
state = {}


def run_cmd():
    with lock:
        state["acked_before"] = list(acked)
    r = subprocess.run(cmd, capture_output=True, text=True)
    with lock:
        state["sent"] = [list(s) for s in sent]
        state["rc"] = r.returncode
        state["out"] = r.stdout + r.stderr
        state["ended"] = time.monotonic()


seq = 0
pending = []  # (cookie, seq, slot, buffer)
busy = set()
writes = 0
t0 = time.monotonic()
thread = None
while True:
    now = time.monotonic()
    if thread is None and now - t0 >= before:
        thread = threading.Thread(target=run_cmd)
        thread.start()
    if "ended" in state and now - state["ended"] > 0.3:
        break
    while len(pending) < qd:
        slot = random.choice([s for s in range(slots) if s not in busy])
        seq += 1
        data = seq.to_bytes(8, "little") + slot.to_bytes(8, "little") + bytes([seq % 251]) * (B - 16)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        with lock:
            sent[slot].append(seq)
        cookie = h.aio_pwrite(buf, slot * B)
        pending.append((cookie, seq, slot, buf))
        busy.add(slot)
    h.poll(50)
    for p in list(pending):
        if h.aio_command_completed(p[0]):
            pending.remove(p)
            busy.discard(p[2])
            writes += 1
            with lock:
                acked[p[2]] = max(acked[p[2]], p[1])
while pending:
    h.poll(50)
    for p in list(pending):
        if h.aio_command_completed(p[0]):
            pending.remove(p)
h.shutdown()
thread.join()
state.pop("ended", None)
state["writes"] = writes
print(json.dumps(state))
