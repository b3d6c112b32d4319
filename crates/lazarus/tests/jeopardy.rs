//! Guards the Last-failure-domain issue end to end: `lazarus up` (three nodes and a
//! recovery server), real NBD clients, faults injected into the real processes.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PY: &str = "/usr/bin/python3";
const CHUNK: usize = 64 << 10;

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    require("nbdcopy");
    require("qemu-io");
    require("nbdsh");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cluster");
    if std::env::var("LAZARUS_KEEP").is_ok() {
        eprintln!("keeping {}", tmp.path().display());
        let keep = tmp.path().to_path_buf();
        std::mem::forget(tmp);
        return (tempfile::TempDir::new_in(keep).unwrap(), data);
    }
    (tmp, data)
}

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    if uri.contains('@') {
        // A snapshot: read-only.
        args.push("-r");
    }
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
    let ok = o.status.success()
        && !text.contains("error")
        && !text.contains("failed")
        && !text.contains("Pattern verification");
    (ok, text)
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let (ok, text) = qemu_io(uri, cmds);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {text}");
}

/// The volume's jeopardy view at node n.
fn jstate(up: &Up, n: u16, vol: &str) -> Value {
    up.get(n, "/api/v1/jeopardy")
        .map(|v| v["volumes"][vol].clone())
        .unwrap_or(Value::Null)
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_files(up: &Up) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(up.data.join("rs").join("logs"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// (lba, count, first data byte) of every record in the recovery server's log files,
/// parsed from the documented on-disk format (docs/format.md).
fn log_records(up: &Up) -> Vec<(u64, u32, u8)> {
    let mut out = Vec::new();
    for p in log_files(up) {
        let b = std::fs::read(&p).unwrap();
        let mut off = 0;
        while off + 64 <= b.len() {
            assert_eq!(
                &b[off..off + 4],
                b"LZRL",
                "record magic at {off} in {}",
                p.display()
            );
            let lba = u64::from_le_bytes(b[off + 16..off + 24].try_into().unwrap());
            let count = u32::from_le_bytes(b[off + 24..off + 28].try_into().unwrap());
            let len = u32::from_le_bytes(b[off + 28..off + 32].try_into().unwrap()) as usize;
            let first = if len > 0 { b[off + 48] } else { 0 };
            out.push((lba, count, first));
            off += 48 + len + 16;
        }
    }
    out
}

/// A python/libnbd writer (tests/py/jwriter.py) running in the background.
struct Writer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stop: std::path::PathBuf,
    dir: std::path::PathBuf,
    tag: u64,
    base: usize,
    slots: usize,
}

/// The warnings and errors of the cluster's node and recovery-server logs (openraft's
/// own left out), the last `per_log` of each: what a failing writer's message needs.
fn cluster_warnings(dir: &std::path::Path, per_log: usize) -> String {
    let Some(data) = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("cluster"))
        .find(|d| d.is_dir())
    else {
        return String::new();
    };
    let mut out = String::new();
    for log in [
        "n1/node.log",
        "n2/node.log",
        "n3/node.log",
        "rs/recovery.log",
    ] {
        let text = std::fs::read_to_string(data.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                (l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("refused"))
                    && !l.contains("openraft")
            })
            .collect();
        out += &format!("--- {log}\n");
        for l in &lines[lines.len().saturating_sub(per_log)..] {
            out += &l.chars().take(400).collect::<String>();
            out += "\n";
        }
    }
    out
}

/// A test that fails midway must not leave its writer reconnecting forever.
impl Drop for Writer {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Writer {
    fn start(
        uri: &str,
        tag: u64,
        base: usize,
        slots: usize,
        count: usize,
        dir: &std::path::Path,
    ) -> Writer {
        Writer::start_opt(uri, tag, base, slots, count, dir, false)
    }

    fn start_opt(
        uri: &str,
        tag: u64,
        base: usize,
        slots: usize,
        count: usize,
        dir: &std::path::Path,
        retry: bool,
    ) -> Writer {
        let stop = dir.join(format!("stop-{tag}"));
        let mut child = Command::new(PY)
            .arg(format!(
                "{}/tests/py/jwriter.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args([
                uri,
                &tag.to_string(),
                &base.to_string(),
                &slots.to_string(),
                &count.to_string(),
                "4",
                stop.to_str().unwrap(),
                if retry { "1" } else { "0" },
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Writer {
            child,
            lines,
            stop,
            dir: dir.to_path_buf(),
            tag,
            base,
            slots,
        }
    }

    fn acked(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("acked"))
            .count()
    }

    fn error(&self) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with("error"))
            .cloned()
    }

    fn wait_acked(&self, n: usize, within: Duration, what: &str) {
        let t0 = Instant::now();
        while self.acked() < n {
            assert!(
                t0.elapsed() < within,
                "{what}: {} of {n} writes acknowledged within {within:?} (error: {:?})\n{}",
                self.acked(),
                self.error(),
                cluster_warnings(&self.dir, 25)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the writer; returns how many writes it had acknowledged.
    fn finish(&mut self) -> usize {
        std::fs::write(&self.stop, b"").unwrap();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            self.error(),
            None,
            "writer failed\n{}",
            cluster_warnings(&self.dir, 25)
        );
        self.acked()
    }

    fn numbers(&self, prefix: &str) -> Vec<usize> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).and_then(|n| n.trim().parse().ok()))
            .collect()
    }

    /// Stops a writer that retries after errors; returns (acked, tried) write numbers.
    fn finish_retrying(&mut self) -> (Vec<usize>, Vec<usize>) {
        std::fs::write(&self.stop, b"").unwrap();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        (self.numbers("acked "), self.numbers("try "))
    }

    /// `check` on the first 2 MiB of vol0 read through each of the three nodes.
    fn check_every_node(
        &self,
        up: &Up,
        acked: &[usize],
        tried: &[usize],
        tmp: &std::path::Path,
        what: &str,
    ) {
        for n in 1..=3 {
            let image = read_region(&up.uri(n, "vol0"), 2 << 20, tmp)
                .unwrap_or_else(|| panic!("no read through n{n} ({what})"));
            self.check(&image, acked, tried, &format!("{what}, through n{n}"));
        }
    }

    /// Checks every slot of this writer's region in `image`: it holds the last
    /// acknowledged write to it, or a later write that was tried (its fate unknown to
    /// the client), never older or foreign data.
    fn check(&self, image: &[u8], acked: &[usize], tried: &[usize], what: &str) {
        let fill = |i: usize| ((self.tag as usize * 31 + i) % 251 + 1) as u8;
        for slot in 0..self.slots {
            let off = self.base + slot * CHUNK;
            let got = &image[off..off + CHUNK];
            let last = acked
                .iter()
                .copied()
                .filter(|i| i % self.slots == slot)
                .max();
            let mut allowed: Vec<u8> = tried
                .iter()
                .copied()
                .filter(|i| i % self.slots == slot && last.is_none_or(|l| *i >= l))
                .map(fill)
                .collect();
            if last.is_none() {
                allowed.push(0);
            }
            assert!(
                got.iter().all(|b| *b == got[0]) && allowed.contains(&got[0]),
                "{what}: slot {slot} of writer {} holds {:#x} (last acknowledged write {last:?}, allowed {allowed:x?})",
                self.tag,
                got[0]
            );
        }
    }

    /// Applies the first `acked` writes to `image` (the volume from byte 0).
    fn apply(&self, acked: usize, image: &mut [u8]) {
        for i in 0..acked {
            let off = self.base + (i % self.slots) * CHUNK;
            let fill = ((self.tag as usize * 31 + i) % 251 + 1) as u8;
            image[off..off + CHUNK].fill(fill);
        }
    }
}

fn read_region(uri: &str, len: usize, tmp: &std::path::Path) -> Option<Vec<u8>> {
    let out = tmp.join("region.img");
    let _ = std::fs::remove_file(&out);
    let o = Command::new("nbdcopy")
        .args([uri, out.to_str().unwrap()])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let b = std::fs::read(&out).ok()?;
    Some(b[..len].to_vec())
}

/// The volume's new primary, once n2's view names one other than n1.
fn new_primary(up: &Up, within: Duration) -> u16 {
    let m = up.wait_meta(2, "vol0", within, "a new primary", |m| {
        m["primary"].as_u64().is_some_and(|p| p != 1)
    });
    m["primary"].as_u64().unwrap() as u16
}

/// The first 2 MiB of vol0 through node n, retried until it answers (at most `within`).
fn read_through(up: &Up, n: u16, within: Duration, tmp: &std::path::Path) -> Vec<u8> {
    let t0 = Instant::now();
    loop {
        if let Some(i) = read_region(&up.uri(n, "vol0"), 2 << 20, tmp) {
            return i;
        }
        assert!(
            t0.elapsed() < within,
            "no read through n{n} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: first difference at byte {first} (chunk {}): got {:#x}, want {:#x}",
            first / CHUNK,
            got[first],
            want[first]
        );
    }
}

