"""Checks that chunks 0..=LAST written by writer.py read back intact through URI.
Prints "ok" or the first bad chunk. Usage: verify.py URI LAST"""
import sys
import nbd

uri, last = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
CHUNK = 64 << 10
for i in range(last + 1):
    got = h.pread(CHUNK, i * CHUNK)
    if got != bytes([i % 251 + 1]) * CHUNK:
        print(f"chunk {i} differs", flush=True)
        sys.exit(1)
print("ok", flush=True)
