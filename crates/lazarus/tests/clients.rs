//! Guards: a volume served by a real `lazarus node` works with real NBD clients
//! (qemu-img, qemu-io, nbdcopy, nbdinfo, fio): content round-trips bit for bit,
//! unaligned writes are read-modify-written correctly, data survives a restart.

mod common;
use common::*;

#[test]
fn qemu_img_convert_and_compare_64m() {
    require("qemu-img");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "256MiB");
    let img = tmp.path().join("r.img");
    random_file(&img, 64 << 20, 1);
    let target = node.qemu_json("vol0", 64 << 20);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            img.to_str().unwrap(),
            &target,
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &target,
        ],
    );
    // A differing byte must be caught by the same comparison (the check can fail).
    let mut data = std::fs::read(&img).unwrap();
    data[12345] ^= 1;
    std::fs::write(&img, &data).unwrap();
    let o = run_out(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &target,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "compare must see the difference");
}

#[test]
fn qemu_io_patterns_including_unaligned_512() {
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "64MiB");
    let uri = node.uri("vol0");
    let ops = [
        "write -P 0x11 0 1M",
        "write -P 0x22 512 512",      // inside one block
        "write -P 0x33 3584 1024",    // straddles two blocks
        "write -P 0x44 1048064 8192", // unaligned, spans 3 blocks
        "write -P 0x55 2M 4k",
        "write -z 2M 1536", // zero a partial range
        "flush",
    ];
    let mut args = vec!["-f", "raw"];
    for o in &ops {
        args.push("-c");
        args.push(o);
    }
    args.push(&uri);
    run("qemu-io", &args);
    let checks = [
        "read -P 0x11 0 512",
        "read -P 0x22 512 512",
        "read -P 0x11 1024 2560",
        "read -P 0x33 3584 1024",
        "read -P 0x11 4608 1043456",
        "read -P 0x44 1048064 8192",
        "read -P 0 1056256 4096",
        "read -P 0 2M 1536",
        "read -P 0x55 2098688 2560",
    ];
    let verify = |uri: &str| {
        let mut args = vec!["-f", "raw"];
        for c in &checks {
            args.push("-c");
            args.push(c);
        }
        args.push(uri);
        let out = run("qemu-io", &args);
        assert!(!out.contains("Pattern verification failed"), "{out}");
    };
    verify(&uri);
    node.restart();
    verify(&node.uri("vol0"));
    // The verification itself can fail.
    let o = run_out(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x99 0 512", &node.uri("vol0")],
    );
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
    );
}

#[test]
fn overlapping_unaligned_writes_in_flight_together() {
    // qemu-io's aio_write issues requests concurrently on one connection.
    require("qemu-io");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "16MiB");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    // 64 concurrent 512-byte writes, each to its own sector of the same 8 blocks.
    for i in 0..64u64 {
        args.push("-c".into());
        args.push(format!("aio_write -P {} {} 512", 0x10 + i, i * 512));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    args.push(node.uri("vol0"));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run("qemu-io", &a);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..64u64 {
        args.push("-c".into());
        args.push(format!("read -P {} {} 512", 0x10 + i, i * 512));
    }
    args.push(node.uri("vol0"));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &a);
    assert!(
        !out.contains("Pattern verification failed"),
        "a concurrent read-modify-write lost a neighbour's sector:\n{out}"
    );
}

#[test]
fn nbdcopy_in_and_out_and_nbdinfo_list() {
    require("nbdcopy");
    require("nbdinfo");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "32MiB");
    node.create_volume("other", "8MiB");
    let img = tmp.path().join("in.img");
    let data = random_file(&img, 32 << 20, 2);
    run("nbdcopy", &[img.to_str().unwrap(), &node.uri("vol0")]);
    let out = export_bytes(&node, "vol0", tmp.path());
    assert!(
        out == data,
        "nbdcopy out differs from what nbdcopy wrote in"
    );
    let list = run("nbdinfo", &["--list", &format!("nbd://{}", node.nbd)]);
    assert!(
        list.contains("export=\"vol0\"") && list.contains("export=\"other\""),
        "{list}"
    );
    assert!(list.contains("export-size: 33554432"), "{list}");
    let json = run("nbdinfo", &["--json", &node.uri("other")]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 8 << 20);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    // Unknown export: an error, not a hang or a crash.
    let o = run_out("nbdinfo", &[&node.uri("nope")]);
    assert!(!o.status.success());
}

