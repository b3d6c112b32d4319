//! Guards the Repair issue: a primary's damaged slice pages are rebuilt from live or
//! dead replicas wherever the Merkle checksums prove a copy current, and otherwise
//! answer EIO — never wrong data. Real `lazarus up` clusters, real clients (qemu-io),
//! damage injected on disk with `lazarus fault corrupt`.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let o = run_out("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let ok = o.status.success() && !text.contains("error") && !text.contains("failed");
    (ok, text)
}

fn must(uri: &str, cmds: &[&str]) {
    let (ok, text) = qemu_io(uri, cmds);
    assert!(ok, "qemu-io {cmds:?}: {text}");
}

fn events(up: &Up) -> Vec<Value> {
    up.get(1, "/api/v1/repairs").unwrap()["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn source_of(up: &Up, page: u64) -> String {
    events(up)
        .iter()
        .rev()
        .find(|e| e["page"] == page)
        .and_then(|e| e["source"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn corrupt(up: &Up, node: &str, lba: u64) {
    let out = up.cli_ok(&[
        "fault",
        "corrupt",
        "--node",
        node,
        "--volume",
        "vol0",
        "--lba",
        &lba.to_string(),
    ]);
    assert!(out.contains("damaged"), "{out}");
}

/// The patent's FIG. 7 story, without a recovery server: pages written while both
/// replicas were live, after one died, and after both died; each damaged on the
/// primary; reads repair the first from either dead replica, the second only from the
/// replica that died later, and answer the third with EIO (until it is rewritten whole).
#[test]
fn fig7_three_phases_then_damage() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start_with(&tmp.path().join("c"), "64MiB", &["--no-recovery-server"]);
    let u = up.uri(1, "vol0");
    // Phase 1: both replicas live. Page 0.
    must(&u, &["write -P 0x11 0 1M", "flush"]);
    // Phase 2: n3 dead (replication to it cut). Page 1.
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    must(&u, &["write -P 0x22 1M 1M", "flush"]);
    // Phase 3: n2 dead too. Page 2.
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    must(&u, &["write -P 0x33 2M 1M", "flush"]);
    let m = up.volume_meta(1, "vol0").unwrap();
    assert_eq!(m["states"]["2"], "dead", "{m}");
    assert_eq!(m["states"]["3"], "dead", "{m}");

    for lba in [0, 256, 512] {
        corrupt(&up, "n1", lba);
    }
    // Reads repair before answering.
    must(&u, &["read -P 0x11 0 1M"]);
    let s0 = source_of(&up, 0);
    assert!(s0 == "dead n2" || s0 == "dead n3", "page 0 from {s0:?}");
    // Through n3, forwarded to the primary, which repairs before answering.
    must(&up.uri(3, "vol0"), &["read -P 0x22 1M 1M"]);
    assert_eq!(source_of(&up, 1), "dead n2", "page 1 is current only on n2");
    // Page 2 exists nowhere else: EIO, never stale or zero data.
    let (ok, text) = qemu_io(&u, &["read 2M 1M"]);
    assert!(!ok && text.contains("Input/output error"), "{text}");
    let (ok, _) = qemu_io(&u, &["read 2M 4k"]);
    assert!(!ok);
    assert_eq!(source_of(&up, 2), "unrecoverable");
    // Listed in status, as a range, in --json.
    let j: Value =
        serde_json::from_str(&up.cli_ok(&["status", "--json", "--api", &up.admin(1)])).unwrap();
    let vol = j["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vol0")
        .unwrap()
        .clone();
    assert_eq!(vol["unrecoverable_lbas"], 256, "{vol}");
    assert_eq!(vol["unrecoverable"][0]["first_lba"], 512, "{vol}");
    // `lazarus repair` reports it too.
    let out = up.cli_ok(&["repair", "--volume", "vol0"]);
    assert!(
        out.contains("unrecoverable") && out.contains("512+256"),
        "{out}"
    );
    // A page partly rewritten stays unrecoverable in its other LBAs...
    must(&u, &["write -P 0x44 2M 4k", "flush"]);
    must(&u, &["read -P 0x44 2M 4k"]);
    let (ok, _) = qemu_io(&u, &["read 2100k 4k"]);
    assert!(!ok, "an unknown LBA of a partly rewritten page was served");
    // ...and a full rewrite makes it whole.
    must(&u, &["write -P 0x55 2M 1M", "flush", "read -P 0x55 2M 1M"]);
    // The repaired pages survive a restart of the primary's checkpointed state.
    must(&u, &["read -P 0x11 0 1M", "read -P 0x22 1M 1M"]);
}

/// FIG. 7 with the recovery server (`lazarus up`'s default): once both replicas are
/// dead the volume is in jeopardy and phase-3 writes are logged; the phase-3 page is
/// rebuilt from the replica that died last (its stale page) plus the log's writes to
/// the page's LBAs, accepted because it hashes to the recorded checksum. No page is
/// unrecoverable.
#[test]
fn fig7_with_the_recovery_server_nothing_unrecoverable() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(&tmp.path().join("c"), "64MiB");
    let u = up.uri(1, "vol0");
    must(&u, &["write -P 0x11 0 1M", "flush"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    // Page 2: half written in phase 2 (on n2, before it died), the rest in phase 3.
    must(
        &u,
        &["write -P 0x22 1M 1M", "write -P 0x66 2M 512k", "flush"],
    );
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    must(
        &u,
        &["write -P 0x33 2560k 512k", "write -P 0x34 2M 64k", "flush"],
    );
    let j = up.get(1, "/api/v1/jeopardy").unwrap();
    assert_eq!(j["volumes"]["vol0"]["jeopardy"], true, "{j}");
    for lba in [0, 256, 512] {
        corrupt(&up, "n1", lba);
    }
    must(&u, &["read -P 0x11 0 1M"]);
    must(&up.uri(3, "vol0"), &["read -P 0x22 1M 1M"]);
    assert_eq!(source_of(&up, 1), "dead n2");
    must(
        &u,
        &[
            "read -P 0x34 2M 64k",
            "read -P 0x66 2112k 448k",
            "read -P 0x33 2560k 512k",
        ],
    );
    assert_eq!(source_of(&up, 2), "recovery server + dead n2");
    let out = up.cli_ok(&["repair", "--volume", "vol0"]);
    assert!(out.contains("no damaged page"), "{out}");
    let v = up.get(1, "/api/v1/volumes/vol0").unwrap();
    assert_eq!(v["unrecoverable_lbas"], 0, "{v}");
    let r = up.get(1, "/api/v1/repairs").unwrap();
    let c = &r["counters"]["vol0"];
    assert_eq!(c["from_recovery"], 1, "{r}");
    assert_eq!(c["unrecoverable"], 0, "{r}");
}

/// Union over dead replicas, and a copy that cannot serve its page is skipped: pages
/// 0 and 1 are current on both dead replicas, but n3's copy of page 0 and n2's copy of
/// page 1 are damaged too; page 0 comes from n2, page 1 from n3. Client I/O to other
/// pages runs meanwhile, unaffected.
#[test]
fn union_of_dead_replicas_and_damaged_sources_skipped() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(&tmp.path().join("c"), "64MiB");
    let u = up.uri(1, "vol0");
    must(&u, &["write -P 0x61 0 1M", "write -P 0x62 1M 1M", "flush"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    must(&u, &["write -P 0x70 8M 1M", "flush"]);
    let m = up.volume_meta(1, "vol0").unwrap();
    assert_eq!(m["states"]["2"], "dead", "{m}");
    assert_eq!(m["states"]["3"], "dead", "{m}");
    corrupt(&up, "n3", 0);
    corrupt(&up, "n2", 256);
    corrupt(&up, "n1", 0);
    corrupt(&up, "n1", 256);
    // Concurrent client I/O on other pages while the repairs run.
    let uri = u.clone();
    let busy = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut rounds = 0;
        while t0.elapsed() < Duration::from_secs(2) {
            let (ok, text) = qemu_io(
                &uri,
                &[
                    "write -P 0x7a 16M 256k",
                    "read -P 0x7a 16M 256k",
                    "read -P 0x70 8M 1M",
                ],
            );
            assert!(ok, "I/O to healthy pages failed during repair: {text}");
            rounds += 1;
        }
        rounds
    });
    let out = up.cli_ok(&["repair", "--volume", "vol0"]);
    assert!(busy.join().unwrap() > 0);
    assert!(out.contains("dead n2") && out.contains("dead n3"), "{out}");
    assert_eq!(source_of(&up, 0), "dead n2");
    assert_eq!(source_of(&up, 1), "dead n3");
    must(&u, &["read -P 0x61 0 1M", "read -P 0x62 1M 1M"]);
    let r = up.get(1, "/api/v1/repairs").unwrap();
    assert_eq!(r["counters"]["vol0"]["from_dead"], 2, "{r}");
    // n2 proved page 1 current by its checksum but could not produce it: rejected.
    assert!(
        r["counters"]["vol0"]["rejected_copies"].as_u64().unwrap() >= 1,
        "{r}"
    );
}

/// A live replica is the first source, and a repair of a page a client wrote to after
/// the damage only fills the LBAs still unknown.
#[test]
fn repair_from_live_replica_keeps_newer_writes() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(&tmp.path().join("c"), "64MiB");
    let u = up.uri(1, "vol0");
    must(&u, &["write -P 0x15 4M 1M", "flush"]);
    corrupt(&up, "n1", 4 * 256);
    must(&u, &["read -P 0x15 4M 1M"]);
    assert!(source_of(&up, 4).starts_with("live "), "{:?}", events(&up));
    corrupt(&up, "n1", 4 * 256);
    // Written after the damage: the primary knows these LBAs again.
    must(&u, &["write -P 0x16 4M 8k", "flush"]);
    must(&u, &["read -P 0x16 4M 8k", "read -P 0x15 4104k 1016k"]);
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "vol0")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
}

/// Damaged blocks and checksum pages, and the scrubber finding damage nobody read.
#[test]
fn blocks_checksum_pages_and_the_scrubber() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("c");
    let mut up = Up::start(&data, "64MiB");
    let u = up.uri(1, "vol0");
    let img = tmp.path().join("in.img");
    let bytes = random_file(&img, 4 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &u]);

    // A corrupt block on the primary: the read re-fetches it by id from a replica.
    let out = up.cli_ok(&[
        "fault", "corrupt", "--node", "n1", "--volume", "vol0", "--lba", "3", "--target", "block",
    ]);
    assert!(out.contains("blocks.dat"), "{out}");
    let back = tmp.path().join("back.img");
    run("nbdcopy", &[&u, back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap()[..bytes.len()] == bytes[..]);
    assert!(
        events(&up).iter().any(|e| e["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("block "))),
        "{:?}",
        events(&up)
    );

    // A corrupt block on a replica nobody reads: `lazarus scrub` finds and restores it.
    up.cli_ok(&[
        "fault", "corrupt", "--node", "n2", "--volume", "vol0", "--lba", "700", "--target", "block",
    ]);
    let out = up.cli_ok(&["scrub"]);
    assert!(out.contains("node n2: blocks bad 1 (restored 1)"), "{out}");
    let out = up.cli_ok(&["scrub"]);
    assert!(!out.contains("blocks bad 1"), "{out}");
    // Each node's last scrub, as `lazarus scrub` polls it for its progress bar.
    for n in 1..=3 {
        let p = up.get(n, "/api/v1/scrub").unwrap();
        assert_eq!(p["running"], false, "{p}");
        assert_eq!(p["phase"], "done", "{p}");
        assert!(p["runs"].as_u64().unwrap() >= 2, "{p}");
        // 64 MiB: 64 slice pages and 1 stored checksum page (the root is in the header).
        assert_eq!(p["pages_total"], p["pages_done"], "{p}");
        assert!(p["pages_total"].as_u64().unwrap() >= 64, "{p}");
    }

    // A damaged slice page on the primary that nobody reads: the background repairer
    // fixes it from a live replica within seconds.
    corrupt(&up, "n1", 512);
    let t0 = Instant::now();
    while source_of(&up, 2).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not repaired in the background"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        source_of(&up, 2).starts_with("live "),
        "{}",
        source_of(&up, 2)
    );

    // A damaged checksum page: rebuilt from the level below (the slice pages).
    let out = up.cli_ok(&[
        "fault", "corrupt", "--node", "n1", "--volume", "vol0", "--lba", "0", "--target",
        "checksum",
    ]);
    assert!(out.contains("damaged"), "{out}");
    up.stop();
    let up = Up::start(&data, "64MiB");
    let v = up.get(1, "/api/v1/volumes/vol0").unwrap();
    assert_eq!(v["unrecoverable_lbas"], 0, "{v}");
    assert!(
        !up.node_log(1)
            .contains("checksum page damaged; rebuilt from the pages below"),
        "the clean stop should have rewritten the checksum page"
    );
    let back = tmp.path().join("back2.img");
    run("nbdcopy", &[&up.uri(1, "vol0"), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap()[..bytes.len()] == bytes[..]);
}

/// A device error on the primary's slice page (`fault eio`): the page is repaired from a
/// replica, reads are answered, and the node keeps working until the fault is healed.
#[test]
fn device_read_error_on_a_slice_page() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(&tmp.path().join("c"), "64MiB");
    let u = up.uri(1, "vol0");
    must(&u, &["write -P 0x42 3M 1M", "flush"]);
    let out = up.cli_ok(&[
        "fault", "eio", "--node", "n1", "--volume", "vol0", "--lba", "768",
    ]);
    assert!(out.contains("damaged"), "{out}");
    must(&u, &["read -P 0x42 3M 1M"]);
    assert!(source_of(&up, 3).starts_with("live "), "{:?}", events(&up));
    // Writes and flushes (checkpoints write the page in place) keep working.
    must(
        &u,
        &[
            "write -P 0x43 3M 4k",
            "flush",
            "read -P 0x43 3M 4k",
            "read -P 0x42 3076k 1020k",
        ],
    );
    up.cli_ok(&["fault", "heal"]);
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "vol0")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
}

