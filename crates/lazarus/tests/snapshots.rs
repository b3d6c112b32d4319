//! Guards snapshots end to end, the way a user runs them: `lazarus up` (three node
//! processes), `lazarus snapshot create|list|delete`, and real NBD clients (nbdcopy,
//! qemu-io, qemu-img, nbdsh) reading `VOLUME@NAME` from every node, through a node's
//! SIGKILL and revival.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    require("nbdcopy");
    require("qemu-io");
    require("qemu-img");
    require("nbdsh"); // and python3-libnbd, which it comes with
    let tmp = tempfile::Builder::new()
        .disable_cleanup(std::env::var("LAZARUS_KEEP").is_ok())
        .tempdir()
        .unwrap();
    let data = tmp.path().join("cluster");
    (tmp, data)
}

fn qemu_io(uri: &str, cmds: &[&str], read_only: bool) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    if read_only {
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
    let (ok, text) = qemu_io(uri, cmds, false);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {text}");
}

/// Reads `len` bytes from the start of `uri` with nbdcopy.
fn copy_out(uri: &str, dir: &std::path::Path, len: usize) -> Vec<u8> {
    let out = dir.join(format!("out-{}.img", fastrand::u64(..)));
    run("nbdcopy", &[uri, out.to_str().unwrap()]);
    let mut b = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    b.truncate(len);
    b
}

