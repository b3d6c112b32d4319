#!/usr/bin/python3
"""Chaos campaign against a real `lazarus up` cluster.

Starts `lazarus up` (three node processes and the recovery server under one
supervisor), keeps a libnbd writer busy on tracked 4 KiB blocks of vol0 (writes of
1 to 16 blocks, a flush every few writes, reads checked as it goes), and then, round
after round, injects one or several faults chosen from a seeded random generator:

  kill -9 of one node or of two (the primary among them), SIGSTOP and SIGCONT,
  `fault drop`, `stall`, `isolate`, `corrupt` (slice, checksum or block page),
  `eio`, `device fail`, the recovery server killed or stopped, a node cut from the
  recovery server, jeopardy protection with every copy live, kill -9 of every node,
  a full disk (when the data directory can be put on a small tmpfs of its own),
  and snapshots taken (and the oldest deleted), clones of them made (and the oldest
  deleted) and the volume reverted to one, among the other faults.

After each round every fault is healed; the round passes when every node's
metadata shows every copy of vol0 live under one primary, every copy has the same
checksum root, and every tracked block read through every node's NBD port holds
the last version acknowledged before a successful flush or a version written after
it: never an older one, never zeroes where something was flushed, never anything
that was not written. A read error after the heal fails the round unless the
block is in the volume's listed unrecoverable ranges. Every snapshot the cluster
names is read through every node too: the same bytes everywhere, each block a
version flushed before the snapshot command started or sent before it returned; a
snapshot the command reported taken must be named (until deleted). Every clone
the cluster names is read the same way, against its snapshot's bounds, once it is
whole (a clone still being made after the heal must be whole or gone within a
minute); a clone the command reported made must be named (until deleted). A revert
runs with the clients paused: the blocks' flushed floor drops to the snapshot's, the
writes acknowledged before it are vouched for by no later flush, and, when it
reports success, every tracked block read through the primary right after it must
be a version the snapshot may hold.

Every block's content names the block and the version and is a hash stream of
both, so a misplaced or torn block is caught, not just a stale one.

The same seed gives the same fault schedule (the timings of a real cluster are not
replayable; the schedule is). Each round is one JSON line on stdout and in
DATA.jsonl; the exit status is 1 on any violation.

Usage: scripts/chaos.py [--rounds N] [--seed S] [--data DIR] [--bin PATH]
                        [--port-base P] [--tmpfs] [--keep]
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import nbd

BLOCK = 4096
EXTENT = 16  # blocks per tracked extent
MAGIC = b"LZCHAOS1"
VOLUME = "vol0"


def content(run, blk, ver):
    head = MAGIC + struct.pack("<QQ", blk, ver)
    body = hashlib.shake_128(b"%d:%d:%d" % (run, blk, ver)).digest(BLOCK - len(head))
    return head + body


def decode(run, blk, data):
    """The version a block holds: 0 for zeroes, None for anything not written."""
    if data == bytes(BLOCK):
        return 0
    if not data.startswith(MAGIC):
        return None
    b, v = struct.unpack("<QQ", data[8:24])
    if b != blk or data != content(run, blk, v):
        return None
    return v


class Timeout(Exception):
    pass


def wait_cmd(h, cookie, deadline):
    while True:
        if h.aio_command_completed(cookie):  # raises nbd.Error on a failed command
            return
        if time.monotonic() > deadline:
            raise Timeout("command timed out")
        h.poll(100)


def connect(uri, within):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # the URI names the TLS credentials' directory
    h.aio_connect_uri(uri)
    deadline = time.monotonic() + within
    while h.aio_is_connecting():
        if time.monotonic() > deadline:
            del h  # libnbd closes a handle when the last reference goes
            raise Timeout("handshake timed out")
        h.poll(100)
    if not h.aio_is_ready():
        del h
        raise nbd.Error("connection failed", 0)
    return h


class Tracker:
    """What the client knows of each tracked block."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.tried = {b: 0 for b in blocks}  # highest version sent (acked or not)
        self.durable = {b: 0 for b in blocks}  # acked before a successful flush
        self.lock = threading.Lock()
        self.run = None

    def check(self, blk, ver):
        """None when `ver` is a version the block may hold, else why not."""
        if ver is None:
            return "holds data never written to it"
        if ver < self.durable[blk]:
            return f"holds version {ver}, older than flushed version {self.durable[blk]}"
        if ver > self.tried[blk]:
            return f"holds version {ver}, never written (highest sent {self.tried[blk]})"
        return None


