//! Guards DESIGN.md "What bad input and faults get":
//! - a corrupted block or slice page on disk is detected and answered with EIO, never
//!   served (one node: nothing to repair from yet);
//! - a node killed with SIGKILL at a random instant restarts consistent: every range
//!   flushed before the kill reads back, and no page looks corrupt;
//! - a full disk answers writes with ENOSPC and damages nothing already stored.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

fn flip(path: &str, offset: u64, len: usize) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    for x in b.iter_mut() {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn corrupted_block_and_slice_page_read_as_eio() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "64MiB");
    let img = tmp.path().join("src.img");
    random_file(&img, 8 << 20, 3);
    run("nbdcopy", &[img.to_str().unwrap(), &node.uri("vol0")]);
    // LBA 10 (page 0): its block is damaged. LBA 700 (page 2): its slice page is damaged.
    let blk = node.api_get("/api/v1/volumes/vol0/locate?lba=10");
    let pg = node.api_get("/api/v1/volumes/vol0/locate?lba=700");
    node.stop();
    flip(
        blk["block_file"].as_str().unwrap(),
        blk["block_offset"].as_u64().unwrap() + 100,
        8,
    );
    flip(
        pg["slice_file"].as_str().unwrap(),
        pg["slice_offset"].as_u64().unwrap() + 64,
        4,
    );
    node.spawn();
    let uri = node.uri("vol0");
    let read = |off: u64, len: u64| {
        run_out(
            "qemu-io",
            &["-f", "raw", "-c", &format!("read {off} {len}"), &uri],
        )
    };
    for (what, off) in [
        ("damaged block", 10 * 4096),
        ("damaged slice page", 700 * 4096),
        ("same page, other LBA", 767 * 4096),
    ] {
        let o = read(off, 4096);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            text.contains("Input/output error"),
            "{what} at {off} was served: {text}"
        );
    }
    // Undamaged neighbours read back the right bytes.
    let data = std::fs::read(&img).unwrap();
    for off in [9u64 * 4096, 11 * 4096, 768 * 4096, 511 * 4096] {
        let src = format!(
            "json:{{\"driver\":\"raw\",\"offset\":{off},\"size\":4096,\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"inet\",\"host\":\"{}\",\"port\":\"{}\"}},\"export\":\"vol0\"}}}}",
            node.nbd.ip(),
            node.nbd.port()
        );
        let dump = tmp.path().join("dump.bin");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &src,
                dump.to_str().unwrap(),
            ],
        );
        let got = std::fs::read(&dump).unwrap();
        assert!(
            got == data[off as usize..off as usize + 4096],
            "LBA {} changed",
            off / 4096
        );
    }
    // Status reports the unrecoverable range of the damaged page.
    let v = node.api_get("/api/v1/volumes/vol0");
    assert_eq!(v["unrecoverable"][0]["first_lba"], 512);
    assert_eq!(v["unrecoverable"][0]["count"], 256);
    let st = node.cli(&["status", "--json"]);
    assert!(st.status.success());
    // Rewriting the whole damaged page makes it whole again; rewriting part leaves the rest unrecoverable.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 2M 4k",
            "-c",
            "flush",
            &uri,
        ],
    );
    let o = read(512 * 4096, 4096);
    assert!(o.status.success());
    let o = read(513 * 4096, 4096);
    assert!(
        !o.status.success(),
        "a partly rewritten page must keep its other LBAs unrecoverable"
    );
    node.restart();
    let uri = node.uri("vol0");
    let o = run_out("qemu-io", &["-f", "raw", "-c", "read 2101248 4096", &uri]);
    assert!(!o.status.success(), "damage must persist across restart");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x43 2M 1M",
            "-c",
            "flush",
            &uri,
        ],
    );
    run("qemu-io", &["-f", "raw", "-c", "read -P 0x43 2M 1M", &uri]);
    assert_eq!(
        node.api_get("/api/v1/volumes/vol0")["unrecoverable_lbas"],
        0
    );
}

/// Writes `len` random bytes (distinct per call, so nothing dedupes) at `off`.
fn write_random(node: &Node, dir: &Path, off: u64, len: usize, seed: u64, flush: bool) -> Vec<u8> {
    let f = dir.join(format!("w{seed}.bin"));
    let data = random_file(&f, len, seed);
    let mut args = vec![
        "-f".to_string(),
        "raw".into(),
        "-c".into(),
        format!("write -s {} {off} {len}", f.display()),
    ];
    if flush {
        args.push("-c".into());
        args.push("flush".into());
    }
    args.push(node.uri("vol0"));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run("qemu-io", &a);
    let _ = std::fs::remove_file(&f);
    data
}