fn snapshots_of(up: &Up, n: u16) -> Vec<String> {
    up.get(n, "/api/v1/volumes/vol0/snapshots").unwrap()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits (up to a minute) until clone `name`, as node `n`'s metadata has it, is whole
/// (made, every copy live: true) or gone (false); a clone still being made is given
/// up once its maker is back.
fn whole_or_gone(up: &Up, n: u16, name: &str, what: &str) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        match up.volume_meta(n, name) {
            None => return false,
            Some(m)
                if m["cloning"].is_null()
                    && m["states"]
                        .as_object()
                        .is_some_and(|s| s.values().all(|v| v == "live")) =>
            {
                return true
            }
            Some(m) => assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{what} is neither whole nor gone: {m}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until node `n`'s copy of vol0 holds snapshot `name`.
fn wait_snapshot(up: &Up, n: u16, name: &str, within: Duration) {
    let t0 = std::time::Instant::now();
    while !snapshots_of(up, n).contains(&name.to_string()) {
        assert!(
            t0.elapsed() < within,
            "n{n} did not install snapshot {name} within {within:?}: {:?}",
            snapshots_of(up, n)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Write, snapshot, overwrite and trim: the snapshot reads the old data through every
/// node (nbdcopy, qemu-io), the volume the new; qemu-img map sees the snapshot's holes;
/// writes to it are refused (EPERM); the primary's SIGKILL leaves it served by the
/// survivors, and the new primary takes another; the revived node serves what it
/// holds; a deleted snapshot is served nowhere.
#[test]
fn snapshots_on_three_nodes_read_old_data_and_survive_a_node_kill() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "256MiB");
    let img = tmp.path().join("in.img");
    let bytes = random_file(&img, 8 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x11 64M 1M"]);

    let out = up.cli_ok(&["snapshot", "create", "vol0", "monday"]);
    assert!(out.contains("on n1, n2, n3"), "{out}");
    // A second one under the name is refused (a conflict); a bad name too.
    let o = up.cli(&["snapshot", "create", "vol0", "monday"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(HTTP 409)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!up
        .cli(&["snapshot", "create", "vol0", "a@b"])
        .status
        .success());
    assert!(!up
        .cli(&["snapshot", "create", "nosuch", "x"])
        .status
        .success());

    // The volume moves on: overwrite, trim, write into a hole.
    qemu_io_ok(
        &up.uri(1, "vol0"),
        &[
            "write -P 0x22 0 4M",
            "discard 64M 1M",
            "write -P 0x33 128M 1M",
            "flush",
        ],
    );
    for n in 1..=3 {
        let snap = up.uri(n, "vol0@monday");
        let got = copy_out(&snap, tmp.path(), bytes.len());
        assert!(
            got == bytes,
            "snapshot through n{n} differs from what was written"
        );
        let (ok, text) = qemu_io(
            &snap,
            &[
                "read -P 0x11 64M 1M",
                "read -P 0 128M 1M",
                "read -P 0 200M 4k",
            ],
            true,
        );
        assert!(ok, "n{n}: {text}");
    }
    qemu_io_ok(
        &up.uri(2, "vol0"),
        &[
            "read -P 0x22 0 4M",
            "read -P 0 64M 1M",
            "read -P 0x33 128M 1M",
        ],
    );
    // The snapshot's map: data where it was written, holes elsewhere.
    let map = run(
        "qemu-img",
        &[
            "map",
            "-f",
            "raw",
            "--output=json",
            &up.uri(3, "vol0@monday"),
        ],
    );
    let map: Value = serde_json::from_str(&map).unwrap();
    let data_extents: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        data_extents,
        vec![(0, 8 << 20), (64 << 20, 1 << 20)],
        "{map}"
    );
    // libnbd's view of it (base:allocation): the same data, the rest holes.
    require("nbdinfo");
    let nmap = run("nbdinfo", &["--map", "--json", &up.uri(1, "vol0@monday")]);
    let nmap: Value = serde_json::from_str(&nmap).unwrap();
    let mut ndata: Vec<(u64, u64)> = Vec::new();
    for e in nmap.as_array().unwrap() {
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if e["type"].as_u64().unwrap() & 1 == 0 {
            match ndata.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => ndata.push((off, len)),
            }
        }
    }
    assert_eq!(ndata, data_extents, "nbdinfo --map: {nmap}");
    // A write that reaches the server is refused.
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nassert h.is_read_only()\ntry:\n    h.pwrite(b'x' * 4096, 0)\n    print('WROTE')\nexcept nbd.Error as e:\n    print('refused', e.errnum)",
        up.uri(2, "vol0@monday")
    );
    let o = run_out("/usr/bin/python3", &["-c", &script]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("refused 1"),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let list = up.cli_ok(&["snapshot", "list", "vol0"]);
    assert!(list.contains("vol0@monday"), "{list}");
    // What only monday holds: the 4 MiB of random data overwritten (1024 blocks), the
    // one 0x11 block the trim left to it, and the five slice pages it keeps.
    for n in 1..=3 {
        let snaps = up.get(n, "/api/v1/volumes/vol0/snapshots").unwrap();
        assert_eq!(
            snaps["snapshots"][0]["exclusive_bytes"].as_u64(),
            Some(1030 * 4096),
            "n{n}: {snaps}"
        );
        let vol = up.get(n, "/api/v1/volumes/vol0").unwrap();
        // The volume alone: its 4 MiB of 0x22 (one block) and 1 MiB of 0x33 (another).
        assert_eq!(
            vol["exclusive_bytes"].as_u64(),
            Some(2 * 4096),
            "n{n}: {vol}"
        );
    }
    let status = up.cli_ok(&["status"]);
    assert!(status.contains("monday"), "lazarus status: {status}");
    let vols = up.cli_ok(&["volume", "list"]);
    // A row for the snapshot, with what only it holds (1030 blocks: 4.0 MiB).
    let row = vols
        .lines()
        .find(|l| l.trim_start().starts_with("@monday"))
        .unwrap_or_else(|| panic!("no row for the snapshot in:\n{vols}"));
    assert!(
        row.contains("256.0 MiB") && row.contains("4.0 MiB"),
        "{vols}"
    );

    // The primary dies: the survivors serve the snapshot; the new primary takes one.
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    let m = up.wait_meta(2, "vol0", Duration::from_secs(15), "failover", |m| {
        m["primary"].as_u64().is_some_and(|p| p != 1)
    });
    let p = m["primary"].as_u64().unwrap() as u16;
    for n in [2, 3] {
        let got = copy_out(&up.uri(n, "vol0@monday"), tmp.path(), bytes.len());
        assert!(
            got == bytes,
            "after n1's death, snapshot through n{n} differs"
        );
    }
    qemu_io_ok(&up.uri(p, "vol0"), &["write -P 0x44 0 1M", "flush"]);
    let out = up.cli_ok(&["snapshot", "create", "vol0", "tuesday"]);
    assert!(
        out.contains("on n2, n3") || out.contains("on n3, n2"),
        "{out}"
    );
    qemu_io_ok(&up.uri(p, "vol0"), &["write -P 0x55 0 1M", "flush"]);
    for n in [2, 3] {
        let (ok, text) = qemu_io(
            &up.uri(n, "vol0@tuesday"),
            &[
                "read -P 0x44 0 1M",
                "read -P 0x22 1M 3M",
                "read -P 0x33 128M 1M",
            ],
            true,
        );
        assert!(ok, "tuesday through n{n}: {text}");
    }

    // n1 comes back: its copy resyncs; it still serves the snapshot it holds, and
    // installs the one it missed (taken while it was down) from another copy.
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.wait_all_live(2, "vol0", Duration::from_secs(30));
    let got = copy_out(&up.uri(1, "vol0@monday"), tmp.path(), bytes.len());
    assert!(got == bytes, "revived n1 serves another monday");
    wait_snapshot(&up, 1, "tuesday", Duration::from_secs(30));
    let (ok, text) = qemu_io(
        &up.uri(1, "vol0@tuesday"),
        &[
            "read -P 0x44 0 1M",
            "read -P 0x22 1M 3M",
            "read -P 0x33 128M 1M",
        ],
        true,
    );
    assert!(ok, "n1's tuesday, installed from another copy: {text}");

    // Deleting a snapshot: served nowhere after, listed nowhere.
    let out = up.cli_ok(&["snapshot", "delete", "vol0", "monday"]);
    assert!(out.contains("deleted snapshot vol0@monday"), "{out}");
    for n in 1..=3 {
        let (ok, text) = qemu_io(&up.uri(n, "vol0@monday"), &["read 0 4k"], true);
        assert!(!ok, "n{n} still serves a deleted snapshot: {text}");
        assert!(!snapshots_of(&up, n).contains(&"monday".to_string()));
    }
    assert!(!up
        .cli(&["snapshot", "delete", "vol0", "monday"])
        .status
        .success());
    assert_eq!(snapshots_of(&up, p), vec!["tuesday".to_string()]);
}

/// Snapshots taken while a replica is SIGKILLed at a random instant: after each
/// revival the node's store opens without damage, and it serves every snapshot (those
/// it missed installed from another copy), each reading exactly what the volume held
/// when that snapshot was taken.
#[test]
fn a_replica_killed_while_snapshots_are_taken_serves_only_whole_ones() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "128MiB");
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut taken: Vec<(String, u8)> = Vec::new();
    for round in 0..4u8 {
        let pattern = 0x30 + round;
        qemu_io_ok(
            &up.uri(1, "vol0"),
            &[&format!("write -P {pattern} 0 2M"), "flush"],
        );
        let name = format!("s{round}");
        // Kill n3 while the snapshot is being taken (or just before or after).
        let cli = {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lazarus"));
            c.args(["snapshot", "create", "vol0", &name, "--data"])
                .arg(&data)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        };
        std::thread::sleep(Duration::from_millis(rng.u64(0..15)));
        up.cli_ok(&["fault", "kill", "--node", "n3"]);
        let o = cli.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        taken.push((name, pattern));
        up.cli_ok(&["fault", "revive", "--node", "n3"]);
        up.wait_all_live(1, "vol0", Duration::from_secs(30));
        let st = up.get(3, "/api/v1/status").unwrap();
        assert_eq!(
            st["recovery"]["damaged_pages"].as_array().map(|a| a.len()),
            Some(0),
            "round {round}: {st}"
        );
        for (s, pat) in &taken {
            // One it missed it installs from another copy.
            wait_snapshot(&up, 3, s, Duration::from_secs(30));
            let (ok, text) = qemu_io(
                &up.uri(3, &format!("vol0@{s}")),
                &[&format!("read -P {pat} 0 2M")],
                true,
            );
            assert!(ok, "round {round}: n3 serves {s} wrong: {text}");
            // The primary and n2 always have it.
            for n in [1, 2] {
                let (ok, text) = qemu_io(
                    &up.uri(n, &format!("vol0@{s}")),
                    &[&format!("read -P {pat} 0 2M")],
                    true,
                );
                assert!(ok, "round {round}: {s} through n{n}: {text}");
            }
        }
    }
}

/// Incremental export: snapshot A exported whole and imported into a second volume,
/// then the diffs A→B and B→C applied in order, leave that volume byte-identical with
/// snapshot C (`qemu-img compare`); each diff holds little more than what changed; a
/// diff applied out of order, or damaged, is refused before anything is written.
#[test]
fn incremental_exports_rebuild_a_volume_byte_identical() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.cli_ok(&["volume", "create", "copy", "--size", "64MiB"]);
    let img = tmp.path().join("in.img");
    random_file(&img, 16 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    up.cli_ok(&["snapshot", "create", "vol0", "a"]);
    let full = tmp.path().join("a.img");
    let out = up.cli_ok(&["volume", "export", "vol0@a", full.to_str().unwrap()]);
    assert!(out.contains("exported vol0@a"), "{out}");
    up.cli_ok(&[
        "volume",
        "import",
        full.to_str().unwrap(),
        "--volume",
        "copy",
    ]);

    qemu_io_ok(
        &up.uri(1, "vol0"),
        &[
            "write -P 0x5a 1M 512k",
            "discard 8M 1M",
            "write -P 0x6b 40M 4k",
            "flush",
        ],
    );
    up.cli_ok(&["snapshot", "create", "vol0", "b"]);
    qemu_io_ok(
        &up.uri(1, "vol0"),
        &["write -P 0x7c 2M 256k", "write -z 12M 64k", "flush"],
    );
    up.cli_ok(&["snapshot", "create", "vol0", "c"]);
    // The volume moves on after C: none of this is in the diffs.
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x11 0 4M", "flush"]);

    let d1 = tmp.path().join("a-b.diff");
    let d2 = tmp.path().join("b-c.diff");
    let out = up.cli_ok(&[
        "volume",
        "export",
        "vol0@b",
        d1.to_str().unwrap(),
        "--since",
        "a",
    ]);
    assert!(out.contains("since a"), "{out}");
    up.cli_ok(&[
        "volume",
        "export",
        "vol0@c",
        d2.to_str().unwrap(),
        "--since",
        "b",
    ]);
    let (s1, s2) = (
        std::fs::metadata(&d1).unwrap().len(),
        std::fs::metadata(&d2).unwrap().len(),
    );
    // 512 KiB + 4 KiB of data and a 1 MiB zero record; 256 KiB of data and a zero one.
    assert!(
        (516 << 10..600 << 10).contains(&s1),
        "a-b diff is {s1} bytes"
    );
    assert!(
        (256 << 10..300 << 10).contains(&s2),
        "b-c diff is {s2} bytes"
    );

    let root_before = up.root(1, "copy");
    // Out of order: refused.
    let o = up.cli(&[
        "volume",
        "import",
        d2.to_str().unwrap(),
        "--volume",
        "copy",
        "--diff",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not hold snapshot vol0@b"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Damaged: refused, nothing written.
    let bad = tmp.path().join("bad.diff");
    let mut b = std::fs::read(&d1).unwrap();
    let k = b.len() / 2;
    b[k] ^= 1;
    std::fs::write(&bad, &b).unwrap();
    let o = up.cli(&[
        "volume",
        "import",
        bad.to_str().unwrap(),
        "--volume",
        "copy",
        "--diff",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("damaged"));
    assert_eq!(
        up.root(1, "copy"),
        root_before,
        "a refused diff changed the volume"
    );

    for d in [&d1, &d2] {
        // Each import checks that the volume's checksum root is then the snapshot's.
        let out = up.cli_ok(&[
            "volume",
            "import",
            d.to_str().unwrap(),
            "--volume",
            "copy",
            "--diff",
        ]);
        assert!(
            out.contains("verified: copy's checksum root is vol0@"),
            "{out}"
        );
    }
    assert_eq!(
        up.root(1, "copy"),
        up.cli_ok(&["snapshot", "list", "vol0", "--json"])
            .parse::<serde_json::Value>()
            .ok()
            .and_then(|j| j[0]["snapshots"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == "c"))
                .map(|s| s["root"].as_str().unwrap_or("").to_string()))
            .unwrap_or_default(),
        "the copy's root after the chain is snapshot c's"
    );
    let o = run_out(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &up.uri(2, "vol0@c"),
            &up.uri(3, "copy"),
        ],
    );
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // Another cluster (a single node of its own, its own data and ports): the full
    // export and the chain of diffs rebuild the same volume there.
    let other = Up::start_with(&tmp.path().join("other"), "64MiB", &["--nodes", "1"]);
    other.cli_ok(&["volume", "create", "restored", "--size", "64MiB"]);
    other.cli_ok(&[
        "volume",
        "import",
        full.to_str().unwrap(),
        "--volume",
        "restored",
    ]);
    // The second diff before the first: refused there too.
    let o = other.cli(&[
        "volume",
        "import",
        d2.to_str().unwrap(),
        "--volume",
        "restored",
        "--diff",
    ]);
    assert!(!o.status.success(), "a diff applied out of order");
    for d in [&d1, &d2] {
        let out = other.cli_ok(&[
            "volume",
            "import",
            d.to_str().unwrap(),
            "--volume",
            "restored",
            "--diff",
        ]);
        assert!(
            out.contains("verified: restored's checksum root is vol0@"),
            "{out}"
        );
    }
    assert!(
        identical(&up.uri(1, "vol0@c"), &other.uri(1, "restored")),
        "the other cluster's volume differs from vol0@c"
    );
    assert_eq!(other.root(1, "restored"), up.root(3, "copy"));
    // A snapshot there, and a diff back from it, apply like any other.
    other.cli_ok(&["snapshot", "create", "restored", "r1"]);
    qemu_io_ok(&other.uri(1, "restored"), &["write -P 0x3d 3M 8k", "flush"]);
    other.cli_ok(&["snapshot", "create", "restored", "r2"]);
    let back = tmp.path().join("r1-r2.diff");
    other.cli_ok(&[
        "volume",
        "export",
        "restored@r2",
        back.to_str().unwrap(),
        "--since",
        "r1",
    ]);
    up.cli_ok(&[
        "volume",
        "import",
        back.to_str().unwrap(),
        "--volume",
        "copy",
        "--diff",
    ]);
    assert!(identical(&other.uri(1, "restored@r2"), &up.uri(2, "copy")));
    drop(other);
    // And the volume itself is not C any more (the test compares something).
    let o = run_out(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &up.uri(1, "vol0"),
            &up.uri(3, "copy"),
        ],
    );
    assert!(!o.status.success());
}

fn identical(a: &str, b: &str) -> bool {
    run_out("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b])
        .status
        .success()
}

/// A clone reads as its snapshot and takes writes of its own without touching the
/// snapshot; a revert makes the volume read as the snapshot again, through every node.
#[test]
fn clone_and_revert_through_real_clients() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    let img = tmp.path().join("in.img");
    random_file(&img, 8 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x11 40M 1M", "flush"]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    qemu_io_ok(
        &up.uri(1, "vol0"),
        &[
            "write -P 0x22 0 4M",
            "discard 40M 512k",
            "write -P 0x33 32M 1M",
            "flush",
        ],
    );
    assert!(!identical(&up.uri(1, "vol0"), &up.uri(1, "vol0@s")));

    let out = up.cli_ok(&["volume", "clone", "vol0@s", "c1"]);
    assert!(out.contains("cloned vol0@s into new volume c1"), "{out}");
    // On every node, from its own copy of the snapshot: no node failed.
    assert!(!out.contains("not on"), "{out}");
    for n in 1..=3 {
        assert!(
            identical(&up.uri(2, "vol0@s"), &up.uri(n, "c1")),
            "c1 through n{n}"
        );
    }
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "c1")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
    // A name in use is refused, and the clone is left alone.
    assert!(!up
        .cli(&["volume", "clone", "vol0@s", "vol0"])
        .status
        .success());
    qemu_io_ok(&up.uri(1, "c1"), &["write -P 0x44 0 1M", "flush"]);
    let (ok, text) = qemu_io(&up.uri(1, "vol0@s"), &["read -P 0x11 40M 1M"], true);
    assert!(ok, "{text}");
    assert!(!identical(&up.uri(2, "vol0@s"), &up.uri(3, "c1")));
    assert!(!up
        .cli(&["volume", "clone", "vol0@nosuch", "c2"])
        .status
        .success());

    let out = up.cli_ok(&["volume", "revert", "vol0", "s"]);
    assert!(out.contains("reverted to vol0@s"), "{out}");
    for n in 1..=3 {
        assert!(
            identical(&up.uri(n, "vol0"), &up.uri(n, "vol0@s")),
            "vol0 through n{n} is not its snapshot after the revert"
        );
    }
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "vol0")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
    // Reverting again changes nothing.
    let out = up.cli_ok(&["volume", "revert", "vol0", "s"]);
    assert!(out.contains("0 B remapped"), "{out}");
    // Writes going on during a revert land before or after it, the same on every
    // copy: the copies agree afterwards.
    let uri = up.uri(1, "vol0");
    let writer = std::thread::spawn(move || {
        let cmds: Vec<String> = (0..32)
            .map(|i| format!("write -P {} {}M 1M", 0x70 + i % 8, i))
            .collect();
        let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
        qemu_io_ok(&uri, &refs);
    });
    std::thread::sleep(Duration::from_millis(30));
    let out = up.cli_ok(&["volume", "revert", "vol0", "s"]);
    writer.join().unwrap();
    qemu_io_ok(&up.uri(1, "vol0"), &["flush"]);
    eprintln!("revert with writes going on: {out}");
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "vol0")).collect();
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "copies differ after a revert among writes: {roots:?}"
    );
    assert!(!up
        .cli(&["volume", "revert", "vol0", "nosuch"])
        .status
        .success());
}