class Writer(threading.Thread):
    """One libnbd client on its own extents, through one node and, after an error, the
    next. A flush covers the writes this client had acknowledged before sending it."""

    def __init__(self, run, uris, tracker, rng, stats, extents):
        super().__init__(daemon=True)
        self.run_id = run
        self.uris = uris
        self.t = tracker
        self.rng = rng
        self.stats = stats
        self.h = None
        self.node = 0
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.violations = []
        self.extents = extents
        self.acked = {}  # acknowledged since the last flush was sent: blk -> ver
        # One read buffer, reused: libnbd's Python binding keeps every Buffer passed to
        # aio_pread alive (a fresh one per read leaked 64 KiB a read, 11 GB a soak).
        self.rbuf = nbd.Buffer(EXTENT * BLOCK)

    def log_violation(self, what):
        self.violations.append(what)
        print(f"VIOLATION (during faults): {what}", file=sys.stderr, flush=True)

    def drop_handle(self):
        self.h = None  # libnbd closes the handle and its socket
        # A flush covers the writes acknowledged on its own connection: those acknowledged
        # on a connection that failed may have died with the server that held them
        # unflushed (kill -9 of every node), and no later flush can vouch for them.
        self.acked.clear()
        self.node = (self.node + 1) % len(self.uris)

    def run(self):
        since_flush = 0
        flush_every = self.rng.randint(1, 8)
        while not self.stop.is_set():
            if self.paused.is_set():
                self.idle.set()
                time.sleep(0.05)
                continue
            self.idle.clear()
            try:
                if self.h is None:
                    self.h = connect(self.uris[self.node], 10)
                dl = time.monotonic() + 45
                r = self.rng.random()
                if r < 0.15:
                    # Read a tracked extent back and check it.
                    ext = self.rng.choice(self.extents)
                    buf = self.rbuf
                    wait_cmd(self.h, self.h.aio_pread(buf, ext * BLOCK), dl)
                    data = buf.to_bytearray()
                    self.stats["reads"] += 1
                    with self.t.lock:
                        for i in range(EXTENT):
                            blk = ext + i
                            if blk not in self.t.tried:
                                continue
                            why = self.t.check(blk, decode(self.run_id, blk, bytes(data[i * BLOCK:(i + 1) * BLOCK])))
                            if why:
                                self.log_violation(f"read via {self.uris[self.node]}: block {blk} {why}")
                    continue
                ext = self.rng.choice(self.extents)
                first = self.rng.randrange(EXTENT)
                n = self.rng.randint(1, EXTENT - first)
                blks = [ext + first + i for i in range(n)]
                with self.t.lock:
                    vers = [self.t.tried[b] + 1 for b in blks]
                    for b, v in zip(blks, vers):
                        self.t.tried[b] = v
                payload = b"".join(content(self.run_id, b, v) for b, v in zip(blks, vers))
                wait_cmd(self.h, self.h.aio_pwrite(payload, blks[0] * BLOCK), dl)
                self.stats["writes_acked"] += 1
                for b, v in zip(blks, vers):
                    self.acked[b] = v
                since_flush += 1
                if since_flush >= flush_every:
                    covered = dict(self.acked)
                    wait_cmd(self.h, self.h.aio_flush(), time.monotonic() + 45)
                    self.stats["flushes_acked"] += 1
                    with self.t.lock:
                        for b, v in covered.items():
                            if v > self.t.durable[b]:
                                self.t.durable[b] = v
                            if self.acked.get(b) == v:
                                del self.acked[b]
                    since_flush = 0
                    flush_every = self.rng.randint(1, 8)
            except (nbd.Error, Timeout) as e:
                self.stats["client_errors"] += 1
                self.stats["last_error"] = str(e)[:200]
                self.drop_handle()
                time.sleep(0.2)
        self.drop_handle()
        self.idle.set()

    def pause(self):
        self.paused.set()
        self.idle.wait(120)

    def resume(self):
        self.idle.clear()
        self.paused.clear()


