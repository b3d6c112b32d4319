//! Guards the Membership issue's re-replication end to end: `lazarus up --nodes 5`,
//! volumes placed across the nodes, a node killed for good (SIGKILL, held down) while a
//! client writes, its copies rebuilt on other nodes after a shortened out-time, every
//! volume back to three live copies with identical data, and the node's stale copies
//! removed when it returns; nodes added, replaced and removed under load
//! (`lazarus node add | replace | remove`) with the Raft group at three or five voters.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PY: &str = "/usr/bin/python3";

fn py(script: &str) -> String {
    format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"))
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    require("nbdcopy");
    require("qemu-io");
    let tmp = tempfile::Builder::new()
        .disable_cleanup(std::env::var("LAZARUS_KEEP").is_ok())
        .tempdir()
        .unwrap();
    let data = tmp.path().join("cluster");
    (tmp, data)
}

fn replicas(m: &Value) -> Vec<u64> {
    m["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

/// writer.py flushing 64 KiB chunks to vol0, one after another; stopped when dropped.
struct Writer {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Writer {
    fn start(uri: &str, chunks: u32) -> Writer {
        let mut child = Command::new(PY)
            .args([&py("writer.py"), uri, &chunks.to_string(), "0.01"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Writer { child, lines }
    }

    /// The next chunk acknowledged after its flush; none once every chunk is.
    fn acked(&mut self) -> Option<u64> {
        let line = self.lines.next()?.unwrap();
        match line.strip_prefix("acked ") {
            Some(i) => Some(i.parse().unwrap()),
            None => panic!("the writer failed: {line}"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `Writer` in a thread of its own, until `finish`.
struct BgWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<u64>>,
}

impl BgWriter {
    fn start(uri: &str, chunks: u32) -> BgWriter {
        let mut w = Writer::start(uri, chunks);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match w.acked() {
                    Some(i) => last = Some(i),
                    None => break,
                }
            }
            last
        });
        BgWriter { stop, thread }
    }

    /// Still writing: no error, chunks left.
    fn running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Stops it; the last chunk acknowledged (a writer's error fails the test).
    fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .expect("the writer failed")
            .expect("the writer had nothing acknowledged")
    }
}

/// Three copies, none on `gone`, every one live.
fn whole_without(m: &Value, gone: u64) -> bool {
    let r = replicas(m);
    r.len() == 3
        && !r.contains(&gone)
        && m["states"]
            .as_object()
            .is_some_and(|s| s.len() == 3 && s.values().all(|v| v == "live"))
}

/// Every chunk writer.py flushed to vol0, up to `last`, reads back through node `n`.
fn verify_chunks(up: &Up, n: u16, last: u64) {
    verify_chunks_of(up, n, "vol0", last)
}

/// Every chunk writer.py flushed to `vol`, up to `last`, reads back through node `n`.
fn verify_chunks_of(up: &Up, n: u16, vol: &str, last: u64) {
    let o = run_out(PY, &[&py("verify.py"), &up.uri(n, vol), &last.to_string()]);
    assert!(
        o.status.success(),
        "{vol} through n{n}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let o = run_out("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && !text.contains("error") && !text.contains("failed"),
        "qemu-io {cmds:?} on {uri}: {text}"
    );
}

/// Five nodes; vol0 on n1-n3 (primary n1) and v2 placed by the spread (primary n2, its
/// other copies on the two nodes holding none). n2, which holds a copy of both and is
/// v2's primary, is killed for good while a client writes vol0: v2 fails over, and
/// after the out-time both volumes get a new third copy on other nodes, resynced from
/// their primaries, while the writer goes on without an error. Every acknowledged
/// flush reads back through every node, the copies' roots agree, and when n2 comes
/// back its stale copies are removed and it is marked back in, and used again.
#[test]
fn a_node_down_for_good_has_its_copies_rebuilt_elsewhere() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "256MiB", &["--nodes", "5", "--out-after", "4"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "create", "v2", "--size", "32MiB"]);
    let m = up.wait_all_live(1, "v2", Duration::from_secs(30));
    assert_eq!(m["primary"], 2, "primaries spread: {m}");
    assert_eq!(
        replicas(&m),
        vec![2, 4, 5],
        "copies on the nodes holding fewest: {m}"
    );
    // Listed whichever node the CLI asks (n1 holds no copy of v2).
    let list = up.cli_ok(&["volume", "list"]);
    assert!(list.contains("v2 ") && list.contains("vol0 "), "{list}");
    let img = data.with_extension("v2.img");
    let written = random_file(&img, 32 << 20, seed());
    run(
        "nbdcopy",
        &[img.to_str().unwrap(), &up.uri(3, "v2")], // through a node without a copy
    );
    // A snapshot of v2 as written, then v2 moves on: the snapshot must follow v2's
    // copies to wherever they are rebuilt.
    up.cli_ok(&["snapshot", "create", "v2", "before"]);
    qemu_io_ok(&up.uri(3, "v2"), &["write -P 0x77 0 4M", "flush"]);
    let mut written_now = written.clone();
    written_now[..4 << 20].fill(0x77);

    let mut w = Writer::start(&up.uri(1, "vol0"), 4000);
    let mut last_acked = 0u64;
    let mut killed_at = None;
    let mut rebuilt_at = None;
    while let Some(i) = w.acked() {
        last_acked = i;
        if last_acked == 40 {
            up.cli_ok(&["fault", "kill", "--node", "n2"]);
            killed_at = Some(Instant::now());
        }
        // The writer keeps writing while the copies are rebuilt.
        if killed_at.is_some() && rebuilt_at.is_none() && last_acked.is_multiple_of(20) {
            let done = ["vol0", "v2"]
                .iter()
                .all(|v| up.volume_meta(1, v).is_some_and(|m| whole_without(&m, 2)));
            if done {
                rebuilt_at = Some(Instant::now());
            }
        }
        if rebuilt_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        assert!(
            killed_at.is_none_or(|t| t.elapsed() < Duration::from_secs(90)),
            "copies not rebuilt within 90 s of the kill: vol0 {:?}, v2 {:?}",
            up.volume_meta(1, "vol0"),
            up.volume_meta(1, "v2")
        );
    }
    drop(w);
    let took = rebuilt_at.expect("the writer ended before the rebuild") - killed_at.unwrap();
    eprintln!("both volumes whole again {took:?} after the kill (out-time 4 s)");
    let status = up.cli_ok(&["status"]);
    assert!(status.contains("OUT"), "n2 shown out: {status}");

    for vol in ["vol0", "v2"] {
        let m = up.volume_meta(1, vol).unwrap();
        assert!(whole_without(&m, 2), "{vol}: {m}");
        // Identical copies: the primary's root on every copy.
        let roots: Vec<String> = replicas(&m)
            .iter()
            .map(|n| up.root(*n as u16, vol))
            .collect();
        assert!(roots.iter().all(|r| *r == roots[0]), "{vol}: {roots:?}");
    }
    // v2 failed over from n2, its data intact through every node that answers.
    assert_ne!(up.volume_meta(1, "v2").unwrap()["primary"], 2);
    for n in [1u16, 3, 4, 5] {
        let out = data.with_extension(format!("v2-n{n}.out"));
        run("nbdcopy", &[&up.uri(n, "v2"), out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == written_now,
            "v2 read through n{n} differs"
        );
        verify_chunks(&up, n, last_acked);
    }
    // The new copy of v2 holds its snapshot (installed from a surviving copy) and
    // serves it from its own store.
    let m = up.volume_meta(1, "v2").unwrap();
    let new = *replicas(&m)
        .iter()
        .find(|n| ![2, 4, 5].contains(*n))
        .expect("a new copy of v2");
    let t0 = Instant::now();
    while !up
        .get(new as u16, "/api/v1/volumes/v2/snapshots")
        .is_some_and(|v| v["snapshots"].to_string().contains("\"before\""))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "v2's new copy on n{new} did not get its snapshot"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = data.with_extension("v2-before.out");
    run(
        "nbdcopy",
        &[&up.uri(new as u16, "v2@before"), out.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&out).unwrap() == written,
        "v2@before through its new copy n{new} differs from what was written"
    );
    // A node holding no copy of v2 serves its snapshot too, through a copy: reads,
    // the allocation map, and a refused write.
    let without = [1u16, 3]
        .into_iter()
        .find(|n| !replicas(&m).contains(&(*n as u64)))
        .expect("a node without a copy of v2");
    let uri = up.uri(without, "v2@before");
    let list = run("nbdinfo", &["--list", &up.uri(without, "")]);
    assert!(list.contains("v2@before"), "{list}");
    let out = data.with_extension("v2-before-remote.out");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == written,
        "v2@before through n{without}, which holds no copy, differs"
    );
    let map = run("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    assert!(map.contains("\"data\": true"), "{map}");
    let o = run_out("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || text.contains("failed") || text.contains("read-only"),
        "a write to v2@before through n{without} was not refused: {text}"
    );

    // n2 returns: its stale copies go, it is marked back in and holds copies again.
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    let t0 = Instant::now();
    loop {
        let gone = ["vol0", "v2"]
            .iter()
            .all(|v| up.get(2, &format!("/api/v1/volumes/{v}")).is_none());
        let back_in = up.get(1, "/api/v1/cluster").is_some_and(|c| {
            c["metadata"]["out"]
                .as_array()
                .is_some_and(|o| o.is_empty())
        });
        if gone && back_in && up.get(2, "/api/v1/status").is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "n2's stale copies not removed or n2 not back in; n2 log:\n{}",
            up.node_log(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stale copies are never served: n2 forwards to each volume's primary.
    verify_chunks(&up, 2, last_acked);
    up.cli_ok(&["volume", "create", "v3", "--size", "16MiB"]);
    let m = up.wait_all_live(1, "v3", Duration::from_secs(30));
    assert!(
        replicas(&m).contains(&2),
        "the returned node, holding nothing, is used again: {m}"
    );
    qemu_io_ok(
        &up.uri(2, "v3"),
        &["write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M"],
    );
}

/// `lazarus node remove` under load: four nodes, vol0 and w1 on n1-n3 with n1 their
/// primary, libnbd writers flushing chunk after chunk to vol0 through n2 and to w1
/// through n1 itself. n1 is removed: each volume gets a copy on n4, the primary role
/// moves to a live copy elsewhere, n1's copy is dropped and deleted; n1 then leaves the
/// Raft group, the metadata forgets it and the supervisor stops it. Neither writer
/// sees an error while the copies and roles move (the one connected to n1 follows
/// the role it handed over), and every flushed chunk reads back through every node. A
/// removal that cannot proceed is cancelled.
#[test]
fn a_removed_primary_hands_over_and_its_copies_move_under_load() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "256MiB", &["--nodes", "4"]);
    let m = up.wait_all_live(1, "vol0", Duration::from_secs(30));
    assert_eq!(m["primary"], 1);
    up.cli_ok(&[
        "volume",
        "create",
        "w1",
        "--size",
        "256MiB",
        "--replicas",
        "3",
        "--primary",
        "n1",
    ]);
    let m = up.wait_all_live(1, "w1", Duration::from_secs(30));
    assert_eq!(m["primary"], 1);
    let mut w = Writer::start(&up.uri(2, "vol0"), 4000);
    let on_n1 = BgWriter::start(&up.uri(1, "w1"), 4000);
    let mut last_acked = 0u64;
    let mut removed_at = None;
    let mut moved_at = None;
    let moved = |up: &Up| {
        ["vol0", "w1"].iter().all(|v| {
            up.volume_meta(2, v)
                .is_some_and(|m| whole_without(&m, 1) && m["primary"] != 1)
        })
    };
    while let Some(i) = w.acked() {
        last_acked = i;
        if last_acked == 40 {
            let said = up.cli_ok(&["node", "remove", "n1"]);
            assert!(said.contains("n1 is out"), "{said}");
            removed_at = Some(Instant::now());
        }
        if removed_at.is_some() && moved_at.is_none() && last_acked.is_multiple_of(20) && moved(&up)
        {
            moved_at = Some(Instant::now());
        }
        if moved_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        assert!(
            removed_at.is_none_or(|t| t.elapsed() < Duration::from_secs(90)),
            "vol0 and w1 not moved off n1 within 90 s: {:?} {:?}",
            up.volume_meta(2, "vol0"),
            up.volume_meta(2, "w1")
        );
        assert!(on_n1.running(), "the writer through n1 stopped");
    }
    drop(w);
    let last_w1 = on_n1.finish();
    let took = moved_at.expect("the writer ended before the move") - removed_at.unwrap();
    eprintln!("vol0 and w1 moved off n1 (copies rebuilt, primaries handed over) {took:?} after the removal; {last_w1} chunks through n1");
    // Through n1 while it still runs (it is stopped once forgotten, any moment now).
    for (vol, last) in [("vol0", last_acked), ("w1", last_w1)] {
        let o = run_out(PY, &[&py("verify.py"), &up.uri(1, vol), &last.to_string()]);
        let gone = || up.get(1, "/api/v1/status").is_none();
        assert!(
            o.status.success() || gone(),
            "{vol} through n1: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for (vol, last) in [("vol0", last_acked), ("w1", last_w1)] {
        let m = up.volume_meta(2, vol).unwrap();
        let roots: Vec<String> = replicas(&m)
            .iter()
            .map(|n| up.root(*n as u16, vol))
            .collect();
        assert!(roots.iter().all(|r| *r == roots[0]), "{vol}: {roots:?}");
        for n in 2..=4u16 {
            verify_chunks_of(&up, n, vol, last);
        }
    }
    // n1 leaves: its copy deleted, out of the Raft group, forgotten by the metadata,
    // and stopped by the supervisor; three voters remain.
    let t0 = Instant::now();
    loop {
        let c = up.get(2, "/api/v1/cluster").unwrap();
        let forgotten = c["metadata"]["nodes"].get("1").is_none()
            && c["metadata"]["out"] == serde_json::json!([])
            && c["joint"] == false
            && !c["members"].as_array().unwrap().contains(&1.into())
            && !c["learners"].as_array().unwrap().contains(&1.into());
        if forgotten && up.get(1, "/api/v1/status").is_none() {
            assert_eq!(c["members"], serde_json::json!([2, 3, 4]), "{c}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "n1 not gone from the cluster: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = up.cli_ok(&["status"]);
    assert!(!status.contains("\n  n1 "), "{status}");
    // A removal that cannot proceed (vol0 needs the three nodes left) is cancelled:
    // nothing moved, n4 back in.
    let said = up.cli_ok(&["node", "remove", "n4"]);
    assert!(said.contains("cannot be moved yet"), "{said}");
    std::thread::sleep(Duration::from_secs(2));
    up.cli_ok(&["node", "remove", "n4", "--cancel"]);
    let c = up.get(2, "/api/v1/cluster").unwrap();
    assert_eq!(c["metadata"]["out"], serde_json::json!([]), "{c}");
    // Nothing moved: the same three copies, each live again once n4 is back in (its
    // copy catches up on what it missed while out).
    let t0 = Instant::now();
    loop {
        let m = up.volume_meta(2, "vol0").unwrap();
        let mut r = replicas(&m);
        r.sort_unstable();
        assert_eq!(r, vec![2, 3, 4], "{m}");
        if whole_without(&m, 1) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "vol0 not whole: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    qemu_io_ok(
        &up.uri(4, "vol0"),
        &["write -P 0x3c 0 64k", "flush", "read -P 0x3c 0 64k"],
    );
}

/// A volume down to its last failure domain regains its others by re-replication: five
/// nodes, vol0 on n1-n3; n2 and n3 killed for good, so n1 (with a Raft majority of n1,
/// n4, n5) writes through the recovery server first (jeopardy). After the out-time,
/// n4 and n5 get copies (restored from the recovery log, then resynced), the volume
/// has three live copies again and leaves jeopardy; every write reads back through
/// the new copies' nodes, and the killed nodes, revived, hold nothing.
#[test]
fn a_volume_in_jeopardy_leaves_it_once_its_copies_are_rebuilt() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "64MiB", &["--nodes", "5", "--out-after", "4"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x31 0 4M", "flush"]);
    up.cli_ok(&["fault", "kill", "--node", "n2"]);
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x32 4M 4M", "flush"]);
    let jeopardy = |up: &Up| {
        up.get(1, "/api/v1/jeopardy")
            .is_some_and(|j| j["volumes"]["vol0"]["jeopardy"] == true)
    };
    let t0 = Instant::now();
    while !jeopardy(&up) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "vol0 not in jeopardy with one copy left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Written in jeopardy while the copies are rebuilt.
    qemu_io_ok(&up.uri(4, "vol0"), &["write -P 0x33 8M 4M", "flush"]);
    let m = up.wait_meta(1, "vol0", Duration::from_secs(60), "copies rebuilt", |m| {
        let r = replicas(m);
        r.len() == 3
            && r.contains(&4)
            && r.contains(&5)
            && m["states"]
                .as_object()
                .is_some_and(|s| s.values().all(|v| v == "live"))
    });
    let t0 = Instant::now();
    while jeopardy(&up) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still in jeopardy: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in [1u16, 4, 5] {
        qemu_io_ok(
            &up.uri(n, "vol0"),
            &[
                "read -P 0x31 0 4M",
                "read -P 0x32 4M 4M",
                "read -P 0x33 8M 4M",
            ],
        );
    }
    let roots: Vec<String> = [1u16, 4, 5].iter().map(|n| up.root(*n, "vol0")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    let t0 = Instant::now();
    while [2u16, 3]
        .iter()
        .any(|n| up.get(*n, "/api/v1/volumes/vol0").is_some())
        || up.get(2, "/api/v1/status").is_none()
        || up.get(3, "/api/v1/status").is_none()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the revived nodes' copies were not removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io_ok(&up.uri(2, "vol0"), &["read -P 0x33 8M 4M"]);
}

/// The Raft group as a node sees it: leader, voters, learners, whether a change is
/// under way (joint consensus).
type Group = (Option<u64>, Vec<u64>, Vec<u64>, bool);

fn group(up: &Up, n: u16) -> Option<Group> {
    let c = up.get(n, "/api/v1/cluster")?;
    let ids = |v: &Value| -> Vec<u64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_u64())
            .collect()
    };
    Some((
        c["leader"].as_u64(),
        ids(&c["members"]),
        ids(&c["learners"]),
        c["joint"] == true,
    ))
}

/// Nodes added and replaced under load: three nodes, a libnbd writer flushing chunk
/// after chunk to vol0 through n3. `node add` twice: n4 joins as a learner, n5 makes
/// five voters; a new volume is placed on the new nodes. Then `node replace n2 --with
/// n6` (n6 added by the supervisor): vol0's copy and v2's primary role move off n2, its
/// copies are rebuilt on n6, n2 leaves the group, is forgotten and stopped. Throughout,
/// the group has a leader and (outside a change) three or five voters; the writer sees
/// no error; every flushed chunk and v2's data read back through every node left.
#[test]
fn nodes_added_and_replaced_under_load_keep_a_raft_majority() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "256MiB", &[]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    // Bad requests get a clear error and change nothing.
    let refused = |args: &[&str], says: &str| {
        let o = up.cli(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
    };
    refused(&["node", "add", "n2"], "already holds node n2's data");
    refused(&["node", "add", "n12"], "named n1 to n9");
    let api = up.admin(1);
    refused(
        &["node", "add", "x", "--rpc", "127.0.0.1:1", "--api", &api],
        "must end in a positive number",
    );
    refused(
        &["node", "add", "n7", "--rpc", "nowhere", "--api", &api],
        "must be HOST:PORT",
    );
    refused(
        &["node", "add", "n3", "--rpc", "127.0.0.1:1", "--api", &api],
        "already a member",
    );
    refused(
        &["node", "replace", "n2", "--with", "n2"],
        "does not replace itself",
    );
    let c = up.get(1, "/api/v1/cluster").unwrap();
    assert!(
        c["metadata"]["joining"] == serde_json::json!({})
            && c["metadata"]["out"] == serde_json::json!([]),
        "{c}"
    );
    let mut w = Writer::start(&up.uri(3, "vol0"), 6000);
    let mut last_acked = 0u64;
    let mut replaced_at = None;
    let mut done_at = None;
    let mut samples = 0;
    let written = std::cell::RefCell::new(Vec::new());
    let moved = || {
        let c = up.get(1, "/api/v1/cluster")?;
        let vols = &c["metadata"]["volumes"];
        let whole = |v: &str, want: &[u64]| {
            let mut r = replicas(&vols[v]);
            r.sort();
            r == want
                && vols[v]["states"]
                    .as_object()
                    .is_some_and(|s| s.values().all(|x| x == "live"))
        };
        let gone = c["metadata"]["nodes"].get("2").is_none()
            && !c["members"].as_array()?.contains(&2.into())
            && !c["learners"].as_array()?.contains(&2.into());
        Some(whole("vol0", &[1, 3, 6]) && whole("v2", &[4, 5, 6]) && gone)
    };
    while let Some(i) = w.acked() {
        last_acked = i;
        if last_acked == 30 {
            let said = up.cli_ok(&["node", "add"]);
            assert!(
                said.contains("n4 joined the cluster as a learner"),
                "{said}"
            );
            let said = up.cli_ok(&["node", "add"]);
            assert!(said.contains("n5 joined the cluster"), "{said}");
            let t0 = Instant::now();
            while group(&up, 1).is_none_or(|g| g.1 != [1, 2, 3, 4, 5] || g.3) {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "five voters not reached: {:?}",
                    group(&up, 1)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            // New volumes use the new nodes: the primary goes to a node that is
            // primary of none (n2), the copies to the nodes holding none.
            up.cli_ok(&["volume", "create", "v2", "--size", "16MiB"]);
            let m = up.wait_all_live(1, "v2", Duration::from_secs(30));
            assert_eq!(replicas(&m), vec![2, 4, 5], "{m}");
            let img = data.with_extension("v2.img");
            *written.borrow_mut() = random_file(&img, 16 << 20, seed());
            run("nbdcopy", &[img.to_str().unwrap(), &up.uri(4, "v2")]);
        }
        if last_acked == 80 {
            let said = up.cli_ok(&["node", "replace", "n2", "--with", "n6"]);
            assert!(said.contains("n6 joined the cluster"), "{said}");
            replaced_at = Some(Instant::now());
        }
        if last_acked.is_multiple_of(10) && last_acked > 30 {
            // The group keeps a leader and an odd number of voters between changes.
            if let Some((leader, voters, _, joint)) = group(&up, 1) {
                assert!(leader.is_some(), "no leader at chunk {last_acked}");
                assert!(
                    joint || voters.len() == 3 || voters.len() == 5,
                    "voters {voters:?} at chunk {last_acked}"
                );
                samples += 1;
            }
            if replaced_at.is_some() && done_at.is_none() && moved() == Some(true) {
                done_at = Some(Instant::now());
            }
        }
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        assert!(
            replaced_at.is_none_or(|t| t.elapsed() < Duration::from_secs(90)),
            "n2 not replaced within 90 s: {:?}",
            up.get(1, "/api/v1/cluster").map(|c| c["metadata"].clone())
        );
    }
    drop(w);
    let took = done_at.expect("the writer ended before the replacement") - replaced_at.unwrap();
    eprintln!("n2 replaced by n6 (copies rebuilt, primary handed over, n2 forgotten) in {took:?}; {samples} group samples");
    assert!(samples > 10, "{samples} samples");
    // Five voters again: n6 took n2's vote once it caught up.
    let t0 = Instant::now();
    while group(&up, 1).is_none_or(|g| g.1 != [1, 3, 4, 5, 6] || g.3) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "voters: {:?}",
            group(&up, 1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // n2 stopped by the supervisor once forgotten.
    let t0 = Instant::now();
    while up.get(2, "/api/v1/status").is_some() {
        assert!(t0.elapsed() < Duration::from_secs(20), "n2 still runs");
        std::thread::sleep(Duration::from_millis(200));
    }
    for vol in ["vol0", "v2"] {
        let m = up.volume_meta(1, vol).unwrap();
        let roots: Vec<String> = replicas(&m)
            .iter()
            .map(|n| up.root(*n as u16, vol))
            .collect();
        assert!(roots.iter().all(|r| *r == roots[0]), "{vol}: {roots:?}");
    }
    for n in [1u16, 3, 4, 5, 6] {
        verify_chunks(&up, n, last_acked);
        let out = data.with_extension(format!("v2-n{n}.out"));
        run("nbdcopy", &[&up.uri(n, "v2"), out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == *written.borrow(),
            "v2 read through n{n} differs"
        );
    }
}

/// How many copies each node holds, from node `n`'s metadata.
fn copies_per_node(up: &Up, n: u16) -> std::collections::BTreeMap<u64, usize> {
    let c = up.get(n, "/api/v1/cluster").unwrap();
    let mut held: std::collections::BTreeMap<u64, usize> = c["metadata"]["nodes"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.parse().unwrap(), 0))
        .collect();
    for v in c["metadata"]["volumes"].as_object().unwrap().values() {
        for r in replicas(v) {
            *held.entry(r).or_default() += 1;
        }
    }
    held
}

/// Primary roles and copies moved under load. Three volumes whose primary is n1 sit on
/// n1-n3, and three libnbd writers, one per volume, connected to n1, flush chunk after
/// chunk. `lazarus volume primary v2 n2` hands v2's role to n2. Two nodes join holding
/// nothing, and `lazarus rebalance` moves copies one at a time (a primary's copy last,
/// its role handed to a staying copy first) until the nodes' shares differ by at most
/// one, then hands primary roles over until those differ by at most one. No writer
/// sees an error: their requests and connections follow each role handed over. Every
/// volume ends with three live copies whose roots agree, and its data reads back
/// through every node.
#[test]
fn a_rebalance_spreads_copies_and_primaries_onto_added_nodes_under_load() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "256MiB", &[]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let vols = ["vol0", "v2", "v3"];
    for vol in &vols[1..] {
        up.cli_ok(&[
            "volume",
            "create",
            vol,
            "--size",
            "256MiB",
            "--primary",
            "n1",
        ]);
        up.wait_all_live(1, vol, Duration::from_secs(30));
    }
    let primaries = |up: &Up| -> Vec<u64> {
        vols.iter()
            .map(|v| up.volume_meta(1, v).unwrap()["primary"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(primaries(&up), vec![1, 1, 1]);
    let writers: Vec<BgWriter> = vols
        .iter()
        .map(|vol| BgWriter::start(&up.uri(1, vol), 4000))
        .collect();
    // An administrator hands v2's role to n2 (the writer on n1 follows it); requests
    // that cannot be met are refused with a clear error.
    let t0 = Instant::now();
    let said = up.cli_ok(&["volume", "primary", "v2", "n2"]);
    assert!(said.contains("n2 is the primary of v2"), "{said}");
    eprintln!(
        "v2's primary role handed from n1 to n2 in {:?} under its writer",
        t0.elapsed()
    );
    for (args, why) in [
        (["volume", "primary", "v2", "n9"], "not a cluster member"),
        (["volume", "primary", "nosuch", "n2"], "does not exist"),
    ] {
        let o = up.cli(&args);
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && text.contains(why),
            "{args:?}: {text}"
        );
    }
    assert_eq!(primaries(&up), vec![1, 2, 1]);
    up.cli_ok(&["node", "add"]);
    up.cli_ok(&["node", "add"]);
    assert_eq!(
        copies_per_node(&up, 1)
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![3, 3, 3, 0, 0]
    );
    let said = up.cli_ok(&["rebalance"]);
    assert!(said.contains("rebalancing"), "{said}");
    let started = Instant::now();
    loop {
        let c = up.get(1, "/api/v1/cluster").unwrap();
        let m = &c["metadata"];
        if m["rebalancing"] == false && m["moving"] == serde_json::json!({}) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "rebalance not done within 150 s: {m}"
        );
        assert!(
            writers.iter().all(|w| w.running()),
            "a writer stopped (failed, or wrote every chunk) before the rebalance ended"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let last: Vec<u64> = writers.into_iter().map(BgWriter::finish).collect();
    // The dashboard's view: the five members in the Raft group, no move left.
    let d = up.get(3, "/api/v1/dashboard").unwrap();
    let members = d["voters"].as_array().unwrap().len() + d["learners"].as_array().unwrap().len();
    assert_eq!(members, 5, "{}", d["voters"]);
    assert_eq!(
        (&d["rebalancing"], &d["moving"]),
        (&false.into(), &serde_json::json!({}))
    );
    let held = copies_per_node(&up, 1);
    let after = primaries(&up);
    eprintln!("rebalanced in {took:?}: copies {held:?}, primaries {after:?}, chunks {last:?}");
    let (lo, hi) = (
        held.values().min().copied().unwrap(),
        held.values().max().copied().unwrap(),
    );
    assert!(hi - lo <= 1 && held[&4] >= 1 && held[&5] >= 1, "{held:?}");
    let mut per_node = std::collections::BTreeMap::<u64, usize>::new();
    for p in &after {
        *per_node.entry(*p).or_default() += 1;
    }
    assert!(
        per_node.values().all(|n| *n == 1),
        "primaries not spread: {after:?}"
    );
    for vol in vols {
        let m = up.volume_meta(1, vol).unwrap();
        assert_eq!(replicas(&m).len(), 3, "{m}");
        let roots: Vec<String> = replicas(&m)
            .iter()
            .map(|n| up.root(*n as u16, vol))
            .collect();
        assert!(roots.iter().all(|r| *r == roots[0]), "{vol}: {roots:?}");
    }
    for n in 1..=5u16 {
        for (vol, last) in vols.iter().zip(&last) {
            verify_chunks_of(&up, n, vol, *last);
        }
    }
    let on4 = vols
        .iter()
        .find(|v| replicas(&up.volume_meta(1, v).unwrap()).contains(&4))
        .unwrap();
    assert!(up.get(4, &format!("/api/v1/volumes/{on4}")).is_some());
}