#[test]
fn fio_randwrite_verify_several_jobs() {
    require("fio");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("vol0", "256MiB");
    let job = tmp.path().join("j.fio");
    std::fs::write(
        &job,
        format!(
            "[global]\nioengine=nbd\nuri={}\nrw=randwrite\nbs=4k\niodepth=32\nsize=32m\nverify=crc32c\nverify_fatal=1\ndo_verify=1\n\
             [j1]\noffset=0\n[j2]\noffset=64m\n[j3]\noffset=128m\n[j4]\noffset=192m\nbs=16k\n",
            node.uri("vol0")
        ),
    )
    .unwrap();
    // fio writes verify-state files into its working directory: keep them in tmp.
    let o = std::process::Command::new("fio")
        .args([
            job.to_str().unwrap(),
            "--output-format=json",
            "--verify_state_save=0",
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job failed: {j}");
        assert!(j["write"]["io_bytes"].as_u64().unwrap() >= 32 << 20);
        assert!(
            j["read"]["io_bytes"].as_u64().unwrap() >= 32 << 20,
            "verify phase must read everything back"
        );
    }
}

/// `base:allocation`: nbdinfo --map, qemu-img map and nbdcopy see exactly the blocks
/// that hold data (written, partly zeroed again, unaligned) and holes elsewhere; the
/// sparse copy is byte for byte the volume.
#[test]
fn allocation_map_through_nbdinfo_qemu_img_and_a_sparse_copy() {
    require("nbdinfo");
    require("nbdcopy");
    require("qemu-io");
    require("qemu-img");
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), NodeOpts::default());
    node.create_volume("sparse", "64MiB");
    let uri = node.uri("sparse");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -z 1040k 16k",
            "-c",
            "write -P 0xcd 20000 3000",
            "-c",
            "write -P 0x11 40M 4k",
        ],
    );
    // What nbdinfo reports (offset, length, type: 0 data, 2 stored zeroes, 3 hole):
    // the blocks 20000..23000 touches, 64k from 1M of which 16k were zeroed (stored
    // zero blocks: WRITE_ZEROES without permission to punch), 4k at 40M.
    let size = 64u64 << 20;
    let (m, k) = (1u64 << 20, 1u64 << 10);
    let marked: Vec<(u64, u64, u64)> = vec![
        (16384, 8192, 0),
        (m, 16 * k, 0),
        (m + 16 * k, 16 * k, 2),
        (m + 32 * k, 32 * k, 0),
        (40 * m, 4096, 0),
    ];
    let mut want: Vec<(u64, u64, u64)> = Vec::new();
    let mut pos = 0;
    for (o, l, t) in &marked {
        if *o > pos {
            want.push((pos, o - pos, 3));
        }
        want.push((*o, *l, *t));
        pos = o + l;
    }
    want.push((pos, size - pos, 3));

    let map = run("nbdinfo", &["--map", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    let got: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want, "nbdinfo --map: {map}");

    // qemu: holes are neither data nor allocated; stored zeroes are data that reads as
    // zero.
    let qmap = run("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    let q: serde_json::Value = serde_json::from_str(&qmap).unwrap();
    let qgot: Vec<(u64, u64, u64)> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let t = match (e["data"] == true, e["zero"] == true) {
                (true, false) => 0,
                (true, true) => 2,
                (false, true) => 3,
                (false, false) => 99,
            };
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                t,
            )
        })
        .collect();
    assert_eq!(qgot, want, "qemu-img map: {qmap}");

    // A copy that skips the holes is still the whole volume.
    let out = tmp.path().join("out.img");
    run("nbdcopy", &[&uri, out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, size);
    let mut expect = vec![0u8; size as usize];
    expect[1 << 20..(1 << 20) + (64 << 10)].fill(0xab);
    expect[(1040 << 10)..(1056 << 10)].fill(0);
    expect[20000..23000].fill(0xcd);
    expect[40 << 20..(40 << 20) + 4096].fill(0x11);
    assert!(bytes == expect, "the sparse copy differs from the volume");
}