/// A clone shares its snapshot's slice pages on every node (cloning costs the
/// snapshot's checksums, not a mapping per block): `volume list` says so. It serves
/// the snapshot where it has not written, across a kill -9 of a copy, which resyncs
/// the clone's writes it missed; deleting the snapshot and then its volume, on the
/// cluster, leaves the clone byte-identical on every node, and after a restart too.
#[test]
fn a_clone_shares_its_snapshot_and_outlives_it_on_every_node() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    let img = tmp.path().join("in.img");
    random_file(&img, 12 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x21 0 2M", "flush"]);
    let out = up.cli_ok(&["volume", "clone", "vol0@s", "c1"]);
    assert!(out.contains("cloned vol0@s into new volume c1"), "{out}");
    for n in 1..=3 {
        let v = up.get(n, "/api/v1/volumes/c1").unwrap();
        assert_eq!(v["clone_of"], "vol0@s", "n{n}: {v}");
        // 12 MiB of random data: every block mapped, all of it shared.
        assert_eq!(v["shared_blocks"], 3072, "n{n}: {v}");
    }
    let list = up.cli_ok(&["volume", "list"]);
    assert!(
        list.contains("clone of vol0@s, 12.0 MiB still shared"),
        "{list}"
    );
    // A copy killed -9 misses writes to the clone; it resyncs them on its return.
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    qemu_io_ok(
        &up.uri(1, "c1"),
        &["write -P 0x31 1M 1M", "write -P 0x32 20M 1M", "flush"],
    );
    // A clone made while that copy is down has three copies too: the one on n3 is
    // made when n3 returns, and resyncs.
    let out = up.cli_ok(&["volume", "clone", "vol0@s", "c2"]);
    assert!(out.contains("cloned vol0@s into new volume c2"), "{out}");
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    up.wait_all_live(1, "c1", Duration::from_secs(60));
    let m = up.wait_all_live(1, "c2", Duration::from_secs(60));
    assert_eq!(m["states"].as_object().map(|s| s.len()), Some(3), "{m}");
    for n in 1..=3 {
        assert!(
            identical(&up.uri(2, "vol0@s"), &up.uri(n, "c2")),
            "c2 through n{n}"
        );
    }
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "c1")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
    let (ok, text) = qemu_io(
        &up.uri(3, "c1"),
        &[
            "read -P 0x31 1M 1M",
            "read -P 0x32 20M 1M",
            "read -P 0 24M 1M",
        ],
        true,
    );
    assert!(ok, "{text}");
    let want = tmp.path().join("c1.img");
    run("nbdcopy", &[&up.uri(2, "c1"), want.to_str().unwrap()]);
    // The snapshot, then its volume, deleted on the cluster: the clone is whole.
    up.cli_ok(&["snapshot", "delete", "vol0", "s"]);
    for n in 1..=3 {
        let v = up.get(n, "/api/v1/volumes/c1").unwrap();
        assert!(v.get("clone_of").is_none(), "n{n}: {v}");
        assert!(
            identical(want.to_str().unwrap(), &up.uri(n, "c1")),
            "c1 through n{n} after its snapshot's deletion"
        );
    }
    up.cli_ok(&["volume", "delete", "vol0"]);
    qemu_io_ok(&up.uri(2, "c1"), &["write -P 0x41 30M 1M", "flush"]);
    run("nbdcopy", &[&up.uri(2, "c1"), want.to_str().unwrap()]);
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.wait_all_live(2, "c1", Duration::from_secs(60));
    for n in 1..=3 {
        assert!(
            identical(want.to_str().unwrap(), &up.uri(n, "c1")),
            "c1 through n{n} after its origin's deletion and a restart"
        );
    }
    let roots: Vec<String> = (1..=3).map(|n| up.root(n, "c1")).collect();
    assert!(roots.iter().all(|r| *r == roots[0]), "{roots:?}");
}

