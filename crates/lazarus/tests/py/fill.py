"""Maps every block of the export: WRITE_ZEROES with NO_HOLE over the whole size in
256 MiB requests. Usage: fill.py URI"""
import sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
step = 256 << 20
off = 0
while off < size:
    n = min(step, size - off)
    h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
    off += n
h.flush()
print("filled", size, flush=True)