class Cluster:
    def __init__(self, args):
        self.args = args
        self.data = os.path.abspath(args.data)
        self.base = args.port_base
        self.proc = None
        self.tmpfs = False

    def cli(self, *a, check=True):
        try:
            r = subprocess.run([self.args.bin, *a, "--data", self.data], capture_output=True, text=True,
                               timeout=90)
        except subprocess.TimeoutExpired:
            # A node held by SIGSTOP does not answer its admin API; the CLI gives up
            # after 60 s. Only a command that must work (kill, revive) is an error.
            if check:
                raise
            return None
        if check and r.returncode != 0:
            raise RuntimeError(f"lazarus {' '.join(a)} failed: {r.stdout}{r.stderr}")
        return r

    def uri(self, n):
        # NBD over TLS, as `lazarus up` requires by default, with the client
        # credentials it made: every client byte of the campaign goes through TLS.
        certs = os.path.join(self.data, "nbd-tls", "client")
        return f"nbds://127.0.0.1:{self.base + n - 1}/{VOLUME}?tls-certificates={certs}"

    def get(self, n, path):
        try:
            with open(os.path.join(self.data, "admin.token")) as f:
                token = f.readline().strip()
            req = urllib.request.Request(f"http://127.0.0.1:{self.base + 10 + n - 1}{path}",
                                         headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.load(r)
        except Exception:
            return None

    def start(self):
        if os.path.exists(self.data):
            if os.path.ismount(self.data):
                subprocess.run(["umount", self.data], check=False)
            shutil.rmtree(self.data)
        os.makedirs(self.data)
        if self.args.tmpfs:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.tmpfs_mib}m", "tmpfs", self.data],
                               capture_output=True)
            self.tmpfs = r.returncode == 0
            if not self.tmpfs:
                print("chaos: no tmpfs (not root?); the full-disk fault is left out", file=sys.stderr)
        log = open(self.data + ".up.log", "w")
        self.proc = subprocess.Popen(
            [self.args.bin, "up", "--data", self.data, "--port-base", str(self.base),
             "--volume-size", f"{self.args.volume_mib}MiB"],
            stdout=subprocess.PIPE, stderr=log, text=True)
        t0 = time.monotonic()
        for line in self.proc.stdout:
            if "Press Ctrl-C" in line:
                break
            if time.monotonic() - t0 > 120:
                raise RuntimeError("lazarus up did not come up")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmpfs and not self.args.keep:
            subprocess.run(["umount", "-l", self.data], check=False)

    def pid(self, node):
        try:
            with open(os.path.join(self.data, node, "endpoints.json")) as f:
                return json.load(f)["pid"]
        except Exception:
            return None

    def meta(self, n):
        c = self.get(n, "/api/v1/cluster")
        if not c:
            return None
        return c.get("metadata", {}).get("volumes", {}).get(VOLUME)

    def primary(self):
        for n in (1, 2, 3):
            m = self.meta(n)
            if m and m.get("primary"):
                return f"n{m['primary']}"
        return "n1"

    def healed(self, roots=True):
        """None when every node agrees every copy is live (and, with `roots`, every copy's
        checksum root is equal: only meaningful with the clients paused, as every write
        moves the roots); else why not."""
        views = [self.get(n, "/api/v1/cluster") for n in (1, 2, 3)]
        if any(v is None for v in views):
            return "a node's admin API does not answer"
        for n, v in zip((1, 2, 3), views):
            if not v.get("ready"):
                return f"n{n} is not ready ({v.get('view')})"
        metas = [v.get("metadata", {}).get("volumes", {}).get(VOLUME) for v in views]
        if any(m is None for m in metas):
            return "a node has no metadata for the volume"
        for n, m in zip((1, 2, 3), metas):
            if not all(s == "live" for s in m.get("states", {}).values()):
                return f"n{n} sees copies {m.get('states')}"
        if len({(m.get("primary"), m.get("epoch")) for m in metas}) != 1:
            return "nodes disagree on the primary: " + str([(m.get("primary"), m.get("epoch")) for m in metas])
        if not roots:
            return None
        roots = [(self.get(n, f"/api/v1/volumes/{VOLUME}") or {}).get("root") for n in (1, 2, 3)]
        if None in roots or len(set(roots)) != 1:
            return f"roots differ: {roots}"
        return None

    def unrecoverable(self):
        lbas = set()
        for n in (1, 2, 3):
            v = self.get(n, f"/api/v1/volumes/{VOLUME}") or {}
            for r in v.get("unrecoverable", []):
                lbas.update(range(r["first_lba"], r["first_lba"] + r["count"]))
        return lbas


