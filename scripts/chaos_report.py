#!/usr/bin/python3
"""Sums up chaos campaign results (the JSON lines `scripts/chaos.py` prints, or its
DATA.jsonl files): one Markdown row per file for RELIABILITY.md, then the fault mix
over all of them, then every failed round.

Usage: scripts/chaos_report.py FILE...
"""
import collections
import json
import re
import sys


def rounds_of(path):
    out = []
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "round" in r:
            out.append(r)
    return out


def kind_of(fault):
    """The fault kind of one entry of a round's `faults` list."""
    f = re.sub(r"\(.*\)", "", fault).strip()
    for prefix, kind in [("kill -9 rs", "rs_kill"), ("SIGSTOP rs", "rs_sigstop"), ("SIGSTOP", "sigstop"),
                         ("cut", "rs_cut"), ("volume protect", "protect"), ("full disk", "full_disk"),
                         ("device fail", "device"), ("corrupt", "corrupt"), ("eio", "eio"), ("isolate", "isolate"),
                         ("drop", "drop"), ("stall", "stall")]:
        if f.startswith(prefix):
            return kind
    if f.startswith("kill -9"):
        n = len(f.split()) - 2
        if n == 0:
            return "kill (none left)"
        return {1: "kill1", 2: "kill2"}.get(n, "kill_all")
    return f


def main():
    mix = collections.Counter()
    failed = []
    total = collections.Counter()
    print("| seed | rounds | failed rounds | violations | read errors | writes / flushes acknowledged | mean round |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for path in sys.argv[1:]:
        rs = rounds_of(path)
        if not rs:
            continue
        seed = rs[0].get("seed")
        bad = [r for r in rs if not r["ok"]]
        viol = sum(r["n_violations"] for r in rs)
        errs = sum(r["n_read_errors"] for r in rs)
        last = rs[-1]
        mean = sum(r["round_s"] for r in rs) / len(rs)
        print(f"| {seed} | {len(rs)} | {len(bad)} | {viol} | {errs} | "
              f"{last['writes_acked']:,} / {last['flushes_acked']:,} | {mean:.1f} s |")
        for r in rs:
            for f in r["faults"]:
                mix[kind_of(f)] += 1
        failed += [(path, r) for r in bad]
        total.update(rounds=len(rs), failed=len(bad), violations=viol, read_errors=errs,
                     writes=last["writes_acked"], flushes=last["flushes_acked"])
    print()
    print(f"total: {total['rounds']} rounds, {total['failed']} failed, {total['violations']} violations, "
          f"{total['read_errors']} read errors, {total['writes']:,} writes and {total['flushes']:,} flushes "
          "acknowledged")
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in mix.most_common()))
    for path, r in failed:
        print(f"FAILED {path} round {r['round']}: {r['faults']} not_healed={r['not_healed']} "
              f"violations={r['violations'][:3]} read_errors={r['read_errors'][:3]}")


if __name__ == "__main__":
    main()