/// Slice pages out of memory (`--page-cache 0`: every clean page leaves memory once a
/// checkpoint wrote it) are read back from disk and verified when next needed. A page
/// damaged on disk meanwhile (bytes changed behind the node's back, no fault API) is
/// found damaged by the read that brings it back, repaired from a live replica, and the
/// read answers the data written; nothing reads as zeroes or as other data.
#[test]
fn a_page_out_of_memory_damaged_on_disk_is_repaired_when_read_back() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("c");
    let up = Up::start_with(&data, "64MiB", &["--page-cache", "0"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let u = up.uri(1, "vol0");
    must(&u, &["write -P 0x51 0 8M", "flush"]);
    // A snapshot checkpoints every copy: n1's pages are on disk, and out of memory.
    up.cli_ok(&["snapshot", "create", "vol0", "cp"]);
    up.cli_ok(&["snapshot", "delete", "vol0", "cp"]);
    let st = up.get(1, "/api/v1/status").unwrap();
    let pc = &st["page_cache"];
    assert!(pc["evictions"].as_u64().unwrap() >= 8, "{pc}");
    assert_eq!(pc["limit_pages"].as_u64(), Some(0), "{pc}");
    // Page 2 (LBAs 512..767) changed on n1's disk.
    let slice = data.join("n1/volumes/vol0/slice.dat");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&slice)
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xA5; 32], 3 * 4096 + 200).unwrap();
    drop(f);
    must(&u, &["read -P 0x51 0 8M"]);
    assert!(source_of(&up, 2).starts_with("live "), "{:?}", events(&up));
    let st = up.get(1, "/api/v1/status").unwrap();
    assert!(st["page_cache"]["loads"].as_u64().unwrap() >= 7, "{st}");
    must(&u, &["write -P 0x52 2M 4k", "flush", "read -P 0x52 2M 4k"]);
    must(&u, &["read -P 0x51 2052k 1020k", "read -P 0x51 0 2M"]);
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "vol0")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
}