#[test]
fn kill9_at_random_instants_loses_nothing_flushed() {
    require("qemu-io");
    require("nbdcopy");
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().unwrap();
    // A small journal forces checkpoints during the run, so kills land inside them too.
    let mut node = Node::start(
        &tmp.path().join("n"),
        NodeOpts {
            journal_bytes: 8 << 20,
            checkpoint_interval_secs: 1,
        },
    );
    const VOL: u64 = 96 << 20;
    node.create_volume("vol0", "96MiB");
    let mut flushed: Vec<(u64, Vec<u8>)> = Vec::new();
    for round in 0..20u64 {
        // Flushed writes: unaligned offsets inside this round's own 2 MiB region.
        let base = round * (2 << 20);
        for k in 0..3u64 {
            let off = base + k * (600 << 10) + rng.u64(0..4096);
            let len = rng.usize(1..(256 << 10));
            let data = write_random(&node, tmp.path(), off, len, seed ^ (round << 8) ^ k, true);
            flushed.push((off, data));
        }
        // Then keep writing (not flushed) to the upper half and kill -9 mid-stream.
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for i in 0..64u64 {
            args.push("-c".into());
            args.push(format!(
                "aio_write -P {} {} 64k",
                i % 250 + 1,
                (VOL / 2) + rng.u64(0..(VOL / 2 - (64 << 10)))
            ));
        }
        args.push(node.uri("vol0"));
        let mut stream = std::process::Command::new("qemu-io")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(0..150)));
        node.kill9();
        let _ = stream.kill();
        let _ = stream.wait();
        node.spawn();
        let st = node.api_get("/api/v1/status");
        assert!(
            st["recovery"]["damaged_pages"]
                .as_array()
                .unwrap()
                .is_empty(),
            "round {round}: a crash looked like corruption: {st}"
        );
        assert_eq!(st["recovery"]["missing_blocks"], 0, "round {round}: {st}");
        assert_eq!(st["volumes"][0]["unrecoverable_lbas"], 0, "round {round}");
        if round % 5 == 4 || round == 19 {
            // Whole-volume read: every LBA must read (no EIO anywhere) and every
            // flushed range must hold exactly what was written.
            let all = export_bytes(&node, "vol0", tmp.path());
            for (i, (off, data)) in flushed.iter().enumerate() {
                let got = &all[*off as usize..*off as usize + data.len()];
                assert!(
                    got == &data[..],
                    "round {round}: flushed write #{i} at {off} (+{}) lost (seed {seed})",
                    data.len()
                );
            }
        }
    }
}

#[test]
fn full_disk_answers_enospc_and_keeps_data() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    // A 40 MiB tmpfs as the node's device (we are root in CI and here).
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=40m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _u = Unmount(mnt.clone());
    let mut node = Node::start(
        &mnt.join("n"),
        NodeOpts {
            journal_bytes: 8 << 20,
            checkpoint_interval_secs: 30,
        },
    );
    node.create_volume("vol0", "128MiB");
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut enospc = false;
    for i in 0..64u64 {
        let f = tmp.path().join(format!("w{i}.bin"));
        let data = random_file(&f, 1 << 20, 1000 + i);
        let o = run_out(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -s {} {} 1M", f.display(), i << 20),
                "-c",
                "flush",
                &node.uri("vol0"),
            ],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if text.contains("No space left on device") {
            enospc = true;
            break;
        }
        assert!(
            o.status.success(),
            "write {i} failed with something other than ENOSPC: {text}"
        );
        written.push((i << 20, data));
    }
    assert!(
        enospc,
        "40 MiB of disk never filled up with 64 MiB of writes"
    );
    assert!(written.len() >= 8, "only {} MiB fit", written.len());
    // Reads still work while full.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read 0 1M", &node.uri("vol0")],
    );
    node.restart();
    let all = export_bytes(&node, "vol0", tmp.path());
    for (off, data) in &written {
        assert!(
            all[*off as usize..*off as usize + data.len()] == data[..],
            "data at {off} damaged by the full disk"
        );
    }
    let st = node.api_get("/api/v1/status");
    assert!(
        st["recovery"]["damaged_pages"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{st}"
    );
}

/// The node's log on a device that refuses every write (`/dev/full`, as when the log's
/// disk fills): log lines are lost and nothing else. tracing-subscriber reports a failed
/// log write with `eprintln!`, which panics when standard error fails too; before the
/// node's own log writer every log line panicked the task that wrote it (the start-up
/// here; in a chaos run the Raft core, leaving a node that ran on without metadata).
#[test]
fn a_full_log_device_breaks_nothing() {
    require("qemu-io");
    require("nbdcopy");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("node.toml"),
        format!(
            "id = \"t1\"\ndata_dir = \"{}\"\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal_bytes = {}\n",
            dir.display(),
            16 << 20
        ),
    )
    .unwrap();
    let mut node = Node {
        dir: dir.clone(),
        config: dir.join("node.toml"),
        child: None,
        nbd: "0.0.0.0:0".parse().unwrap(),
        admin: "0.0.0.0:0".parse().unwrap(),
    };
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    node.spawn_logging_to(full());
    node.create_volume("vol0", "8MiB");
    let data = write_random(&node, tmp.path(), 12345, 1 << 20, seed(), true);
    let all = export_bytes(&node, "vol0", tmp.path());
    assert!(
        all[12345..12345 + data.len()] == data[..],
        "read back differs"
    );
    // A restart replays and logs as much again.
    node.kill9();
    node.spawn_logging_to(full());
    let all = export_bytes(&node, "vol0", tmp.path());
    assert!(
        all[12345..12345 + data.len()] == data[..],
        "lost over a restart"
    );
    let st = node.api_get("/api/v1/status");
    assert_eq!(st["volumes"][0]["unrecoverable_lbas"], 0, "{st}");
}