/// A snapshot taken while a copy is down reaches that copy when it returns (its pages
/// and blocks fetched from a copy that has it, only those it cannot read itself), so
/// it survives the loss of both nodes that took it; a deletion the copy missed is
/// made good there too.
#[test]
fn a_copy_that_missed_a_snapshot_installs_it_and_outlives_the_others() {
    let (tmp, data) = setup();
    // The snapshot file comes in parts of 100 bytes (16 MiB by default).
    let up = Up::start_env(
        &data,
        "128MiB",
        &[
            ("LAZARUS_SNAPSHOT_GRACE_SECS", "3"),
            ("LAZARUS_SNAPSHOT_FILE_PART_BYTES", "100"),
        ],
    );
    let img = tmp.path().join("in.img");
    let bytes = random_file(&img, 6 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x61 32M 2M", "flush"]);
    up.cli_ok(&["fault", "kill", "--node", "n3"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x62 32M 1M", "flush"]);
    let out = up.cli_ok(&["snapshot", "create", "vol0", "s1"]);
    assert!(!out.contains("n3"), "{out}");
    // The volume moves on before n3 returns: n3 will never hold s1's data in its volume.
    qemu_io_ok(
        &up.uri(1, "vol0"),
        &["write -P 0x63 0 6M", "write -P 0x64 32M 2M", "flush"],
    );
    up.cli_ok(&["fault", "revive", "--node", "n3"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    // Served through n3 at once, installed or not yet (then through a copy that
    // holds it).
    let installed = snapshots_of(&up, 3).contains(&"s1".to_string());
    let got = copy_out(&up.uri(3, "vol0@s1"), tmp.path(), bytes.len());
    assert!(
        got == bytes,
        "s1 through n3 (installed there: {installed}) differs from what was written"
    );
    eprintln!("s1 read through n3 before it installed it: {}", !installed);
    wait_snapshot(&up, 3, "s1", Duration::from_secs(30));
    let st = up.get(3, "/api/v1/status").unwrap();
    assert_eq!(st["snapshot_sync"], serde_json::json!({}), "{st}");
    // The two nodes that took it die: n3 alone serves it, and right.
    up.cli_ok(&["fault", "kill", "--node", "n1"]);
    up.cli_ok(&["fault", "kill", "--node", "n2"]);
    let got = copy_out(&up.uri(3, "vol0@s1"), tmp.path(), bytes.len());
    assert!(
        got == bytes,
        "n3's installed s1 differs from what was written"
    );
    let (ok, text) = qemu_io(
        &up.uri(3, "vol0@s1"),
        &[
            "read -P 0x62 32M 1M",
            "read -P 0x61 33M 1M",
            "read -P 0 34M 1M",
        ],
        true,
    );
    assert!(ok, "n3's installed s1: {text}");
    up.cli_ok(&["fault", "revive", "--node", "n1"]);
    up.cli_ok(&["fault", "revive", "--node", "n2"]);
    let m = up.wait_all_live(3, "vol0", Duration::from_secs(60));
    let p = m["primary"].as_u64().unwrap() as u16;
    // A deletion n3 misses: made good once it is back.
    let down = if p == 3 { 2 } else { 3 };
    up.cli_ok(&["fault", "kill", "--node", &format!("n{down}")]);
    up.cli_ok(&["snapshot", "delete", "vol0", "s1"]);
    // Down, it missed the deletion: its file is still there (checked before it
    // returns, which removes the file at once: the snapshot is older than the grace).
    let file = data.join(format!("n{down}/volumes/vol0/snapshots/s1.snap"));
    assert!(
        file.exists(),
        "n{down} missed the deletion, so it still has {file:?}"
    );
    up.cli_ok(&["fault", "revive", "--node", &format!("n{down}")]);
    up.wait_all_live(p, "vol0", Duration::from_secs(30));
    // Its file goes once the grace period for snapshots being taken is over; it is
    // neither listed nor served.
    let t0 = std::time::Instant::now();
    while file.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "n{down} keeps a deleted snapshot's file"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!snapshots_of(&up, down).contains(&"s1".to_string()));
    let (ok, _) = qemu_io(&up.uri(down, "vol0@s1"), &["read 0 4k"], true);
    assert!(!ok, "n{down} serves a deleted snapshot");
}

/// A snapshot's pages and blocks are repaired like any others: a page block and a
/// block only the snapshot holds, corrupted on disk on one node, are restored from
/// another node when a read of the snapshot trips on them (the read answers the right
/// data), and by `lazarus scrub` when nothing reads them.
#[test]
fn a_snapshots_damaged_pages_and_blocks_are_repaired_from_another_node() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    let img = tmp.path().join("in.img");
    let bytes = random_file(&img, 4 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    // Overwritten: the snapshot alone holds the old blocks and keeps pages 0-3 as page
    // blocks.
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x2a 0 4M", "flush"]);
    let corrupt = |node: &str, lba: &str, target: &str| {
        let out = up.cli_ok(&[
            "fault", "corrupt", "--node", node, "--volume", "vol0@s", "--lba", lba, "--target",
            target,
        ]);
        assert!(out.contains("corrupted on disk"), "{out}");
    };
    // Bad requests are refused: a page the snapshot shares, a hole, past the end.
    for (lba, target) in [("5000", "page"), ("5000", "block"), ("99999999", "block")] {
        let o = up.cli(&[
            "fault", "corrupt", "--node", "n2", "--volume", "vol0@s", "--lba", lba, "--target",
            target,
        ]);
        assert!(
            !o.status.success(),
            "corrupting {target} at {lba} was accepted"
        );
    }
    corrupt("n2", "5", "block");
    corrupt("n2", "300", "page");
    corrupt("n2", "700", "block");
    // Read through n2: what the snapshot held, repaired from another node on the way.
    let got = copy_out(&up.uri(2, "vol0@s"), tmp.path(), bytes.len());
    assert!(got == bytes, "vol0@s through n2 after damage differs");
    let log = up.node_log(2);
    assert!(
        log.contains("corrupt block repaired"),
        "n2 repaired nothing"
    );

    // Nothing reads it on n3: the scrub finds and restores it.
    corrupt("n3", "900", "block");
    let out = up.cli_ok(&["scrub"]);
    assert!(out.contains("node n3: blocks bad 1 (restored 1)"), "{out}");
    let out = up.cli_ok(&["scrub"]);
    assert!(!out.contains("blocks bad 1"), "{out}");
    let got = copy_out(&up.uri(3, "vol0@s"), tmp.path(), bytes.len());
    assert!(got == bytes, "vol0@s through n3 after the scrub differs");
}

/// A revert, and a snapshot's deletion, cut by SIGKILL at a random instant: of the
/// primary during a revert, of a replica during another, and of the primary during a
/// deletion. A revert is atomic: once a primary serves again, the volume reads
/// wholly as before it or wholly as the snapshot, never a mix; run again, it finishes
/// (the killed node catches up by resync). A deletion run again completes. After
/// each, every node's copy reads exactly as the snapshot, and the snapshots left
/// serve what they held.
#[test]
fn reverts_and_deletions_killed_midway_finish_when_run_again() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "128MiB");
    let mut rng = fastrand::Rng::with_seed(seed());
    let img = tmp.path().join("in.img");
    random_file(&img, 64 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    up.cli_ok(&["snapshot", "create", "vol0", "keep"]);
    let other = tmp.path().join("other.img");
    random_file(&other, 64 << 20, seed() ^ 0x5555);
    let spawn_cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lazarus"))
            .args(args)
            .arg("--data")
            .arg(&data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let primary = |n: u16| {
        up.volume_meta(n, "vol0").unwrap()["primary"]
            .as_u64()
            .unwrap() as u16
    };
    for round in 0..2 {
        // The volume moves away from s: 64 MiB to rewrite (sixteen 4 MiB chunks).
        let p = primary(if round == 0 { 1 } else { 2 });
        run("nbdcopy", &[other.to_str().unwrap(), &up.uri(p, "vol0")]);
        assert!(!identical(&up.uri(p, "vol0"), &up.uri(p, "vol0@s")));
        let victim = if round == 0 {
            p
        } else {
            (1..=3).find(|n| *n != p).unwrap()
        };
        let cli = spawn_cli(&["volume", "revert", "vol0", "s"]);
        std::thread::sleep(Duration::from_millis(rng.u64(10..150)));
        up.cli_ok(&["fault", "kill", "--node", &format!("n{victim}")]);
        let o = cli.wait_with_output().unwrap();
        eprintln!(
            "round {round}: revert with n{victim} killed: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim()
        );
        let alive = (1..=3).find(|n| *n != victim).unwrap();
        up.wait_meta(
            alive,
            "vol0",
            Duration::from_secs(20),
            "a live primary",
            |m| m["primary"].as_u64().is_some_and(|x| x != victim as u64),
        );
        let now = up.uri(alive, "vol0");
        let t0 = std::time::Instant::now();
        let whole_s = loop {
            // (Reads fail until the new primary serves.)
            if identical(&now, &up.uri(alive, "vol0@s")) {
                break true;
            }
            if identical(&now, other.to_str().unwrap()) {
                break false;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "round {round}: after a revert cut by killing n{victim}, vol0 is neither what it was nor s"
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!(
            "round {round}: vol0 reads as {}",
            if whole_s { "s" } else { "before" }
        );
        up.cli_ok(&["volume", "revert", "vol0", "s"]);
        up.cli_ok(&["fault", "revive", "--node", &format!("n{victim}")]);
        up.wait_all_live(alive, "vol0", Duration::from_secs(30));
        for n in 1..=3 {
            assert!(
                identical(&up.uri(n, "vol0"), &up.uri(n, "vol0@s")),
                "round {round}: vol0 through n{n} is not s after a revert killed midway (n{victim} killed)"
            );
            assert!(identical(&up.uri(n, "vol0@keep"), img.to_str().unwrap()));
        }
    }
    // A deletion cut by the primary's death: run again, it completes everywhere.
    let p = primary(1);
    let cli = spawn_cli(&["snapshot", "delete", "vol0", "s"]);
    std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
    up.cli_ok(&["fault", "kill", "--node", &format!("n{p}")]);
    let _ = cli.wait_with_output().unwrap();
    let alive = (1..=3).find(|n| *n != p).unwrap();
    up.wait_meta(
        alive,
        "vol0",
        Duration::from_secs(20),
        "a live primary",
        |m| m["primary"].as_u64().is_some_and(|x| x != p as u64),
    );
    let o = up.cli(&["snapshot", "delete", "vol0", "s"]);
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success() || text.contains("no snapshot"),
        "the second deletion: {text}"
    );
    up.cli_ok(&["fault", "revive", "--node", &format!("n{p}")]);
    up.wait_all_live(alive, "vol0", Duration::from_secs(30));
    for n in 1..=3 {
        let (ok, _) = qemu_io(&up.uri(n, "vol0@s"), &["read 0 4k"], true);
        assert!(!ok, "n{n} serves a deleted snapshot");
        assert!(
            identical(&up.uri(n, "vol0@keep"), img.to_str().unwrap()),
            "n{n}: the snapshot kept differs after a deletion cut by a kill"
        );
        let st = up.get(n, "/api/v1/status").unwrap();
        assert_eq!(st["blocks"]["missing"].as_u64(), Some(0), "n{n}: {st}");
    }
    // A clone cut by the primary's death: once the node is back the new volume is
    // gone (given up) or whole, reading as the snapshot through every node; never
    // served empty. Gone, it is cloned again at once.
    let p = primary(alive);
    let cli = spawn_cli(&["volume", "clone", "vol0@keep", "c1"]);
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    up.cli_ok(&["fault", "kill", "--node", &format!("n{p}")]);
    let o = cli.wait_with_output().unwrap();
    eprintln!(
        "clone with n{p} killed: {} {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    let alive = (1..=3).find(|n| *n != p).unwrap();
    up.wait_meta(
        alive,
        "vol0",
        Duration::from_secs(20),
        "a live primary",
        |m| m["primary"].as_u64().is_some_and(|x| x != p as u64),
    );
    up.cli_ok(&["fault", "revive", "--node", &format!("n{p}")]);
    up.wait_all_live(alive, "vol0", Duration::from_secs(30));
    let whole = whole_or_gone(&up, alive, "c1", "a clone cut by a kill");
    eprintln!("the cut clone is {}", if whole { "whole" } else { "gone" });
    if whole {
        for n in 1..=3 {
            assert!(
                identical(&up.uri(n, "c1"), img.to_str().unwrap()),
                "the cut clone does not read as its snapshot through n{n}"
            );
        }
        up.cli_ok(&["volume", "delete", "c1"]);
    }
    up.cli_ok(&["volume", "clone", "vol0@keep", "c1"]);
    for n in 1..=3 {
        let t0 = std::time::Instant::now();
        while !identical(&up.uri(n, "c1"), img.to_str().unwrap()) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the clone made again does not read as its snapshot through n{n}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// One node running alone: clone and revert work as in a cluster, and a node killed
/// with SIGKILL right after a revert serves the reverted volume when it restarts.
#[test]
fn a_node_alone_clones_and_reverts() {
    let (tmp, _) = setup();
    let mut node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "32MiB");
    let img = tmp.path().join("in.img");
    random_file(&img, 32 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &node.uri("vol0")]);
    node.cli_ok(&["snapshot", "create", "vol0", "s"]);
    // A name taken: a conflict, and the snapshot it names is left as it was.
    let o = node.cli(&["snapshot", "create", "vol0", "s"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already has a snapshot \"s\" (HTTP 409)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    qemu_io_ok(
        &node.uri("vol0"),
        &["write -P 0x5a 1M 3M", "discard 20M 4M", "flush"],
    );
    assert!(!identical(&node.uri("vol0"), img.to_str().unwrap()));
    let out = node.cli_ok(&["volume", "clone", "vol0@s", "c"]);
    assert!(
        out.contains("cloned vol0@s into new volume c: 32.0 MiB"),
        "{out}"
    );
    assert!(identical(&node.uri("c"), img.to_str().unwrap()));
    let out = node.cli_ok(&["volume", "revert", "vol0", "s"]);
    assert!(out.contains("7.0 MiB remapped"), "{out}");
    node.kill9();
    node.spawn();
    assert!(identical(&node.uri("vol0"), img.to_str().unwrap()));
    assert!(identical(&node.uri("c"), img.to_str().unwrap()));
    // A name in use is refused.
    assert!(!node
        .cli(&["volume", "clone", "vol0@s", "vol0"])
        .status
        .success());
    // Clones cut by kill -9 at random instants: after the restart each is whole
    // (reading as the snapshot) or gone, never there empty; gone, it is asked for
    // again at once.
    let mut rng = fastrand::Rng::with_seed(seed());
    for round in 0..6 {
        let name = format!("k{round}");
        let mut a: Vec<String> = ["volume", "clone", "vol0@s", &name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--api".to_string(), node.api_url()]);
        let cli = std::process::Command::new(env!("CARGO_BIN_EXE_lazarus"))
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.u64(0..15_000)));
        node.kill9();
        let _ = cli.wait_with_output();
        node.spawn();
        let listed = node.cli_ok(&["volume", "list"]);
        let there = listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str()));
        eprintln!(
            "round {round}: the cut clone is {}",
            if there { "there" } else { "gone" }
        );
        if there {
            assert!(
                identical(&node.uri(&name), img.to_str().unwrap()),
                "round {round}: a clone cut by kill -9 is there but does not read as its snapshot"
            );
        } else {
            node.cli_ok(&["volume", "clone", "vol0@s", &name]);
            assert!(identical(&node.uri(&name), img.to_str().unwrap()));
        }
    }
}

/// A snapshot taken while writes are in flight (libnbd, 16 at a time, 4 KiB each over
/// 256 blocks) holds every write acknowledged before the command started, and nothing
/// that was not yet sent when it returned; every copy freezes the same point (one
/// root), and every node serves the same bytes.
#[test]
fn a_snapshot_under_writes_holds_every_write_acknowledged_before_it() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    let slots = 256usize;
    let o = run_out(
        "/usr/bin/python3",
        &[
            &format!("{}/tests/py/snapwriter.py", env!("CARGO_MANIFEST_DIR")),
            &up.uri(1, "vol0"),
            &slots.to_string(),
            "16",
            "1.5",
            BIN,
            "snapshot",
            "create",
            "vol0",
            "busy",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["rc"], 0, "snapshot create: {}", r["out"]);
    assert!(r["writes"].as_u64().unwrap() > 500, "{r}");
    let seqs = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let acked_before = seqs(&r["acked_before"]);
    assert!(acked_before.iter().filter(|s| **s > 0).count() > slots / 2);
    let mut roots = Vec::new();
    for n in 1..=3 {
        wait_snapshot(&up, n, "busy", Duration::from_secs(20));
        let snaps = up.get(n, "/api/v1/volumes/vol0/snapshots").unwrap();
        roots.push(snaps["snapshots"][0]["root"].as_str().unwrap().to_string());
        let image = copy_out(&up.uri(n, "vol0@busy"), tmp.path(), slots * 4096);
        for slot in 0..slots {
            let b = &image[slot * 4096..(slot + 1) * 4096];
            let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
            let sent = seqs(&r["sent"][slot]);
            if seq == 0 {
                assert!(
                    b.iter().all(|x| *x == 0) && acked_before[slot] == 0,
                    "n{n}: slot {slot} of the snapshot is empty, but write {} was acknowledged before it",
                    acked_before[slot]
                );
                continue;
            }
            assert_eq!(
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
                slot as u64,
                "n{n}: slot {slot} holds another slot's block"
            );
            assert!(
                b[16..].iter().all(|x| *x == (seq % 251) as u8),
                "n{n}: slot {slot}: write {seq} is torn"
            );
            assert!(
                seq >= acked_before[slot] && sent.contains(&seq),
                "n{n}: slot {slot} of the snapshot holds write {seq}; acknowledged before the snapshot: {}, sent to the slot before it returned: {sent:?}",
                acked_before[slot]
            );
        }
    }
    assert!(
        roots.iter().all(|r| *r == roots[0]),
        "the copies froze different points: {roots:?}"
    );
}

/// The primary SIGKILLed while a snapshot is being taken (or just before or after):
/// once the old primary is back, the snapshot is either named by the cluster and read
/// by every node as the volume was when it was taken (whatever the command said), or
/// served by none, and then taking it again under the same name works. A command that
/// reported success always left it named.
#[test]
fn a_primary_killed_while_a_snapshot_is_taken_leaves_it_whole_or_absent() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "128MiB");
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut primary = 1u16;
    let mut outcomes = Vec::new();
    for round in 0..3u8 {
        let pattern = 0x50 + round;
        qemu_io_ok(
            &up.uri(primary, "vol0"),
            &[&format!("write -P {pattern} 0 2M"), "flush"],
        );
        let name = format!("k{round}");
        let cli = std::process::Command::new(BIN)
            .args(["snapshot", "create", "vol0", &name, "--data"])
            .arg(&data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(0..20)));
        up.cli_ok(&["fault", "kill", "--node", &format!("n{primary}")]);
        let o = cli.wait_with_output().unwrap();
        let other = if primary == 1 { 2 } else { 1 };
        let m = up.wait_meta(other, "vol0", Duration::from_secs(30), "failover", |m| {
            m["primary"].as_u64().is_some_and(|p| p != primary as u64)
        });
        let old = primary;
        primary = m["primary"].as_u64().unwrap() as u16;
        up.cli_ok(&["fault", "revive", "--node", &format!("n{old}")]);
        up.wait_all_live(primary, "vol0", Duration::from_secs(60));
        let named = up
            .volume_meta(primary, "vol0")
            .is_some_and(|v| v["snapshots"].get(&name).is_some());
        if o.status.success() {
            assert!(
                named,
                "round {round}: the command reported {name} taken, but the cluster does not name it"
            );
        }
        outcomes.push((o.status.success(), named));
        if !named {
            for n in 1..=3 {
                let (ok, text) = qemu_io(&up.uri(n, &format!("vol0@{name}")), &["read 0 4k"], true);
                assert!(
                    !ok,
                    "round {round}: n{n} serves {name}, which the cluster does not name: {text}"
                );
            }
            up.cli_ok(&["snapshot", "create", "vol0", &name]);
        }
        for n in 1..=3 {
            wait_snapshot(&up, n, &name, Duration::from_secs(30));
            let (ok, text) = qemu_io(
                &up.uri(n, &format!("vol0@{name}")),
                &[&format!("read -P {pattern} 0 2M")],
                true,
            );
            assert!(ok, "round {round}: {name} through n{n}: {text}");
        }
    }
    eprintln!("(command succeeded, snapshot named) per round: {outcomes:?}");
}

/// The primary killed (kill -9 at a random instant) while it makes a clone: a clone
/// still being made is served by no node; once the node is back the clone is either
/// whole (its snapshot's data through every node) or gone, and asking again makes it;
/// in the last round it is resolved while the node is still down (the leader gives it
/// up). A clone the command reported made is never gone.
#[test]
fn a_primary_killed_while_it_clones_leaves_the_clone_whole_or_gone() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "256MiB");
    let mut rng = fastrand::Rng::with_seed(seed());
    let img = tmp.path().join("in.img");
    random_file(&img, 24 << 20, seed());
    run("nbdcopy", &[img.to_str().unwrap(), &up.uri(1, "vol0")]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x5a 0 8M", "flush"]);
    let mut primary = 1u16;
    let mut outcomes = Vec::new();
    for round in 0..4u8 {
        let name = format!("c{round}");
        let cli = std::process::Command::new(BIN)
            .args(["volume", "clone", "vol0@s", &name, "--data"])
            .arg(&data)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(5..400)));
        up.cli_ok(&["fault", "kill", "--node", &format!("n{primary}")]);
        let o = cli.wait_with_output().unwrap();
        let other = if primary == 1 { 2 } else { 1 };
        // Named but still being made: no node serves it.
        let mid = up
            .volume_meta(other, &name)
            .is_some_and(|m| !m["cloning"].is_null());
        if mid {
            for n in (1..=3).filter(|n| *n != primary) {
                let (ok, text) = qemu_io(&up.uri(n, &name), &["read 0 4k"], true);
                assert!(
                    !ok,
                    "round {round}: n{n} serves {name} while it is being made: {text}"
                );
            }
        }
        let m = up.wait_meta(other, "vol0", Duration::from_secs(30), "failover", |m| {
            m["primary"].as_u64().is_some_and(|p| p != primary as u64)
        });
        let old = primary;
        primary = m["primary"].as_u64().unwrap() as u16;
        if round == 3 {
            // The maker stays down: the leader gives up a clone still being made once
            // the maker has not answered for `MAKER_SILENT` (15 s), so the name is not
            // taken until the node is back.
            let t0 = std::time::Instant::now();
            while up
                .volume_meta(primary, &name)
                .is_some_and(|m| !m["cloning"].is_null())
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(40),
                    "round {round}: {name} is still being made 40 s after its maker went down"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
            eprintln!(
                "round {round}: with its maker down, {name} resolved after {:?}",
                t0.elapsed()
            );
        }
        up.cli_ok(&["fault", "revive", "--node", &format!("n{old}")]);
        up.wait_all_live(primary, "vol0", Duration::from_secs(60));
        // Whole or gone: a clone being made is given up once its maker is back (or
        // silent too long).
        let made = whole_or_gone(&up, primary, &name, &format!("round {round}: {name}"));
        if o.status.success() {
            assert!(
                made,
                "round {round}: the command reported {name} made, but it is gone: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        outcomes.push((o.status.success(), mid, made));
        if !made {
            up.cli_ok(&["volume", "clone", "vol0@s", &name]);
            up.wait_all_live(primary, &name, Duration::from_secs(60));
        }
        for n in 1..=3 {
            assert!(
                identical(&up.uri(n, "vol0@s"), &up.uri(n, &name)),
                "round {round}: {name} through n{n} is not its snapshot"
            );
        }
    }
    eprintln!("(command succeeded, seen mid-way, made) per round: {outcomes:?}");
}