class Faults:
    """Injects and heals faults through the CLI and signals."""

    KINDS = ["kill1", "kill2", "sigstop", "drop", "stall", "isolate", "corrupt", "eio", "device", "rs_kill",
             "rs_sigstop", "full_disk", "protect", "kill_all", "rs_cut", "meta_fail", "snapshot", "clone",
             "revert"]

    def __init__(self, cl, rng, blocks, tracker):
        self.cl = cl
        self.rng = rng
        self.blocks = blocks
        self.tracker = tracker
        self.killed = []
        self.stopped = []  # (name, pid)
        self.ballast = None
        self.protected = False
        self.snap_seq = 0
        self.outcomes = []
        # Snapshots taken: name -> {"lo": flushed versions when the command started,
        # "hi": versions sent when it returned, "taken": it reported success,
        # "deleted": a deletion of it reported success}
        self.snaps = {}
        self.clone_seq = 0
        # Clones asked for: name -> {"snap", "lo", "hi" (the snapshot's bounds), "made":
        # the command reported success, "deleted": a deletion of it reported success}
        self.clones = {}
        # Clone commands still running: name -> process.
        self.making = {}
        # The clients, paused for a revert.
        self.writers = []
        # Found while injecting (a revert's reads).
        self.violations = []

    def kept_snapshots(self):
        return [n for n, v in self.snaps.items() if v["taken"] and not v["deleted"]]

    def kill(self, n):
        """kill -9 through the CLI; False when it could not (on a full disk the CLI
        cannot write the marker that keeps the supervisor from restarting the node)."""
        r = self.cl.cli("fault", "kill", "--node", n, check=False)
        if r is not None and r.returncode == 0:
            self.killed.append(n)
            return True
        return False

    def inject(self, kind):
        cl, rng = self.cl, self.rng
        # Faults go through a node's admin API: not to a node held by SIGSTOP.
        held = {n for n, _ in self.stopped}
        nodes = [n for n in ("n1", "n2", "n3") if n not in held]
        if not nodes:
            return f"{kind} (skipped: every node stopped)"
        prim = cl.primary()
        if prim in held:
            prim = nodes[0]
        live = [n for n in self.killed if n != "rs"]
        if kind == "kill1":
            n = rng.choice(nodes + [prim])  # the primary twice as likely
            if n not in self.killed and len(live) < 2 and not self.kill(n):
                return f"kill -9 {n} (refused)"
            return f"kill -9 {n}"
        if kind == "kill2":
            other = rng.choice([n for n in nodes if n != prim])
            done = []
            for n in (prim, other):
                live = [k for k in self.killed if k != "rs"]
                if n not in self.killed and len(live) < 2 and self.kill(n):
                    done.append(n)
                    time.sleep(rng.choice([0, 0, 0.3, 1.5]))
            return f"kill -9 {' '.join(done)}"
        if kind == "sigstop":
            n = rng.choice(nodes + [prim])
            pid = cl.pid(n)
            if pid and n not in self.killed:
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append((n, pid))
            return f"SIGSTOP {n}"
        if kind in ("drop", "stall"):
            a = rng.choice([prim, prim, rng.choice(nodes)])
            others = [n for n in nodes if n != a]
            if not others:
                return f"{kind} (skipped: no other node running)"
            b = rng.choice(others)
            cl.cli("fault", kind, "--from", a, "--to", b, check=False)
            return f"{kind} {a}->{b}"
        if kind == "isolate":
            n = rng.choice(nodes + [prim])
            cl.cli("fault", "isolate", "--node", n, check=False)
            return f"isolate {n}"
        if kind in ("corrupt", "eio"):
            n = rng.choice(nodes)
            lba = rng.choice(self.blocks)
            if kind == "corrupt":
                target = rng.choice(["slice", "checksum", "block"])
                cl.cli("fault", "corrupt", "--node", n, "--volume", VOLUME, "--lba", str(lba), "--target", target,
                       check=False)
                return f"corrupt {target} lba {lba} on {n}"
            cl.cli("fault", "eio", "--node", n, "--volume", VOLUME, "--lba", str(lba), check=False)
            return f"eio lba {lba} on {n}"
        if kind == "device":
            n = rng.choice(nodes)
            cl.cli("fault", "device", "--node", n, "fail", check=False)
            return f"device fail {n}"
        if kind == "meta_fail":
            # Every write of the node's Raft store fails: at its next metadata write it
            # exits and `lazarus up` restarts it (or `fault heal` ends the fault first).
            n = rng.choice(nodes + [prim])
            cl.cli("fault", "metadata", "--node", n, "fail", check=False)
            # A metadata change for every member to write (steady state writes none).
            cl.cli("volume", "create", "chaosmeta", "--size", "1MiB", check=False)
            cl.cli("volume", "delete", "chaosmeta", check=False)
            return f"metadata store fails on {n}"
        if kind == "rs_kill":
            if "rs" not in self.killed and not self.kill("rs"):
                return "kill -9 rs (refused)"
            return "kill -9 rs"
        if kind == "rs_sigstop":
            pid = cl.pid("rs")
            if pid and "rs" not in self.killed and "rs" not in held:
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append(("rs", pid))
            return "SIGSTOP rs"
        if kind == "rs_cut":
            n = rng.choice(nodes + [prim])
            cl.cli("fault", "isolate", "--node", n, "--recovery-server", check=False)
            return f"cut {n} from rs"
        if kind == "protect":
            # Jeopardy protection with every copy live: each write goes to the
            # recovery server first.
            if cl.cli("volume", "protect", VOLUME, check=False):
                self.protected = True
            return f"volume protect {VOLUME}"
        if kind == "kill_all":
            # Every node at once (and sometimes the recovery server): nothing but the
            # disks survives; every flushed write must still be there after the restart.
            victims = [n for n in ("n1", "n2", "n3") if n not in self.killed]
            if rng.random() < 0.3 and "rs" not in self.killed and "rs" not in held:
                victims.append("rs")
            done = [n for n in victims if n not in held and self.kill(n)]
            return f"kill -9 {' '.join(done)}" if done else "kill -9 (none left to kill)"
        if kind == "snapshot":
            # Taken while the clients write (and the other faults of the round run);
            # at most three are kept: the oldest is deleted.
            self.snap_seq += 1
            name = f"c{self.snap_seq}"
            with self.tracker.lock:
                lo = dict(self.tracker.durable)
            r = cl.cli("snapshot", "create", VOLUME, name, check=False)
            with self.tracker.lock:
                hi = dict(self.tracker.tried)
            taken = r is not None and r.returncode == 0
            self.snaps[name] = {"lo": lo, "hi": hi, "taken": taken, "deleted": False}
            why = "" if taken or r is None else ": " + (r.stderr or r.stdout).strip()[:160]
            out = f"snapshot {name} ({'taken' if taken else 'failed'}{why})"
            kept = [n for n, v in self.snaps.items() if not v["deleted"]]
            if len(kept) > 3:
                old = kept[0]
                d = cl.cli("snapshot", "delete", VOLUME, old, check=False)
                if d is not None and d.returncode == 0:
                    self.snaps[old]["deleted"] = True
                out += f", delete {old}"
            return out
        if kind == "clone":
            # The clone is made among the round's faults; at most two are kept.
            kept = self.kept_snapshots()
            if not kept:
                return "clone (skipped: no snapshot taken)"
            snap = rng.choice(kept)
            self.clone_seq += 1
            name = f"cl{self.clone_seq}"
            # In the background: the round's next faults (a kill of the primary among
            # them) may cut it; its outcome is collected at the heal.
            rec = self.snaps[snap]
            self.clones[name] = {"snap": snap, "lo": rec["lo"], "hi": rec["hi"], "made": False, "deleted": False}
            self.making[name] = subprocess.Popen(
                [cl.args.bin, "volume", "clone", f"{VOLUME}@{snap}", name, "--data", cl.data],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out = f"clone {VOLUME}@{snap} into {name} (started)"
            kept = [n for n, v in self.clones.items() if not v["deleted"] and n not in self.making]
            if len(kept) > 2:
                old = kept[0]
                d = cl.cli("volume", "delete", old, check=False)
                if d is not None and d.returncode == 0:
                    self.clones[old]["deleted"] = True
                out += f", delete {old}"
            return out
        if kind == "revert":
            kept = self.kept_snapshots()
            if not kept:
                return "revert (skipped: no snapshot taken)"
            snap = rng.choice(kept)
            rec = self.snaps[snap]
            # The clients paused, nothing in flight: after the revert (or one cut off,
            # which may have happened) a block holds the snapshot's version or a later
            # one, and no flush vouches for a write acknowledged before it.
            for w in self.writers:
                w.pause()
            for w in self.writers:
                w.acked.clear()
            with self.tracker.lock:
                for b in self.tracker.durable:
                    self.tracker.durable[b] = min(self.tracker.durable[b], rec["lo"][b])
            r = cl.cli("volume", "revert", VOLUME, snap, check=False)
            done = r is not None and r.returncode == 0
            checked = 0
            if done:
                prim = int(cl.primary()[1:])
                v, _ = read_frozen(cl, prim, VOLUME, rec, self.tracker.run, f"{VOLUME} just reverted to {snap}")
                self.violations += v
                checked = 1
            for w in self.writers:
                w.resume()
            why = "" if done or r is None else ": " + (r.stderr or r.stdout).strip()[:160]
            return f"revert {VOLUME} to {snap} ({'done, read back' if checked else 'failed'}{why})"
        if kind == "full_disk":
            if not cl.tmpfs or self.ballast:
                return "full disk (skipped)"
            self.ballast = os.path.join(cl.data, "ballast")
            st = os.statvfs(cl.data)
            free = st.f_bavail * st.f_frsize
            with open(self.ballast, "wb") as f:
                try:
                    f.write(bytes(max(free - 64 * 1024, 0)))
                except OSError:
                    pass
            return "full disk"
        raise ValueError(kind)

    def heal(self):
        cl = self.cl
        for _, pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stopped = []
        if self.ballast:
            os.unlink(self.ballast)
            self.ballast = None
        cl.cli("fault", "heal", check=False)
        if self.protected:
            cl.cli("volume", "unprotect", VOLUME, check=False)
            self.protected = False
        for n in ("n1", "n2", "n3"):
            cl.cli("fault", "device", "--node", n, "heal", check=False)
        order = list(self.killed)
        self.rng.shuffle(order)
        for n in order:
            cl.cli("fault", "revive", "--node", n)
            time.sleep(self.rng.choice([0, 0.5, 2]))
        self.killed = []
        self.outcomes = []
        for name, p in self.making.items():
            try:
                out, err = p.communicate(timeout=150)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            made = p.returncode == 0
            self.clones[name]["made"] = made
            why = "" if made else ": " + (err or out).strip()[:160]
            self.outcomes.append(f"clone {name} {'made' if made else 'failed'}{why}")
        self.making = {}


VERIFY_BUFFERS = (nbd.Buffer(EXTENT * BLOCK), nbd.Buffer(BLOCK))


def verify(cl, tracker, run):
    """Reads every tracked block through every node; returns (violations, read errors)."""
    violations, errors = [], []
    unrec = None
    exts = sorted({b - b % EXTENT for b in tracker.blocks})
    buf, b1 = VERIFY_BUFFERS  # reused: see Writer.rbuf
    for n in (1, 2, 3):
        try:
            h = connect(cl.uri(n), 40)
        except (nbd.Error, Timeout) as e:
            errors.append(f"n{n}: cannot connect: {e}")
            continue
        for ext in exts:
            try:
                wait_cmd(h, h.aio_pread(buf, ext * BLOCK), time.monotonic() + 30)
                data = bytes(buf.to_bytearray())
                chunks = [(ext + i, data[i * BLOCK:(i + 1) * BLOCK]) for i in range(EXTENT)]
            except (nbd.Error, Timeout):
                # Block by block, to name the ones that fail.
                chunks = []
                for i in range(EXTENT):
                    try:
                        wait_cmd(h, h.aio_pread(b1, (ext + i) * BLOCK), time.monotonic() + 30)
                        chunks.append((ext + i, bytes(b1.to_bytearray())))
                    except (nbd.Error, Timeout) as e:
                        if unrec is None:
                            unrec = cl.unrecoverable()
                        if ext + i in unrec:
                            continue
                        errors.append(f"n{n}: read of block {ext + i} failed: {e}")
            for blk, d in chunks:
                if blk not in tracker.tried:
                    continue
                why = tracker.check(blk, decode(run, blk, d))
                if why:
                    violations.append(f"n{n}: block {blk} {why}")
        del h
    return violations, errors, sorted(unrec or [])


def named_snapshots(cl):
    for n in (1, 2, 3):
        m = cl.meta(n)
        if m is not None:
            return set(m.get("snapshots", {}).keys())
    return None


def read_frozen(cl, n, export, rec, run, label):
    """Reads every tracked block of `export` (a snapshot, a clone, the volume just
    reverted) through node n against the snapshot's bounds `rec` ("lo": versions
    flushed before it was taken, "hi": versions sent when it returned); returns
    (violations, image or None when the node could not be read)."""
    violations = []
    exts = sorted({b - b % EXTENT for b in rec["lo"]})
    buf = VERIFY_BUFFERS[0]
    uri = cl.uri(n).replace(f"/{VOLUME}?", f"/{export}?")
    try:
        # A copy that missed a snapshot serves it through another until it has
        # installed it.
        h = connect(uri, 40)
    except (nbd.Error, Timeout) as e:
        return [], f"n{n}: {label}: cannot connect: {e}"
    img = {}
    for ext in exts:
        try:
            wait_cmd(h, h.aio_pread(buf, ext * BLOCK), time.monotonic() + 30)
        except (nbd.Error, Timeout) as e:
            del h
            return violations, f"n{n}: {label}: read of extent {ext} failed: {e}"
        data = bytes(buf.to_bytearray())
        for i in range(EXTENT):
            blk = ext + i
            if blk not in rec["lo"]:
                continue
            d = data[i * BLOCK:(i + 1) * BLOCK]
            img[blk] = d
            v = decode(run, blk, d)
            if v is None:
                violations.append(f"n{n}: {label}: block {blk} holds data never written to it")
            elif v < rec["lo"][blk]:
                violations.append(f"n{n}: {label}: block {blk} holds version {v}, older than "
                                  f"version {rec['lo'][blk]} flushed before the snapshot")
            elif v > rec["hi"][blk]:
                violations.append(f"n{n}: {label}: block {blk} holds version {v}, sent after "
                                  f"the snapshot returned (then at {rec['hi'][blk]})")
    del h
    return violations, img


def check_frozen(cl, export, rec, run, label):
    """`read_frozen` through every node, and the same bytes everywhere; returns
    (violations, read errors)."""
    violations, errors, images = [], [], {}
    for n in (1, 2, 3):
        v, img = read_frozen(cl, n, export, rec, run, label)
        violations += v
        if isinstance(img, str):
            errors.append(img)
        else:
            images[n] = img
    if len(images) > 1:
        first = next(iter(images.values()))
        for n, img in images.items():
            diff = [b for b in img if first.get(b, img[b]) != img[b]]
            if diff:
                violations.append(f"n{n}: {label} differs from another node's at blocks {diff[:5]}")
    return violations, errors


def verify_snapshots(cl, faults, run):
    """Reads every tracked block of every snapshot the cluster names through every node;
    returns (violations, read errors)."""
    violations, errors = [], []
    named = named_snapshots(cl)
    if named is None:
        return [], ["no node answers with the metadata"]
    for name in sorted(named - set(faults.snaps)):
        violations.append(f"the cluster names a snapshot nobody took: {name}")
    for name, rec in list(faults.snaps.items()):
        if name not in named:
            if rec["taken"] and not rec["deleted"]:
                violations.append(f"snapshot {name}, reported taken, is not named by the cluster")
            # Never named, or deleted: gone for good.
            del faults.snaps[name]
            continue
        v, e = check_frozen(cl, f"{VOLUME}@{name}", rec, run, f"snapshot {name}")
        violations += v
        errors += e
    return violations, errors


def volumes_meta(cl):
    for n in (1, 2, 3):
        c = cl.get(n, "/api/v1/cluster")
        if c:
            return c.get("metadata", {}).get("volumes", {})
    return None


def verify_clones(cl, faults, run):
    """Each clone the cluster names, once whole (every copy live, made), read through
    every node against its snapshot's bounds; a clone reported made must be named, and
    one still being made must be whole or gone within a minute. Returns (violations,
    read errors)."""
    violations, errors = [], []
    for name, rec in list(faults.clones.items()):
        t0 = time.monotonic()
        while True:
            vols = volumes_meta(cl)
            if vols is None:
                return violations, errors + ["no node answers with the metadata"]
            m = vols.get(name)
            if m is None:
                if rec["made"] and not rec["deleted"]:
                    violations.append(f"clone {name}, reported made, is not named by the cluster")
                del faults.clones[name]
                break
            whole = m.get("cloning") is None and all(s == "live" for s in m.get("states", {}).values())
            if whole:
                v, e = check_frozen(cl, name, rec, run, f"clone {name} of {VOLUME}@{rec['snap']}")
                violations += v
                errors += e
                break
            if time.monotonic() - t0 > 60:
                errors.append(f"clone {name} neither whole nor gone a minute after the heal: {m}")
                break
            time.sleep(0.5)
    return violations, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--data", default="/tmp/lazarus-chaos")
    ap.add_argument("--bin", default=os.path.join(here, "..", "target", "release", "lazarus"))
    ap.add_argument("--port-base", type=int, default=21000)
    ap.add_argument("--volume-mib", type=int, default=64)
    ap.add_argument("--extents", type=int, default=24, help="tracked extents of 16 blocks")
    ap.add_argument("--tmpfs", action="store_true", help="put the data directory on a tmpfs of its own (root)")
    ap.add_argument("--tmpfs-mib", type=int, default=900)
    ap.add_argument("--heal-within", type=float, default=120)
    ap.add_argument("--kinds", default=",".join(Faults.KINDS), help="fault kinds to draw from")
    ap.add_argument("--keep", action="store_true", help="leave the cluster's data directory behind")
    ap.add_argument("--stop-on-failure", action="store_true", help="stop at the first failed round")
    ap.add_argument("--pace", type=float, default=1.0,
                    help="scales the pauses between a round's faults and before its heal (0.5: rounds "
                         "about twice as short; the same seed draws the same schedule)")
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        sys.exit(f"chaos: no lazarus binary at {args.bin} (cargo build --release, or --bin)")

    rng = random.Random(args.seed)
    run = args.seed
    nblocks = args.volume_mib * 1024 * 1024 // BLOCK
    starts = rng.sample(range(0, nblocks, EXTENT), args.extents)
    blocks = sorted(s + i for s in starts for i in range(EXTENT))
    tracker = Tracker(blocks)
    stats = {"writes_acked": 0, "flushes_acked": 0, "reads": 0, "client_errors": 0, "last_error": ""}
    kinds = args.kinds.split(",")

    cl = Cluster(args)
    cl.start()
    jl = open(cl.data + ".jsonl", "a")
    # Two clients on disjoint extents, one entering through n1, the other through n2
    # (forwarded to the primary when n2 is not).
    uris = [cl.uri(n) for n in (1, 2, 3)]
    writers = [Writer(run, uris[i:] + uris[:i], tracker, random.Random(rng.random()), stats, sorted(starts)[i::2])
               for i in (0, 1)]
    for w in writers:
        w.start()
    faults = Faults(cl, rng, blocks, tracker)
    faults.writers = writers
    tracker.run = run
    totals = {"rounds": 0, "failed": 0, "violations": 0, "read_errors": 0, "faults": {}}
    t_start = time.monotonic()
    try:
        time.sleep(2)
        for rnd in range(1, args.rounds + 1):
            t0 = time.monotonic()
            k = rng.choice([1, 1, 1, 2, 2, 3])
            chosen = [rng.choice(kinds) for _ in range(k)]
            done = []
            for w in writers:
                w.resume()
            for kind in chosen:
                done.append(faults.inject(kind))
                totals["faults"][kind] = totals["faults"].get(kind, 0) + 1
                time.sleep(rng.uniform(0.2, 3.0) * args.pace)
            time.sleep(rng.uniform(1.0, 5.0) * args.pace)
            faults.heal()
            done += faults.outcomes
            healed_in = None
            t_heal = time.monotonic()
            why = "not checked"
            # Every copy live under one primary, the clients still writing; then the
            # clients pause (after a second more on the healed cluster) and the roots
            # must agree: nothing is in flight any more.
            paused = False
            while time.monotonic() - t_heal < args.heal_within:
                why = cl.healed(roots=paused)
                if why is None and not paused:
                    time.sleep(1)
                    for w in writers:
                        w.pause()
                    paused = True
                    continue
                if why is None:
                    healed_in = time.monotonic() - t_heal
                    break
                time.sleep(0.5)
            for w in writers:
                w.pause()
            viol, errs, unrec = verify(cl, tracker, run)
            sviol, serrs = verify_snapshots(cl, faults, run)
            viol += sviol
            errs += serrs
            cviol, cerrs = verify_clones(cl, faults, run)
            viol += cviol + faults.violations
            errs += cerrs
            faults.violations = []
            if healed_in is None:
                # Checked again after the reads: a slow heal is a failure, a stuck one more so.
                why = cl.healed() or why
            viol = [v for w in writers for v in w.violations] + viol
            for w in writers:
                w.violations = []
            ok = healed_in is not None and not viol and not errs
            totals["rounds"] += 1
            totals["failed"] += 0 if ok else 1
            totals["violations"] += len(viol)
            totals["read_errors"] += len(errs)
            rec = {"round": rnd, "seed": args.seed, "faults": done, "ok": ok,
                   "healed_s": None if healed_in is None else round(healed_in, 1),
                   "not_healed": None if healed_in is not None else why,
                   "violations": viol[:10], "n_violations": len(viol),
                   "read_errors": errs[:10], "n_read_errors": len(errs), "unrecoverable": unrec[:10],
                   "round_s": round(time.monotonic() - t0, 1), **{k: v for k, v in stats.items()}}
            print(json.dumps(rec), flush=True)
            jl.write(json.dumps(rec) + "\n")
            jl.flush()
            if not ok and args.stop_on_failure:
                break
    finally:
        for w in writers:
            w.stop.set()
            w.resume()
        for w in writers:
            w.join(60)
        faults.heal()
        cl.stop()
        if not args.keep:
            shutil.rmtree(cl.data, ignore_errors=True)
    totals["seconds"] = round(time.monotonic() - t_start)
    totals.update({k: v for k, v in stats.items() if k != "last_error"})
    print(json.dumps({"summary": totals}), flush=True)
    sys.exit(1 if totals["failed"] else 0)


if __name__ == "__main__":
    main()
