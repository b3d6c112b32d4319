//! `lazarus volume import FILE --volume V` and `lazarus volume export V FILE`: raw
//! images in and out through the admin API, sparse-aware both ways (holes in the file
//! become unmapped ranges; unmapped ranges stay holes in the exported file).

use crate::client::{self, Api};
use anyhow::Context;
use serde_json::json;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

const CHUNK: u64 = 4 << 20;

fn volume_size(api: &Api, volume: &str) -> anyhow::Result<u64> {
    let v = client::ok(api.get(&format!("/api/v1/volumes/{volume}"))?).with_context(|| {
        format!("volume {volume:?} (create it first: lazarus volume create {volume} --size SIZE)")
    })?;
    v["size_bytes"]
        .as_u64()
        .context("the API did not report the volume's size")
}

/// Next offset at or after `off` that holds data (SEEK_DATA), or `len` if none.
fn next_data(f: &File, off: u64, len: u64) -> u64 {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        len
    } else {
        (r as u64).min(len)
    }
}

fn next_hole(f: &File, off: u64, len: u64) -> u64 {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_HOLE) };
    if r < 0 {
        len
    } else {
        (r as u64).min(len)
    }
}

pub fn import(api: &Api, file: &Path, volume: &str) -> anyhow::Result<()> {
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata()?.len();
    let size = volume_size(api, volume)?;
    if len > size {
        anyhow::bail!(
            "{} is {len} bytes; volume {volume:?} holds {size}",
            file.display()
        );
    }
    let t0 = Instant::now();
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut written, mut zeroed) = (0u64, 0u64);
    let mut off = 0u64;
    let zero = |off: u64, n: u64| -> anyhow::Result<()> {
        if n > 0 {
            client::ok(api.post(
                &format!("/api/v1/volumes/{volume}/zero?offset={off}&length={n}"),
                &json!({}),
            )?)?;
        }
        Ok(())
    };
    while off < len {
        let data = next_data(&f, off, len);
        if data > off {
            // A hole in the file: unmapped in the volume.
            zero(off, data - off)?;
            zeroed += data - off;
            off = data;
            continue;
        }
        let end = next_hole(&f, off, len)
            .min(off + CHUNK)
            .max(off + 1)
            .min(len);
        let n = (end - off) as usize;
        f.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().all(|b| *b == 0) {
            zero(off, n as u64)?;
            zeroed += n as u64;
        } else {
            client::ok(api.put_bytes(
                &format!("/api/v1/volumes/{volume}/data?offset={off}"),
                &buf[..n],
            )?)?;
            written += n as u64;
        }
        off = end;
        crate::status::progress(off, len, "bytes", t0.elapsed());
    }
    // The volume's bytes after the image are zero too: it holds exactly the image.
    zero(len, size - len)?;
    client::ok(api.post(&format!("/api/v1/volumes/{volume}/flush"), &json!({}))?)?;
    println!(
        "imported {} into {volume}: {written} bytes written, {} left unmapped, in {:.1} s (flushed)",
        file.display(),
        zeroed + (size - len),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn export(api: &Api, volume: &str, file: &Path) -> anyhow::Result<()> {
    let size = volume_size(api, volume)?;
    let map = client::ok(api.get(&format!("/api/v1/volumes/{volume}/map"))?)?;
    let f = File::create(file).with_context(|| format!("cannot create {}", file.display()))?;
    f.set_len(size)?;
    let extents: Vec<(u64, u64)> = map["extents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e[0].as_u64()? * 4096, e[1].as_u64()? * 4096)))
        .collect();
    let total: u64 = extents.iter().map(|e| e.1).sum();
    let t0 = Instant::now();
    let mut done = 0u64;
    for (start, len) in extents {
        let mut off = start;
        while off < start + len {
            let n = CHUNK.min(start + len - off);
            let data = api.get_bytes(&format!(
                "/api/v1/volumes/{volume}/data?offset={off}&length={n}"
            ))?;
            anyhow::ensure!(data.len() as u64 == n, "short read from the volume");
            if data.iter().any(|b| *b != 0) {
                f.write_all_at(&data, off)?;
            }
            off += n;
            done += n;
            crate::status::progress(done, total, "bytes", t0.elapsed());
        }
    }
    f.sync_all()?;
    println!(
        "exported {volume} to {} ({size} bytes, {done} mapped) in {:.1} s",
        file.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