/// Snapshots on both sides of a resize: the one taken before keeps its size and data
/// through every node, the one after holds both; a diff between them grows a volume
/// that holds the first and leaves it byte-identical with the second, its root checked;
/// a revert to the smaller snapshot reads as it (zeroes past its end), a clone of it
/// has its size.
#[test]
fn snapshots_and_diffs_across_a_resize() {
    let (tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    up.cli_ok(&["volume", "create", "copy", "--size", "64MiB"]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x61 0 1M", "flush"]);
    up.cli_ok(&["snapshot", "create", "vol0", "a"]);
    let full = tmp.path().join("a.img");
    up.cli_ok(&["volume", "export", "vol0@a", full.to_str().unwrap()]);
    up.cli_ok(&[
        "volume",
        "import",
        full.to_str().unwrap(),
        "--volume",
        "copy",
    ]);
    up.cli_ok(&["volume", "resize", "vol0", "--size", "128MiB"]);
    qemu_io_ok(
        &up.uri(1, "vol0"),
        &["write -P 0x62 100M 1M", "write -P 0x63 0 4k", "flush"],
    );
    up.cli_ok(&["snapshot", "create", "vol0", "b"]);
    for n in 1..=3 {
        wait_snapshot(&up, n, "b", Duration::from_secs(20));
        let (ok, text) = qemu_io(&up.uri(n, "vol0@a"), &["read -P 0x61 0 1M"], true);
        assert!(ok, "n{n}: vol0@a: {text}");
        let (ok, _) = qemu_io(&up.uri(n, "vol0@a"), &["read 100M 4k"], true);
        assert!(!ok, "n{n}: vol0@a reads past its 64 MiB");
        let (ok, text) = qemu_io(
            &up.uri(n, "vol0@b"),
            &[
                "read -P 0x63 0 4k",
                "read -P 0x61 4k 1020k",
                "read -P 0x62 100M 1M",
            ],
            true,
        );
        assert!(ok, "n{n}: vol0@b: {text}");
    }
    let d = tmp.path().join("a-b.diff");
    up.cli_ok(&[
        "volume",
        "export",
        "vol0@b",
        d.to_str().unwrap(),
        "--since",
        "a",
    ]);
    let out = up.cli_ok(&[
        "volume",
        "import",
        d.to_str().unwrap(),
        "--volume",
        "copy",
        "--diff",
    ]);
    assert!(
        out.contains("grew copy") && out.contains("verified: copy's checksum root is vol0@b"),
        "{out}"
    );
    assert!(identical(&up.uri(2, "vol0@b"), &up.uri(3, "copy")));
    // Back to the smaller snapshot: its data, zeroes past its end.
    up.cli_ok(&["volume", "revert", "vol0", "a"]);
    for n in 1..=3 {
        let (ok, text) = qemu_io(
            &up.uri(n, "vol0"),
            &["read -P 0x61 0 1M", "read -P 0 100M 1M"],
            false,
        );
        assert!(ok, "n{n}: vol0 after the revert to a: {text}");
    }
    up.cli_ok(&["volume", "clone", "vol0@a", "c"]);
    let list = up.cli_ok(&["volume", "list", "--json"]);
    let v: Value = serde_json::from_str(&list).unwrap();
    let c = v
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "c")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(c["size_bytes"], 64u64 << 20, "{c}");
    let (ok, text) = qemu_io(&up.uri(3, "c"), &["read -P 0x61 0 1M"], false);
    assert!(ok, "the clone of a: {text}");
}

/// A copy's slice page damaged on disk while a snapshot still shared it with the
/// volume, then written by the volume: that copy could not keep the page's old content
/// for the snapshot, and fetches it from another copy that holds it (within a few
/// seconds, without a read asking): the snapshot reads whole through that node again.
#[test]
fn a_snapshot_page_one_copy_lost_is_fetched_from_another() {
    let (_tmp, data) = setup();
    let up = Up::start(&data, "64MiB");
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x41 0 1M", "flush"]);
    up.cli_ok(&["snapshot", "create", "vol0", "s"]);
    up.cli_ok(&[
        "fault", "corrupt", "--node", "n3", "--volume", "vol0", "--lba", "0", "--target", "slice",
    ]);
    qemu_io_ok(&up.uri(1, "vol0"), &["write -P 0x42 0 4k", "flush"]);
    up.wait_all_live(1, "vol0", Duration::from_secs(30));
    let t0 = std::time::Instant::now();
    loop {
        let (ok, text) = qemu_io(&up.uri(3, "vol0@s"), &["read -P 0x41 0 1M"], true);
        if ok {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "n3 does not read its snapshot whole again: {text}\n{}",
            up.node_log(3)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ok, text) = qemu_io(&up.uri(3, "vol0"), &["read -P 0x42 0 4k"], false);
    assert!(ok, "{text}");
    let log = up.node_log(3);
    assert!(
        log.contains("snapshot pages this copy had lost fetched from another copy"),
        "n3 read the snapshot without having lost its page: the test proves nothing\n{log}"
    );
}