/// Jeopardy entered by an administrator (`volume protect`) and left (`unprotect`:
/// the recovery server's copy deleted); entered by `fault drop` to both replicas on
/// the write that found no live replica; a write in jeopardy is on the recovery server
/// before it is written locally (with the recovery server stopped, the write waits and
/// the primary still serves the old data); rejoin restores from the recovery server,
/// resyncs, turns live, clears the flag and empties the recovery server.
#[test]
fn jeopardy_by_protect_and_drop_write_through_and_rejoin() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    let uri1 = up.uri(1, "vol0");

    // Administrator protection.
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    let fcid1 = jstate(&up, 1, "vol0")["failure_count_id"].as_u64().unwrap();
    assert!(fcid1 >= 1);
    qemu_io_ok(&uri1, &["write -P 0x10 0 64k"]);
    assert!(
        log_records(&up).iter().any(|r| r.0 == 0 && r.2 == 0x10),
        "write in jeopardy not on the recovery server: {:?}",
        log_records(&up)
    );
    up.cli_ok(&["volume", "unprotect", "vol0"]);
    wait_for(
        "jeopardy cleared, recovery server copy deleted",
        Duration::from_secs(10),
        || jstate(&up, 1, "vol0")["jeopardy"] == false && log_files(&up).is_empty(),
    );

    // Both replicas cut off: the write that finds no live replica enters jeopardy.
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    qemu_io_ok(&uri1, &["write -P 0x21 64k 64k"]);
    let j = jstate(&up, 1, "vol0");
    assert_eq!(j["jeopardy"], true, "{j}");
    assert!(j["failure_count_id"].as_u64().unwrap() > fcid1, "{j}");
    assert!(
        log_records(&up).iter().any(|r| r.0 == 16 && r.2 == 0x21),
        "the write that fell into jeopardy is not on the recovery server: {:?}",
        log_records(&up)
    );
    // `lazarus status --json` reports it per volume.
    let st: Value = serde_json::from_str(&up.cli_ok(&["status", "--json"])).unwrap();
    let v = st["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vol0")
        .unwrap()
        .clone();
    assert_eq!(v["jeopardy"], true, "{v}");
    for k in ["failure_count_id", "recovery_lag", "recovery_log_bytes"] {
        assert!(v[k].is_u64(), "status --json lacks {k}: {v}");
    }
    assert!(up.cli_ok(&["status"]).contains("JEOPARDY"));

    // Order: recovery server first. Stopped, it holds the write back; and the primary,
    // whose hold there lapses, answers no read meanwhile (in jeopardy it serves on
    // that hold alone): the read waits, and once the recovery server goes on it sees
    // the old data or the new, never an error.
    let rs = up.rs_pid() as i32;
    unsafe { libc::kill(rs, libc::SIGSTOP) };
    let mut pending = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 128k 64k", &uri1])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let still_pending = pending.try_wait().unwrap().is_none();
    let mut reader = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -v 128k 64k", &uri1])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let read_waited = reader.try_wait().unwrap().is_none();
    unsafe { libc::kill(rs, libc::SIGCONT) };
    assert!(
        still_pending,
        "a write in jeopardy was acknowledged while the recovery server was stopped"
    );
    assert!(
        read_waited,
        "a read was answered in jeopardy while the recovery server was stopped"
    );
    assert!(pending.wait().unwrap().success());
    let out = reader.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.get(..9)
                .is_some_and(|h| h.ends_with(':') && h[..8].bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .flat_map(|l| {
            l.split(':')
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .take(16)
        })
        .collect();
    assert!(
        out.status.success() && bytes.len() == 64 << 10,
        "the read once the recovery server went on: {text:.400}"
    );
    assert!(
        bytes.iter().all(|b| *b == "00") || bytes.iter().all(|b| *b == "33"),
        "the read saw neither the old data nor the new: {text:.400}"
    );
    qemu_io_ok(&uri1, &["read -P 0x33 128k 64k"]);
    assert!(log_records(&up).iter().any(|r| r.0 == 32 && r.2 == 0x33));

    // Rejoin.
    up.cli_ok(&["fault", "heal"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    wait_for(
        "jeopardy cleared after rejoin",
        Duration::from_secs(15),
        || jstate(&up, 1, "vol0")["jeopardy"] == false && log_files(&up).is_empty(),
    );
    let rsc: Value = {
        let t = std::fs::read_to_string(up.data.join("rs").join("coord.json")).unwrap();
        serde_json::from_str(t.split_once('\n').unwrap().1).unwrap()
    };
    assert_eq!(rsc["volumes"]["vol0"]["jeopardy"], false, "{rsc}");
    assert!(rsc["volumes"]["vol0"]["config"].is_null(), "{rsc}");
    // The first copy back restores from the recovery server; once it is live the
    // volume has two failure domains again, the flag is cleared and the log deleted,
    // so a copy that rejoins after that catches up by Merkle diff alone.
    let restored: Vec<Value> = [2, 3]
        .iter()
        .map(|&n| up.get(n, "/api/v1/cluster").unwrap()["resync"]["vol0"].clone())
        .collect();
    assert!(
        restored
            .iter()
            .any(|p| p["restore_records"].as_u64().unwrap_or(0) >= 2),
        "no rejoining copy restored from the recovery server: {restored:?}"
    );
    let r1 = up.root(1, "vol0");
    assert_eq!(up.root(2, "vol0"), r1);
    assert_eq!(up.root(3, "vol0"), r1);
    for n in 1..=3 {
        qemu_io_ok(
            &up.uri(n, "vol0"),
            &[
                "read -P 0x10 0 64k",
                "read -P 0x21 64k 64k",
                "read -P 0x33 128k 64k",
            ],
        );
    }
    drop(tmp);
}

/// Two nodes killed: the survivor, without a Raft majority, holds the volume at the
/// recovery server and keeps acknowledging writes through it. Then the last failure
/// domain dies too; a revived replica (current when the log began) restores from its
/// stale copy plus the log and serves every acknowledged write. The others come back,
/// the cluster adopts the recovery server's decision, resyncs, leaves jeopardy, and
/// the whole volume equals what the clients wrote.
#[test]
fn survivor_then_last_failure_domain_dies_and_revived_replica_serves() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    // A snapshot taken on every copy before the faults, of a region no writer touches.
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x5a 8M 1M"]);
    up.cli_ok(&["snapshot", "create", "vol0", "before"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0xa5 8M 1M"]);
    let mut w1 = Writer::start(&up.uri(1, "vol0"), 1, 0, 64, 1_000_000, tmp.path());
    w1.wait_acked(20, Duration::from_secs(30), "writes before the faults");
    up.cli_ok(&["fault", "kill", "--node", "n2"]);
    let a = w1.acked();
    w1.wait_acked(a + 20, Duration::from_secs(30), "writes after n2 died");
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    let a = w1.acked();
    w1.wait_acked(
        a + 40,
        Duration::from_secs(40),
        "the survivor acknowledging writes without a majority",
    );
    assert_eq!(jstate(&up, 1, "vol0")["jeopardy"], true);
    // A snapshot now would be on n1 alone, which the recovery log would not bring
    // back: refused, with the reason.
    let o = up.cli(&["snapshot", "create", "vol0", "during"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() && text.contains("last failure domain"),
        "a snapshot in jeopardy: {text}"
    );
    let n1_acked = w1.finish();
    assert!(!log_records(&up).is_empty());

    // The last failure domain dies; n3 (live until the log began) comes back alone.
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    let region = 5 << 20;
    let mut want = vec![0u8; region];
    w1.apply(n1_acked, &mut want);
    let t0 = Instant::now();
    let got = loop {
        if let Some(b) = read_region(&up.uri(3, "vol0"), region, tmp.path()) {
            break b;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "n3 never served the volume:\n{}",
            up.node_log(3)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_same(
        &got,
        &want,
        "the volume served by n3 after the last failure domain died",
    );
    // The snapshot taken before the faults serves from the copy that took over.
    qemu_io_ok(&up.uri(3, "vol0@before"), &["read -P 0x5a 8M 1M"]);
    qemu_io_ok(&up.uri(3, "vol0"), &["read -P 0xa5 8M 1M"]);
    let mut w2 = Writer::start(&up.uri(3, "vol0"), 2, 4 << 20, 16, 40, tmp.path());
    w2.wait_acked(40, Duration::from_secs(60), "writes through n3 in jeopardy");
    let n3_acked = w2.finish();
    w2.apply(n3_acked, &mut want);

    // Everyone back.
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    let m = up.wait_meta(
        3,
        "vol0",
        Duration::from_secs(60),
        "adopted, all live",
        |m| {
            m["primary"] == 3
                && m["states"]
                    .as_object()
                    .is_some_and(|s| s.values().all(|v| v == "live"))
        },
    );
    assert!(m["failure_count_id"].as_u64().unwrap() >= 2, "{m}");
    wait_for(
        "jeopardy cleared, recovery server emptied",
        Duration::from_secs(20),
        || jstate(&up, 3, "vol0")["jeopardy"] == false && log_files(&up).is_empty(),
    );
    let r = up.root(3, "vol0");
    assert_eq!(up.root(1, "vol0"), r);
    assert_eq!(up.root(2, "vol0"), r);
    for n in 1..=3 {
        let got = read_region(&up.uri(n, "vol0"), region, tmp.path()).unwrap();
        assert_same(
            &got,
            &want,
            &format!("the volume read through n{n} at the end"),
        );
        qemu_io_ok(&up.uri(n, "vol0@before"), &["read -P 0x5a 8M 1M"]);
    }
    let list = up.cli_ok(&["snapshot", "list", "vol0"]);
    assert!(
        list.contains("before") && !list.contains("during"),
        "{list}"
    );
}

/// The recovery server killed (SIGKILL) in the middle of a stream of writes in
/// jeopardy, policy `suspend`: writes wait (none acknowledged without it), go on once
/// it is back, and every acknowledged write is in its log; then everything is
/// identical once protection ends.
#[test]
fn recovery_server_killed_mid_stream_policy_suspend() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    let mut w = Writer::start(&up.uri(1, "vol0"), 1, 0, 32, 1_000_000, tmp.path());
    w.wait_acked(30, Duration::from_secs(30), "writes in jeopardy");
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    let a0 = w.acked();
    std::thread::sleep(Duration::from_secs(2));
    let a1 = w.acked();
    assert!(
        a1 <= a0 + 1,
        "{} writes acknowledged while the recovery server was down (policy suspend)",
        a1 - a0
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    w.wait_acked(
        a1 + 30,
        Duration::from_secs(30),
        "writes after the recovery server came back",
    );
    let n = w.finish();
    // Every acknowledged write is in the log (its slot's last record holds its data or
    // a later write's).
    let recs = log_records(&up);
    for i in n.saturating_sub(32)..n {
        let lba = (i % 32 * CHUNK / 4096) as u64;
        let fill = ((31 + i) % 251 + 1) as u8;
        assert!(
            recs.iter().any(|r| r.0 == lba && r.2 == fill),
            "acknowledged write {i} is not in the recovery server's log"
        );
    }
    up.cli_ok(&["volume", "unprotect", "vol0"]);
    wait_for("protection ended", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == false && log_files(&up).is_empty()
    });
    let mut want = vec![0u8; 2 << 20];
    w.apply(n, &mut want);
    for node in 1..=3 {
        let got = read_region(&up.uri(node, "vol0"), 2 << 20, tmp.path()).unwrap();
        assert_same(&got, &want, &format!("read through n{node}"));
    }
    let r = up.root(1, "vol0");
    assert_eq!(up.root(2, "vol0"), r);
    assert_eq!(up.root(3, "vol0"), r);
}

/// In jeopardy under `suspend` the recovery server is the volume's coordination point
/// (a base copy may take the volume over there once its holder falls silent), so its
/// primary serves on its hold there alone, not on a Raft lease: with the recovery
/// server down, a read through the primary waits instead of being answered (the
/// primary cannot know that nobody took over); it is answered, with the right data,
/// once the recovery server is back. Under `accept` reads go on (`hold_only`).
#[test]
fn jeopardy_under_suspend_serves_on_the_hold_alone() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x5a 128k 64k", "flush"]);
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    // Past any hold renewed before the kill (HOLD_LEASE, 0.5 s).
    std::thread::sleep(Duration::from_secs(1));
    let uri = up.uri(1, "vol0");
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let r = qemu_io(&uri, &["read -P 0x5a 128k 64k"]);
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !reader.is_finished(),
        "a read was answered in jeopardy (policy suspend) with the recovery server down: {:?}",
        reader.join().unwrap()
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    let ((ok, text), took) = reader.join().unwrap();
    assert!(ok, "the read once the recovery server was back: {text}");
    assert!(took >= Duration::from_secs(4), "{took:?}");
    // Policy `accept`, the same order: the primary goes on without the recovery server.
    let data = tmp.path().join("accept");
    drop(up);
    let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", "accept"]);
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for(
        "jeopardy after protect (accept)",
        Duration::from_secs(10),
        || jstate(&up, 1, "vol0")["jeopardy"] == true,
    );
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x5b 128k 64k", "flush"]);
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    qemu_io_ok(&up.uri(1, "vol0"), &["read -P 0x5b 128k 64k"]);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "{:?} under accept",
        t.elapsed()
    );
}

/// The same under policy `accept`: writes go on with the recovery server down, shown
/// as recovery lag; once it is back the primary re-logs what it missed (lag 0) and the
/// log again covers every acknowledged write.
#[test]
fn recovery_server_killed_mid_stream_policy_accept() {
    let (tmp, data) = setup();
    let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", "accept"]);
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    let mut w = Writer::start(&up.uri(1, "vol0"), 1, 0, 32, 1_000_000, tmp.path());
    w.wait_acked(30, Duration::from_secs(30), "writes in jeopardy");
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    let a0 = w.acked();
    w.wait_acked(
        a0 + 30,
        Duration::from_secs(30),
        "writes with the recovery server down (policy accept)",
    );
    let lag = jstate(&up, 1, "vol0")["recovery_lag"].as_u64().unwrap();
    assert!(
        lag > 0,
        "no recovery lag shown while writes go on without the recovery server"
    );
    wait_for(
        "status shows the recovery server down",
        Duration::from_secs(10),
        || {
            let st = up.cli_ok(&["status"]);
            st.contains("recovery lag") && st.contains("DOWN")
        },
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    let n_before = w.acked();
    w.wait_acked(
        n_before + 20,
        Duration::from_secs(30),
        "writes after the recovery server came back",
    );
    let n = w.finish();
    wait_for("recovery lag back to 0", Duration::from_secs(20), || {
        jstate(&up, 1, "vol0")["recovery_lag"] == 0
    });
    // The log (replayed in order) now ends with every slot's last acknowledged data.
    let recs = log_records(&up);
    for slot in 0..32u64 {
        let last = (0..n).filter(|i| *i as u64 % 32 == slot).max().unwrap();
        let fill = ((31 + last) % 251 + 1) as u8;
        let in_log = recs
            .iter()
            .rev()
            .find(|r| r.0 <= slot * 16 && slot * 16 < r.0 + r.1 as u64)
            .map(|r| r.2);
        assert_eq!(
            in_log,
            Some(fill),
            "slot {slot}: the log's last record is not the last acknowledged write {last}"
        );
    }
}

/// `fault device fail` on both replicas takes them out of the count: the leader puts
/// the volume in jeopardy without any write failing; healing brings it back.
#[test]
fn failed_devices_put_the_volume_in_jeopardy() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x41 0 64k"]);
    up.cli_ok(&["fault", "device", "--node", "n2", "fail"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        jstate(&up, 1, "vol0")["jeopardy"],
        false,
        "one failed device of three is not jeopardy"
    );
    up.cli_ok(&["fault", "device", "--node", "n3", "fail"]);
    wait_for(
        "jeopardy after two device failures",
        Duration::from_secs(10),
        || jstate(&up, 1, "vol0")["jeopardy"] == true,
    );
    // Writes go on, through the recovery server; the failed replicas go dead.
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x42 64k 64k"]);
    assert!(log_records(&up).iter().any(|r| r.0 == 16 && r.2 == 0x42));
    up.cli_ok(&["fault", "heal"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    wait_for(
        "jeopardy cleared after the devices healed",
        Duration::from_secs(15),
        || jstate(&up, 1, "vol0")["jeopardy"] == false && log_files(&up).is_empty(),
    );
    for n in 1..=3 {
        qemu_io_ok(
            &up.uri(n, "vol0"),
            &["read -P 0x41 0 64k", "read -P 0x42 64k 64k"],
        );
    }
    let r = up.root(1, "vol0");
    assert_eq!(up.root(2, "vol0"), r);
    assert_eq!(up.root(3, "vol0"), r);
}

/// A clone made while its source is down to its last failure domain (two replicas'
/// devices failed): the new volume would be in jeopardy too, but a clone being made
/// is filled outside it (its log's base would otherwise be its empty copies) and
/// enters once made, its base the filled copy; its writes then go through the
/// recovery server; once the devices heal every copy reads as the snapshot plus
/// those writes. A revert of the source is still refused in jeopardy mode.
#[test]
fn a_clone_made_in_the_last_failure_domain_enters_jeopardy_once_made() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x51 0 1M", "flush"]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x52 0 64k", "flush"]);
    up.cli_ok(&["fault", "device", "--node", "n2", "fail"]);
    up.cli_ok(&["fault", "device", "--node", "n3", "fail"]);
    wait_for(
        "jeopardy after two device failures",
        Duration::from_secs(10),
        || jstate(&up, 1, "vol0")["jeopardy"] == true,
    );
    let o = up.cli(&["volume", "revert", "vol0", "s"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("last failure domain"),
        "a revert in jeopardy mode: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = up.cli_ok(&["volume", "clone", "vol0@s", "c"]);
    eprintln!("clone: {out}");
    wait_for(
        "the clone in jeopardy once made",
        Duration::from_secs(15),
        || jstate(&up, 1, "c")["jeopardy"] == true,
    );
    qemu_io_ok(&up.uri(1, "c"), &["read -P 0x51 0 1M"]);
    qemu_io_ok(&up.uri(1, "c"), &["write -P 0x53 1M 64k", "flush"]);
    up.cli_ok(&["fault", "heal"]);
    up.wait_all_live(1, "c", Duration::from_secs(60));
    up.wait_all_live(1, "vol0", Duration::from_secs(60));
    wait_for(
        "jeopardy cleared after the devices healed",
        Duration::from_secs(20),
        || jstate(&up, 1, "c")["jeopardy"] == false && jstate(&up, 1, "vol0")["jeopardy"] == false,
    );
    for n in 1..=3 {
        qemu_io_ok(
            &up.uri(n, "c"),
            &[
                "read -P 0x51 0 1M",
                "read -P 0x53 1M 64k",
                "read -P 0 1088k 64k",
            ],
        );
        qemu_io_ok(&up.uri(n, "vol0"), &["read -P 0x52 0 64k"]);
    }
    let r = up.root(1, "c");
    assert_eq!(up.root(2, "c"), r);
    assert_eq!(up.root(3, "c"), r);
    drop(tmp);
}

/// No split brain: the primary is isolated from the other nodes (not from the
/// recovery server) while one client writes through it and another through a node of
/// the majority. Exactly one side goes on; afterwards every block holds its writer's
/// last acknowledged write (or a later attempted one), nothing older.
#[test]
fn isolated_primary_no_split_brain() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    let mut a = Writer::start_opt(&up.uri(1, "vol0"), 1, 0, 32, 1_000_000, tmp.path(), true);
    let mut b = Writer::start_opt(
        &up.uri(2, "vol0"),
        2,
        2 << 20,
        32,
        1_000_000,
        tmp.path(),
        true,
    );
    a.wait_acked(20, Duration::from_secs(30), "writer A before the isolation");
    b.wait_acked(20, Duration::from_secs(30), "writer B before the isolation");
    up.cli_ok(&["fault", "isolate", "--node", "n1"]);
    let (a0, b0) = (a.acked(), b.acked());
    std::thread::sleep(Duration::from_secs(6));
    let (a1, b1) = (a.acked(), b.acked());
    // Exactly one side goes on acknowledging writes.
    let a_on = a1 > a0 + 5;
    let b_on = b1 > b0 + 5;
    assert!(
        a_on != b_on,
        "both or neither side acknowledged writes while isolated: A {a0}->{a1}, B {b0}->{b1}"
    );
    eprintln!(
        "isolated for 6 s: {} side went on (A {a0}->{a1}, B {b0}->{b1})",
        if a_on {
            "the isolated primary's"
        } else {
            "the majority's"
        }
    );
    up.cli_ok(&["fault", "heal"]);
    up.wait_meta(
        2,
        "vol0",
        Duration::from_secs(60),
        "all live after heal",
        |m| {
            m["states"]
                .as_object()
                .is_some_and(|s| s.values().all(|v| v == "live"))
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let (a_acked, a_tried) = a.finish_retrying();
    let (b_acked, b_tried) = b.finish_retrying();
    let image = read_region(&up.uri(3, "vol0"), 4 << 20, tmp.path()).unwrap();
    a.check(
        &image,
        &a_acked,
        &a_tried,
        "writer A (through the isolated primary)",
    );
    b.check(
        &image,
        &b_acked,
        &b_tried,
        "writer B (through the majority)",
    );
    let r = up.root(1, "vol0");
    wait_for("copies identical", Duration::from_secs(30), || {
        up.root(2, "vol0") == r && up.root(3, "vol0") == r
    });
}

fn leader(up: &Up) -> u16 {
    let t0 = Instant::now();
    loop {
        for n in 1..=3 {
            if let Some(l) = up
                .get(n, "/api/v1/cluster")
                .and_then(|v| v["leader"].as_u64())
            {
                return l as u16;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request to the recovery server over its RPC framing, as a member of the cluster
/// sends it (with n2's credentials: a stray claim comes from a member, such as a leader
/// cut off from the others): (status, body).
fn rs_call(up: &Up, kind: u8, body: &Value) -> (u8, Vec<u8>) {
    let creds = up.member_credentials();
    let client = lazarus_rpc::RpcClient::new(&format!("127.0.0.1:{}", up.base + 30))
        .with_credentials(Some(creds));
    let b = serde_json::to_vec(body).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(client.call(kind, &b, Duration::from_secs(10))) {
        Ok(reply) => (0, reply),
        Err(lazarus_rpc::RpcError::Remote { code, message }) => (code as u8, message.into_bytes()),
        Err(e) => panic!("the recovery server did not answer a member: {e}"),
    }
}

/// Correctness issue, section 0: the recovery server's compare-and-set never makes a
/// dead, stale copy primary. A claim for a copy that missed a write is refused there
/// (the primary recorded it out before acknowledging the write). A claim for another
/// copy the metadata never promoted (as a leader cut off from the others made one,
/// fencing a promotion its quorum never committed) is granted there, but the cluster
/// does not adopt it: it fences the recovery server back to the current primary,
/// which goes on serving every write.
#[test]
fn stray_claim_for_a_stale_copy_is_not_adopted() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    // n3 misses a write: dead and stale.
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x51 0 64k", "flush"]);
    // Committed before the write was acknowledged: in the leader's applied metadata
    // now (a follower, n1 among them, may apply it a moment later).
    let m = up.volume_meta(leader(&up), "vol0").unwrap();
    assert_eq!(m["states"]["3"], "dead", "{m}");
    let fcid = m["failure_count_id"].as_u64().unwrap();
    let claim = |holder: u64| {
        let (status, reply) = rs_call(
            &up,
            40,
            &serde_json::json!({
                "volume": "vol0", "uid": m["uid"], "expect_fcid": fcid, "holder": holder,
                "epoch": m["epoch"].as_u64().unwrap() + 1, "jeopardy": false,
                "config": null, "base": [],
            }),
        );
        assert_eq!(status, 0);
        serde_json::from_slice::<Value>(&reply).unwrap()
    };
    let reply = claim(3);
    assert!(
        reply["granted"] == false && reply["reason"].as_str().unwrap().contains("out"),
        "a claim for the copy that missed a write: {reply}"
    );
    let reply = claim(2);
    assert!(
        reply["granted"] == true,
        "the stray claim was not even granted: {reply}"
    );
    let mut w = Writer::start_opt(
        &up.uri(1, "vol0"),
        5,
        1 << 20,
        16,
        1_000_000,
        tmp.path(),
        true,
    );
    // The leader fences it back: the metadata's failure count ID moves past the
    // stray one, and n1 stays primary throughout.
    let t0 = Instant::now();
    loop {
        let m = up.volume_meta(2, "vol0").unwrap();
        assert_eq!(m["primary"], 1, "a stray claim changed the primary: {m}");
        assert_eq!(m["states"]["3"], "dead", "{m}");
        if m["failure_count_id"].as_u64().unwrap() > fcid + 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the stray claim was never fenced back: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a0 = w.acked();
    w.wait_acked(
        a0 + 10,
        Duration::from_secs(20),
        "writes after the re-fence",
    );
    up.cli_ok(&["fault", "heal"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let (acked, tried) = w.finish_retrying();
    let m = up.volume_meta(3, "vol0").unwrap();
    assert_eq!(m["primary"], 1, "{m}");
    for n in 1..=3 {
        let image = read_region(&up.uri(n, "vol0"), 2 << 20, tmp.path()).unwrap();
        assert!(image[..CHUNK].iter().all(|b| *b == 0x51), "through n{n}");
        w.check(&image, &acked, &tried, &format!("through n{n}"));
    }
}

/// Correctness issue, section 0 (the leader's side): a Raft leader that is not the
/// volume's primary, cut off from the other nodes but not from the recovery server,
/// sees the primary fall silent and only itself answering — it must not promote
/// itself. The primary goes on under the majority, and every acknowledged write reads
/// back through every node after the heal.
#[test]
fn isolated_leader_never_promotes_itself() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let l = leader(&up);
    let p = if l == 1 { 2 } else { 1 };
    // A volume whose primary is p (the node whose API creates it), not the leader.
    let o = Command::new("curl")
        .args([
            "-sf",
            "-m",
            "30",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            &up.auth_header(),
        ])
        .args([
            "-d",
            &format!(r#"{{"name":"iso","size":"64MiB","primary":"n{p}"}}"#),
        ])
        .arg(format!("{}/api/v1/volumes", up.admin(p)))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let m = up.wait_all_live(p, "iso", Duration::from_secs(30));
    assert_eq!(m["primary"], p);
    let mut w = Writer::start_opt(&up.uri(p, "iso"), 6, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the isolation");
    up.cli_ok(&["fault", "isolate", "--node", &format!("n{l}")]);
    let a0 = w.acked();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        let j = jstate(&up, p, "iso");
        assert_ne!(
            j["recovery_server"]["holder"], l,
            "the isolated leader n{l} claimed the volume at the recovery server: {j}"
        );
        if let Some(m) = up.volume_meta(p, "iso") {
            assert_eq!(m["primary"], p, "{m}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    w.wait_acked(
        a0 + 10,
        Duration::from_secs(20),
        "writes under the majority",
    );
    up.cli_ok(&["fault", "heal"]);
    up.wait_all_live(p, "iso", Duration::from_secs(60));
    let (acked, tried) = w.finish_retrying();
    for n in 1..=3 {
        let image = read_region(&up.uri(n, "iso"), 2 << 20, tmp.path()).unwrap();
        w.check(&image, &acked, &tried, &format!("iso through n{n}"));
    }
    let r = up.root(p, "iso");
    wait_for("copies identical", Duration::from_secs(30), || {
        (1..=3).all(|n| up.root(n, "iso") == r)
    });
}

/// Correctness issue, section 3: a volume in jeopardy with live replicas (protected by
/// an administrator) whose primary is cut off from the other nodes but not from the
/// recovery server. The writes it acknowledges meanwhile are never lost: after the heal
/// every copy holds them, and when the primary dies afterwards its successor serves them.
#[test]
fn jeopardy_isolated_primary_writes_survive_heal_and_its_death() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 7, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the isolation");
    up.cli_ok(&["fault", "isolate", "--node", "n1"]);
    let a0 = w.acked();
    w.wait_acked(
        a0 + 8,
        Duration::from_secs(60),
        "writes acknowledged while isolated",
    );
    up.cli_ok(&["fault", "heal"]);
    // Every copy holds every acknowledged write once the copies are live again.
    up.wait_all_live(2, "vol0", Duration::from_secs(90));
    let (acked, tried) = w.finish_retrying();
    let r = up.root(1, "vol0");
    wait_for(
        "copies identical after the heal",
        Duration::from_secs(30),
        || up.root(2, "vol0") == r && up.root(3, "vol0") == r,
    );
    w.check_every_node(&up, &acked, &tried, tmp.path(), "after the heal");
    // The primary dies: its successor serves every acknowledged write.
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    let p = new_primary(&up, Duration::from_secs(20));
    let image = read_through(&up, p, Duration::from_secs(20), tmp.path());
    w.check(&image, &acked, &tried, "after the primary died");
}

/// Correctness issue, section 3, the other order: the protected volume's primary is
/// isolated, acknowledges writes, and dies before any heal. The cluster must not
/// promote a live replica that lacks those writes: a copy current when the log began
/// replays the recovery server's log and serves them.
#[test]
fn jeopardy_isolated_primary_dies_and_the_log_is_replayed() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 8, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the isolation");
    up.cli_ok(&["fault", "isolate", "--node", "n1"]);
    let a0 = w.acked();
    w.wait_acked(
        a0 + 8,
        Duration::from_secs(60),
        "writes acknowledged while isolated",
    );
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    let (acked, tried) = w.finish_retrying();
    up.cli_ok(&["fault", "heal"]);
    let p = new_primary(&up, Duration::from_secs(60));
    let image = read_through(&up, p, Duration::from_secs(30), tmp.path());
    w.check(
        &image,
        &acked,
        &tried,
        &format!("through the new primary n{p}"),
    );
    let other = if p == 2 { 3 } else { 2 };
    up.wait_meta(
        p,
        "vol0",
        Duration::from_secs(60),
        "the other copy live",
        |m| m["states"][other.to_string()] == "live",
    );
    let image = read_region(&up.uri(other, "vol0"), 2 << 20, tmp.path()).unwrap();
    w.check(&image, &acked, &tried, &format!("through n{other}"));
}

/// Correctness issue, section 3, with `volume unprotect`: the protected volume's primary
/// is isolated and acknowledges writes through the recovery server alone; an
/// administrator then unprotects the volume through another node (`unprotect_at_once`:
/// right after the isolation, before the primary has claimed the volume alone). Leaving jeopardy must
/// not drop the log those writes are in before every copy that may serve next has them:
/// whether the primary dies before the heal (`die_before_heal`) or after it, its
/// successor serves every acknowledged write.
fn isolated_primary_then_unprotect(tag: u64, unprotect_at_once: bool, die_before_heal: bool) {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), tag, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the isolation");
    up.cli_ok(&["fault", "isolate", "--node", "n1"]);
    let a0 = w.acked();
    if !unprotect_at_once {
        w.wait_acked(
            a0 + 8,
            Duration::from_secs(60),
            "writes acknowledged while isolated",
        );
    }
    let n2 = up.admin(2);
    up.cli_ok(&["volume", "unprotect", "vol0", "--api", &n2]);
    up.wait_meta(2, "vol0", Duration::from_secs(10), "unprotected", |m| {
        m["protected"] == false
    });
    // Let whatever leaving jeopardy does run while the primary is still cut off.
    let a1 = w.acked();
    std::thread::sleep(Duration::from_secs(4));
    eprintln!(
        "acknowledged while isolated: {} before unprotect, {} after",
        a1 - a0,
        w.acked() - a1
    );
    if die_before_heal {
        up.cli_ok(&["fault", "kill", "--node", "n1"]);
        up.cli_ok(&["fault", "heal"]);
    } else {
        up.cli_ok(&["fault", "heal"]);
        up.wait_all_live(2, "vol0", Duration::from_secs(90));
        // The writer stops so that the copies can be compared.
        w.finish_retrying();
        let r = up.root(1, "vol0");
        wait_for(
            "copies identical after the heal",
            Duration::from_secs(30),
            || up.root(2, "vol0") == r && up.root(3, "vol0") == r,
        );
        up.cli_ok(&["fault", "kill", "--node", "n1"]);
    }
    let (acked, tried) = w.finish_retrying();
    let p = new_primary(&up, Duration::from_secs(60));
    let image = read_through(&up, p, Duration::from_secs(30), tmp.path());
    w.check(
        &image,
        &acked,
        &tried,
        &format!("through the new primary n{p} after n1 died"),
    );
}

#[test]
fn jeopardy_isolated_primary_unprotected_dies_before_the_heal() {
    isolated_primary_then_unprotect(11, false, true);
}

#[test]
fn jeopardy_primary_isolated_and_unprotected_at_once_dies() {
    isolated_primary_then_unprotect(13, true, true);
}

#[test]
fn jeopardy_isolated_primary_unprotected_healed_then_dies() {
    isolated_primary_then_unprotect(12, false, false);
}

/// Correctness issue, section 3, jeopardy by failure history: n2 stays live but has failed
/// too often to count as a failure domain, and n3's device fails, so the volume is down to
/// one domain with a live replica. The primary is then isolated and acknowledges writes
/// that n2 never sees; when it dies, n2 must not simply be promoted: it serves only after
/// replaying the recovery server's log, with every acknowledged write.
#[test]
fn jeopardy_by_failure_history_isolated_primary_dies() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 14, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(5, Duration::from_secs(30), "first writes");
    // Four failures of n2 within the window (three are allowed).
    for round in 0..4 {
        up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
        up.wait_meta(1, "vol0", Duration::from_secs(20), "n2 dead", |m| {
            m["states"]["2"] == "dead"
        });
        up.cli_ok(&["fault", "heal", "--from", "n1", "--to", "n2"]);
        if round < 3 {
            up.wait_all_live(1, "vol0", Duration::from_secs(60));
        }
    }
    up.wait_all_live(1, "vol0", Duration::from_secs(60));
    assert_eq!(
        jstate(&up, 1, "vol0")["jeopardy"],
        false,
        "n1 and n3 are two failure domains"
    );
    up.cli_ok(&["fault", "device", "--node", "n3", "fail"]);
    wait_for(
        "jeopardy by failure history",
        Duration::from_secs(20),
        || jstate(&up, 1, "vol0")["jeopardy"] == true,
    );
    up.wait_meta(1, "vol0", Duration::from_secs(20), "n2 live", |m| {
        m["states"]["2"] == "live"
    });
    let a0 = w.acked();
    w.wait_acked(a0 + 5, Duration::from_secs(30), "writes in jeopardy");
    up.cli_ok(&["fault", "isolate", "--node", "n1"]);
    let a1 = w.acked();
    w.wait_acked(
        a1 + 8,
        Duration::from_secs(60),
        "writes acknowledged while isolated",
    );
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    let (acked, tried) = w.finish_retrying();
    eprintln!(
        "acknowledged: {} in all, {} while isolated",
        acked.len(),
        w.acked() - a1
    );
    let p = new_primary(&up, Duration::from_secs(60));
    assert_eq!(p, 2, "only n2 has a working device");
    let image = read_through(&up, p, Duration::from_secs(30), tmp.path());
    w.check(&image, &acked, &tried, "through n2 after n1 died");
}

/// Correctness issue, section 5: the last failure domain dies while the recovery server
/// restarts. The recovery server comes back without any memory of when the holder last
/// renewed; it must still let a base copy take over once the holder stays silent, and
/// that copy serves every acknowledged write.
#[test]
fn last_failure_domain_dies_while_the_recovery_server_restarts() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 15, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(5, Duration::from_secs(30), "first writes");
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    wait_for(
        "jeopardy with n1 the last copy",
        Duration::from_secs(20),
        || jstate(&up, 1, "vol0")["jeopardy"] == true,
    );
    let a0 = w.acked();
    w.wait_acked(a0 + 10, Duration::from_secs(30), "writes in jeopardy");
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    let (acked, tried) = w.finish_retrying();
    up.cli_ok(&["fault", "heal"]);
    let t0 = Instant::now();
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    let p = new_primary(&up, Duration::from_secs(60));
    let image = read_through(&up, p, Duration::from_secs(60), tmp.path());
    eprintln!(
        "n{p} served {:.2} s after the recovery server's restart",
        t0.elapsed().as_secs_f64()
    );
    w.check(
        &image,
        &acked,
        &tried,
        &format!("through n{p} after the take-over"),
    );
}

/// One jeopardy policy for the whole cluster: a node started with `suspend` in a cluster
/// started with `accept` puts every node under `suspend` (a primary serving on a Raft
/// lease under `accept` next to a copy taking the volume over under `suspend` could be
/// two servers); once it is restarted with `accept`, `accept` is back.
#[test]
fn a_node_with_another_policy_puts_the_cluster_under_suspend() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", "accept"]);
    let policy = |n: u16| -> Value {
        up.get(n, "/api/v1/cluster")
            .map(|v| v["jeopardy"]["recovery_server"]["policy"].clone())
            .unwrap_or(Value::Null)
    };
    wait_for("policy accept", Duration::from_secs(10), || {
        (1..=3).all(|n| policy(n) == "accept")
    });
    // n3 is held down (`fault kill`) and started by hand with policy suspend; `fault
    // revive` later starts it again as `lazarus up` configures it (accept).
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    let cfg = std::fs::read_to_string(data.join("n3").join("node.toml")).unwrap();
    assert!(cfg.contains("jeopardy_policy = \"accept\""), "{cfg}");
    let cfg = cfg.replace(
        "jeopardy_policy = \"accept\"",
        "jeopardy_policy = \"suspend\"",
    );
    let cfg_path = data.join("n3-suspend.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("n3").join("node.log"))
        .unwrap();
    // `fault kill` returns once the signal is sent: the old n3 holds its data
    // directory's lock until it has exited.
    wait_for("n3's old process gone", Duration::from_secs(15), || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(data.join("n3").join("LOCK")).unwrap();
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    });
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let n3 = KillOnDrop(
        Command::new(BIN)
            .arg("node")
            .arg("--config")
            .arg(&cfg_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("every node under suspend", Duration::from_secs(30), || {
        (1..=3).all(|n| policy(n) == "suspend")
    });
    let status = up.cli_ok(&["status", "--api", &up.admin(1)]);
    assert!(status.contains("POLICY MISMATCH"), "{status}");
    // Suspend's rule holds at n1 although n1 was started with accept: in jeopardy with
    // the recovery server down, a read waits for it.
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x5c 128k 64k", "flush"]);
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    std::thread::sleep(Duration::from_secs(1));
    let uri = up.uri(1, "vol0");
    let reader = std::thread::spawn(move || qemu_io(&uri, &["read -P 0x5c 128k 64k"]));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !reader.is_finished(),
        "a read was answered in jeopardy with the recovery server down although n3 says suspend: {:?}",
        reader.join().unwrap()
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    let (ok, text) = reader.join().unwrap();
    assert!(ok, "the read once the recovery server was back: {text}");
    drop(n3);
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    wait_for(
        "every node under accept again",
        Duration::from_secs(30),
        || (1..=3).all(|n| policy(n) == "accept"),
    );
}

/// Three nodes and a writer (tag `tag`) through n3, flushing as it goes; the primary n1
/// and the replica n2 killed together; n3 survives (it holds the volume at the recovery
/// server; the metadata, without a majority, learns it once the others are back) and
/// acknowledges writes; then n1 and n2 are revived at once. Returns right after the
/// revive.
fn double_kill_survived_and_revived(tag: u64) -> (tempfile::TempDir, Up, Writer) {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let w = Writer::start_opt(&up.uri(3, "vol0"), tag, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "first writes");
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    up.cli_ok(&["fault", "kill", "--node", "n2"]);
    wait_for("n3 the survivor", Duration::from_secs(30), || {
        jstate(&up, 3, "vol0")["held_at_recovery_server"] == true
    });
    let a0 = w.acked();
    w.wait_acked(
        a0 + 5,
        Duration::from_secs(30),
        "writes through the survivor n3",
    );
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    (tmp, up, w)
}

/// Correctness issue, section 0, in the issue's own order with real processes: a writer
/// flushing as it goes; the primary n1 and the replica n2 killed together and revived
/// (n3 survives and serves, both resync to live); then n1 isolated from the nodes but
/// not from the recovery server while the writer goes on through n3 for longer than
/// any lease and hold. n1, dead and stale, must never become primary again, and after
/// the heal every copy reads every acknowledged write.
#[test]
fn stale_isolated_copy_after_a_double_failure_is_never_made_primary() {
    let (tmp, up, mut w) = double_kill_survived_and_revived(16);
    let m = up.wait_meta(3, "vol0", Duration::from_secs(90), "n1 and n2 back", |m| {
        m["primary"] == 3 && (1..=3).all(|n| m["states"][n.to_string()] == "live")
    });
    let epoch = m["epoch"].as_u64().unwrap();
    up.cli_ok(&["fault", "isolate", "--node", "n1"]);
    up.wait_meta(3, "vol0", Duration::from_secs(20), "n1 dead", |m| {
        m["states"]["1"] == "dead"
    });
    // Well past every lease and hold n1 could have had.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        for n in [2, 3] {
            if let Some(m) = up.volume_meta(n, "vol0") {
                assert_eq!(
                    m["primary"], 3,
                    "the primary changed while n1 was cut off: {m}"
                );
                assert_ne!(m["states"]["1"], "live", "n1 live while cut off: {m}");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let a1 = w.acked();
    w.wait_acked(
        a1 + 10,
        Duration::from_secs(30),
        "writes after the isolation",
    );
    up.cli_ok(&["fault", "heal"]);
    let m = up.wait_all_live(3, "vol0", Duration::from_secs(90));
    assert_eq!(m["primary"], 3, "{m}");
    assert_eq!(m["epoch"].as_u64().unwrap(), epoch, "{m}");
    let (acked, tried) = w.finish_retrying();
    let r = up.root(3, "vol0");
    wait_for(
        "copies identical after the heal",
        Duration::from_secs(30),
        || up.root(1, "vol0") == r && up.root(2, "vol0") == r,
    );
    w.check_every_node(&up, &acked, &tried, tmp.path(), "after the heal");
}

/// Correctness issue, section 8, its schedule forced: a writer flushing as it goes; the
/// primary and a replica killed together, then both revived at once, and reads through
/// the old primary's NBD port from the moment it is back. A returning node holds or
/// refuses connections until it knows the cluster: a read may wait or find no server,
/// never answer EIO. Every copy turns live again, and the old primary serves every
/// acknowledged write.
#[test]
fn double_kill_and_revive_reads_through_the_old_primary_at_once() {
    let (tmp, up, mut w) = double_kill_survived_and_revived(17);
    let t0 = Instant::now();
    let mut served = 0;
    while t0.elapsed() < Duration::from_secs(15) {
        let (ok, text) = qemu_io(&up.uri(1, "vol0"), &["read 0 2M"]);
        assert!(
            !text.contains("Input/output error"),
            "a read through the returning n1 answered EIO after {:?}: {text}",
            t0.elapsed()
        );
        served += ok as usize;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served > 0, "n1 never served in 15 s after its return");
    let m = up.wait_meta(3, "vol0", Duration::from_secs(60), "every copy live", |m| {
        (1..=3).all(|n| m["states"][n.to_string()] == "live")
    });
    eprintln!(
        "{served} reads served through n1; primary n{}",
        m["primary"]
    );
    let (acked, tried) = w.finish_retrying();
    w.check_every_node(&up, &acked, &tried, tmp.path(), "after the heal");
}

/// Correctness issue, section 6: the volume falls to its last copy (both replicas cut
/// off by `fault drop`, so the metadata still has its majority) while the recovery
/// server is already down. Policy `accept`: the write is acknowledged at once, counted
/// as lag, and put on the recovery server once it is back. (Before, the connect error's
/// text "Connection refused" read as the recovery server refusing a claim.)
#[test]
fn last_copy_with_the_recovery_server_down_policy_accept() {
    let (_tmp, data) = setup();
    let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", "accept"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    let t0 = Instant::now();
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x61 0 64k", "flush"]);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the write took {:?} under accept",
        t0.elapsed()
    );
    let j = jstate(&up, 1, "vol0");
    assert!(j["recovery_lag"].as_u64().unwrap() > 0, "{j}");
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    wait_for(
        "the lag put on the recovery server",
        Duration::from_secs(30),
        || {
            let j = jstate(&up, 1, "vol0");
            j["jeopardy"] == true && j["recovery_lag"] == 0
        },
    );
    assert!(
        log_records(&up).iter().any(|r| r.0 == 0 && r.2 == 0x61),
        "the write acknowledged without the recovery server is not in its log: {:?}",
        log_records(&up)
    );
    qemu_io_ok(&up.uri(1, "vol0"), &["read -P 0x61 0 64k"]);
}

/// Section 6, policy `suspend`: the write waits while the recovery server is down (it
/// is not acknowledged, nor failed at once), and completes once it is back, logged.
#[test]
fn last_copy_with_the_recovery_server_down_policy_suspend() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n3"]);
    let mut w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x62 0 64k", "-c", "flush"])
        .arg(up.uri(1, "vol0"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        w.try_wait().unwrap().is_none(),
        "the write did not wait for the recovery server under suspend"
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    let o = w.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && !text.contains("error") && !text.contains("failed"),
        "{text}"
    );
    assert!(
        log_records(&up).iter().any(|r| r.0 == 0 && r.2 == 0x62),
        "{:?}",
        log_records(&up)
    );
    assert_eq!(jstate(&up, 1, "vol0")["jeopardy"], true);
}

/// Section 6 in the issue's own order: the recovery server killed first, then both
/// replicas (SIGKILL, so the primary loses its majority too), then a write through
/// the primary. Under either policy it is not acknowledged: the primary cannot tell
/// the recovery server's death from its own isolation while a majority promotes
/// another copy (docs/jeopardy.md, policy). Once the recovery server is back the
/// primary claims the volume there as its last failure domain and writes go on, each
/// in the recovery server's log, the data flushed before the faults intact.
#[test]
fn recovery_server_then_both_replicas_killed_under_each_policy() {
    let (tmp, _) = setup();
    for policy in ["suspend", "accept"] {
        let data = tmp.path().join(policy);
        let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", policy]);
        up.wait_all_live(1, "vol0", Duration::from_secs(30));
        let uri = up.uri(1, "vol0");
        qemu_io_ok(&uri, &["write -P 0x71 0 64k", "flush"]);
        up.cli_ok(&["fault", "kill", "--node", "rs"]);
        up.cli_ok(&["fault", "kill", "--node", "n2"]);
        up.cli_ok(&["fault", "kill", "--node", "n3"]);
        let (ok, text) = qemu_io(&uri, &["write -P 0x72 64k 64k", "flush"]);
        assert!(
            !ok,
            "a write acknowledged with neither a majority nor the recovery server ({policy}): {text}"
        );
        up.cli_ok(&["fault", "revive", "--node", "rs"]);
        let t0 = Instant::now();
        wait_for(
            "a write acknowledged once the recovery server is back",
            Duration::from_secs(40),
            || qemu_io(&uri, &["write -P 0x73 128k 64k", "flush"]).0,
        );
        eprintln!(
            "{policy}: writes went on {:?} after the recovery server came back",
            t0.elapsed()
        );
        assert!(
            log_records(&up).iter().any(|r| r.0 == 32 && r.2 == 0x73),
            "the write under the last failure domain is not in the recovery server's log ({policy}): {:?}",
            log_records(&up)
        );
        qemu_io_ok(&uri, &["read -P 0x71 0 64k", "read -P 0x73 128k 64k"]);
        let j = jstate(&up, 1, "vol0");
        assert_eq!(j["jeopardy"], true, "{policy}: {j}");
    }
}

/// Correctness issue, section 5: a rejoining copy replays only the latest version of
/// each block from the recovery server's log — a block overwritten 20 times while the
/// copy was away arrives once — and ends identical.
#[test]
fn rejoin_replays_each_block_once() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    let mut cmds: Vec<String> = (1..=20).map(|i| format!("write -P {i} 0 64k")).collect();
    cmds.push("write -P 0x77 1M 64k".into());
    cmds.push("flush".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(&up.uri(1, "vol0"), &cmds);
    assert!(log_records(&up).len() >= 21, "{:?}", log_records(&up));
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(60));
    let p = up.get(3, "/api/v1/cluster").unwrap()["resync"]["vol0"].clone();
    let records = p["restore_records"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&records),
        "the rejoining copy replayed {records} records for 2 blocks: {p}"
    );
    assert_eq!(up.root(3, "vol0"), up.root(1, "vol0"));
    qemu_io_ok(
        &up.uri(3, "vol0"),
        &["read -P 20 0 64k", "read -P 0x77 1M 64k"],
    );
}

/// Correctness issue, section 5: the recovery server's log is compacted on disk while
/// the volume stays in jeopardy (here past 1 MiB, set through the environment): 160
/// overwrites of the same 64 KiB leave a log of a few records, not 10 MiB, and a copy
/// that rejoins restores from the compacted log and ends identical.
#[test]
fn the_recovery_log_is_compacted_on_disk_and_a_rejoin_restores_from_it() {
    let (_tmp, data) = setup();
    let up = Up::start_env(
        &data,
        "64MiB",
        &[("LAZARUS_RS_COMPACT_MIN_BYTES", "1048576")],
    );
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["volume", "protect", "vol0"]);
    wait_for("jeopardy after protect", Duration::from_secs(10), || {
        jstate(&up, 1, "vol0")["jeopardy"] == true
    });
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    for round in 0..4 {
        let mut cmds: Vec<String> = (1..=40)
            .map(|i| format!("write -P {} 0 64k", round * 40 + i))
            .collect();
        cmds.push(format!(
            "write -P {} {}k 4k",
            0x80 + round,
            1024 + round * 4
        ));
        cmds.push("flush".into());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_ok(&up.uri(1, "vol0"), &cmds);
    }
    let bytes: u64 = log_files(&up)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let records = log_records(&up);
    assert!(
        bytes < 2 << 20 && records.len() < 40,
        "{bytes} bytes, {} records: the log was not compacted",
        records.len()
    );
    // The latest version of every block is there.
    assert!(records.contains(&(0, 16, 160)), "{records:?}");
    for round in 0..4u64 {
        assert!(
            records.contains(&(256 + round, 1, 0x80 + round as u8)),
            "{records:?}"
        );
    }
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(60));
    assert_eq!(up.root(3, "vol0"), up.root(1, "vol0"));
    qemu_io_ok(
        &up.uri(3, "vol0"),
        &[
            "read -P 160 0 64k",
            "read -P 0x80 1M 4k",
            "read -P 0x83 1036k 4k",
        ],
    );
}

/// Correctness issue, section 4: the primary and one replica killed together; the
/// remaining replica — live, with every acknowledged write — serves within seconds as
/// the volume's survivor (every write on the recovery server first): it reads back
/// every acknowledged write and acknowledges new ones. When the two return, the
/// cluster adopts it as primary and every copy ends identical.
#[test]
fn primary_and_replica_die_the_surviving_replica_serves() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    // Through n3's port: forwarded to n1 now, served by n3 itself later.
    let mut w = Writer::start_opt(&up.uri(3, "vol0"), 9, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(20, Duration::from_secs(30), "writes before the failures");
    let (p1, p2) = (up.node_pid(1) as i32, up.node_pid(2) as i32);
    std::fs::write(up.data.join("n1").join("KILLED"), b"").ok();
    std::fs::write(up.data.join("n2").join("KILLED"), b"").ok();
    unsafe {
        libc::kill(p1, libc::SIGKILL);
        libc::kill(p2, libc::SIGKILL);
    }
    let t0 = Instant::now();
    let a0 = w.acked();
    // A write or two in flight may be answered by n1 just before it died: count three.
    w.wait_acked(
        a0 + 3,
        Duration::from_secs(30),
        "the survivor acknowledging writes",
    );
    let took = t0.elapsed();
    eprintln!("primary and a replica killed: the survivor acknowledged 3 writes {took:?} later");
    w.wait_acked(
        a0 + 20,
        Duration::from_secs(30),
        "writes through the survivor",
    );
    let j = jstate(&up, 3, "vol0");
    assert_eq!(j["recovery_server"]["holder"], 3, "{j}");
    let (acked, tried) = w.finish_retrying();
    let image = read_region(&up.uri(3, "vol0"), 2 << 20, tmp.path()).unwrap();
    w.check(&image, &acked, &tried, "through the survivor n3");
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    up.wait_meta(
        3,
        "vol0",
        Duration::from_secs(90),
        "adopted, all live",
        |m| {
            m["primary"] == 3
                && m["states"]
                    .as_object()
                    .is_some_and(|s| s.values().all(|v| v == "live"))
        },
    );
    let r = up.root(3, "vol0");
    wait_for("copies identical", Duration::from_secs(30), || {
        up.root(1, "vol0") == r && up.root(2, "vol0") == r
    });
    w.check_every_node(&up, &acked, &tried, tmp.path(), "at the end");
}

/// Section 4, the other side: a replica cut off from the other nodes (not from the
/// recovery server) never serves on its own — the primary goes on with the majority
/// and the recovery server hears from it — and once the primary acknowledged writes
/// without it, it never claims the volume even after both others die.
#[test]
fn cut_off_replica_never_serves_and_a_stale_one_never_survives() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 10, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the isolation");
    up.cli_ok(&["fault", "isolate", "--node", "n3"]);
    let a0 = w.acked();
    w.wait_acked(a0 + 10, Duration::from_secs(30), "writes without n3");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let j = jstate(&up, 3, "vol0");
        assert_ne!(
            j["recovery_server"]["holder"], 3,
            "the cut-off replica claimed: {j}"
        );
        assert_ne!(j["held_at_recovery_server"], true, "{j}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (acked, tried) = w.finish_retrying();
    let m = up.volume_meta(1, "vol0").unwrap();
    assert_eq!(m["states"]["3"], "dead", "{m}");
    // n1 and n2 die; n3, stale and still cut off from them, must not serve.
    stale_n3_never_survives(&up, Duration::from_secs(6), "the stale replica claimed");
    heal_and_check_flushed(&up, &w, &acked, &tried, tmp.path());
}

/// Kills n1 and n2 (SIGKILL) and checks for `watch` that n3, stale, never claims the
/// volume at the recovery server nor serves as its survivor.
fn stale_n3_never_survives(up: &Up, watch: Duration, what: &str) {
    for n in [1u16, 2] {
        std::fs::write(up.data.join(format!("n{n}")).join("KILLED"), b"").ok();
        unsafe { libc::kill(up.node_pid(n) as i32, libc::SIGKILL) };
    }
    let t0 = Instant::now();
    while t0.elapsed() < watch {
        let j = jstate(up, 3, "vol0");
        assert_ne!(j["recovery_server"]["holder"], 3, "{what}: {j}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !up.node_log(3).contains("serves the volume as its survivor"),
        "n3 served as a survivor"
    );
}

/// Everyone back (n1 has every acknowledged write; n3 resyncs): both copies that had
/// the last writes were killed, so what they had not flushed may be gone (NBD's
/// contract); every write acknowledged before an acknowledged flush (jwriter flushes
/// after writes 0, 4, 8, ...) must be there, through every node.
fn heal_and_check_flushed(
    up: &Up,
    w: &Writer,
    acked: &[usize],
    tried: &[usize],
    tmp: &std::path::Path,
) {
    up.cli_ok(&["fault", "heal"]);
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(90));
    let flushed = acked.iter().copied().filter(|i| i % 4 == 0).max().unwrap();
    let durable: Vec<usize> = acked.iter().copied().filter(|i| *i <= flushed).collect();
    for n in 1..=3 {
        let image = read_region(&up.uri(n, "vol0"), 2 << 20, tmp).unwrap();
        w.check(&image, &durable, tried, &format!("through n{n} at the end"));
    }
}

/// Under `accept` the survivor claim is off. There the primary, with the recovery
/// server down, marks a silent replica dead and acknowledges writes without
/// recording it out there first; once the recovery server is back, nothing there
/// tells that replica from one that missed nothing (docs/model.md,
/// `survivor_without_out`). Here: n3 cut off from the nodes (not from the recovery
/// server, which is down), n1 marks it dead and goes on; the recovery server
/// returns, n1 and n2 die: n3 must not serve its stale copy.
#[test]
fn policy_accept_stale_replica_never_survives() {
    let (tmp, data) = setup();
    let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", "accept"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 12, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the faults");
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    up.cli_ok(&["fault", "isolate", "--node", "n3"]);
    up.wait_meta(1, "vol0", Duration::from_secs(30), "n3 dead", |m| {
        m["states"]["3"] == "dead"
    });
    let a0 = w.acked();
    w.wait_acked(
        a0 + 10,
        Duration::from_secs(30),
        "writes without n3 (accept)",
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    let a1 = w.acked();
    w.wait_acked(
        a1 + 5,
        Duration::from_secs(30),
        "writes with the recovery server back",
    );
    let (acked, tried) = w.finish_retrying();
    stale_n3_never_survives(
        &up,
        Duration::from_secs(8),
        "the stale replica claimed under accept",
    );
    heal_and_check_flushed(&up, &w, &acked, &tried, tmp.path());
}

/// The price of survivor claims, per policy: with the recovery server down, a replica
/// that dies leaves the primary unable to prove that no survivor serves without it.
/// `accept`: the primary marks the silent replica dead and goes on with the other one.
/// `suspend`: writes wait until the recovery server is back, then go on; none is lost.
#[test]
fn replica_lost_while_the_recovery_server_is_down_follows_the_policy() {
    let (tmp, data) = setup();
    let up = Up::start_with(&data, "64MiB", &["--jeopardy-policy", "accept"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 11, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the faults");
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    let a0 = w.acked();
    w.wait_acked(a0 + 20, Duration::from_secs(20), "writes under accept");
    let m = up.volume_meta(1, "vol0").unwrap();
    assert_eq!(m["states"]["3"], "dead", "{m}");
    let (acked, tried) = w.finish_retrying();
    let image = read_region(&up.uri(2, "vol0"), 2 << 20, tmp.path()).unwrap();
    w.check(&image, &acked, &tried, "through n2 under accept");
    drop(up);

    let data = tmp.path().join("suspend");
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let mut w = Writer::start_opt(&up.uri(1, "vol0"), 12, 0, 32, 1_000_000, tmp.path(), true);
    w.wait_acked(10, Duration::from_secs(30), "writes before the faults");
    up.cli_ok(&["fault", "kill", "--node", "rs"]);
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    std::thread::sleep(Duration::from_secs(2));
    let a0 = w.acked();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        w.acked() <= a0 + 1,
        "writes acknowledged under suspend with the recovery server and a replica down"
    );
    up.cli_ok(&["fault", "revive", "--node", "rs"]);
    w.wait_acked(
        a0 + 20,
        Duration::from_secs(40),
        "writes once the recovery server is back",
    );
    let (acked, tried) = w.finish_retrying();
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(60));
    w.check_every_node(&up, &acked, &tried, tmp.path(), "under suspend");
}

/// Correctness issue, section 5: a FLUSH that costs the volume its last live replica
/// (n3 already dead, n2 fails the flush) is acknowledged only once the writes n2 had
/// not made durable are on the recovery server — the primary is their only copy now.
#[test]
fn flush_that_costs_the_last_replica_drains_to_the_recovery_server() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x70 1M 64k", "flush"]);
    let m = up.volume_meta(1, "vol0").unwrap();
    assert_eq!(m["states"]["3"], "dead", "{m}");
    // Replicated to n2, not flushed anywhere (libnbd: qemu would flush on close); then
    // n2 fails the flush.
    let mut p = Command::new(PY)
        .args([
            "-c",
            "import nbd, sys\n\
             h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
             h.pwrite(bytes([0x71]) * 65536, 0)\n\
             print('written', flush=True); sys.stdin.readline()\n\
             h.flush(); print('flushed', flush=True)",
            &up.uri(1, "vol0"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(p.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "written");
    assert!(log_records(&up).is_empty(), "{:?}", log_records(&up));
    up.cli_ok(&["fault", "drop", "--from", "n1", "--to", "n2"]);
    {
        use std::io::Write;
        writeln!(p.stdin.as_mut().unwrap()).unwrap();
    }
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "flushed");
    let _ = p.wait();
    assert!(
        log_records(&up).iter().any(|r| r.0 == 0 && r.2 == 0x71),
        "the flush was acknowledged with the unflushed write on one copy only: {:?}",
        log_records(&up)
    );
    assert_eq!(jstate(&up, 1, "vol0")["jeopardy"], true);
}
