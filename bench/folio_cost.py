#!/usr/bin/env python3
"""What the page cache charges a block store on this machine, outside Lazarus.

Linux sizes the folios of a buffered write by the write's length, and keeps them:
a file written 1 MiB at a time sits in the page cache in large folios, and a later
4 KiB write into one of them walks every block of the folio
(ext4_block_write_begin). This script writes a file in pieces of 4 KiB to 1 MiB,
then times 4 KiB random overwrites, 1 MiB rewrites and 4 KiB random reads of it.
It also times page-cache growth into memory the process has not used yet, which on
some virtual machines (memory handed back to the host and faulted in again on first
touch) costs far more than a copy.

Usage: bench/folio_cost.py [DIR] [MIB]   (default /var/tmp, 512 MiB per file)
Times are CPU time of this process per operation, Python's own call cost included
(about 1 us a call).
"""
import os
import random
import sys
import time

MB = 1 << 20
DIR = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 512
BUF = os.urandom(MB)


def cpu(f):
    c0 = time.process_time()
    n = f()
    return (time.process_time() - c0) / n


def by_piece(piece):
    path = os.path.join(DIR, f"folio-cost-{os.getpid()}.dat")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        def write_mib(i):
            for k in range(0, MB, piece):
                os.pwrite(fd, BUF[k:k + piece], i * MB + k)

        for i in range(N):
            write_mib(i)

        def small_writes():
            for _ in range(N * 64):
                os.pwrite(fd, BUF[:4096], random.randrange(N * 256) * 4096)
            return N * 64

        def rewrites():
            for i in range(N):
                write_mib(i)
            return N

        offs = [random.randrange(N * 256) * 4096 for _ in range(N * 256)]

        def reads():
            for o in offs:
                os.pread(fd, 4096, o)
            return len(offs)

        w = cpu(small_writes)
        r = cpu(rewrites)
        rd = cpu(reads)
        print(f"written in {piece // 1024:>4} KiB pieces: 4 KiB random write {w * 1e6:5.2f} us, "
              f"1 MiB rewrite in the same pieces {r * 1e3:5.3f} ms, 4 KiB random read {rd * 1e6:5.2f} us")
    finally:
        os.close(fd)
        os.unlink(path)


def growth():
    path = os.path.join(DIR, f"folio-growth-{os.getpid()}.dat")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in range(6):
            def grow():
                for i in range(N):
                    os.pwrite(fd, BUF, (chunk * N + i) * MB)
                return N
            print(f"page cache growth, MiB {chunk * N}-{(chunk + 1) * N - 1} of a new file: "
                  f"{cpu(grow) * 1e3:.3f} ms per MiB")
    finally:
        os.close(fd)
        os.unlink(path)


for piece in (4096, 16384, 65536, MB):
    by_piece(piece)
growth()
