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
    // A volume created a moment ago may not be on the node asked yet (its copy is made
    // when the node applies the metadata change): a 404 is asked again for a while.
    let path = format!("/api/v1/volumes/{volume}");
    let mut r = api.get(&path)?;
    for _ in 0..50 {
        if r.0 != 404 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        r = api.get(&path)?;
    }
    let v = client::ok(r).with_context(|| {
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

/// The byte ranges of an API answer's `extents` (`[first_lba, count]` in blocks).
fn byte_extents(v: &serde_json::Value) -> Vec<(u64, u64)> {
    runs_in_bytes(&v["extents"])
}

/// `[[first block, count], ...]` as byte ranges.
fn runs_in_bytes(runs: &serde_json::Value) -> Vec<(u64, u64)> {
    runs.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e[0].as_u64()? * 4096, e[1].as_u64()? * 4096)))
        .collect()
}

/// Reads `extents` in chunks of at most `CHUNK` bytes with `read(offset, length)` and
/// hands each to `each(offset, data)`, showing progress. Returns the bytes read.
fn copy_chunks(
    extents: &[(u64, u64)],
    mut read: impl FnMut(u64, u64) -> anyhow::Result<Vec<u8>>,
    mut each: impl FnMut(u64, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let total: u64 = extents.iter().map(|e| e.1).sum();
    let t0 = Instant::now();
    let mut done = 0u64;
    for &(start, len) in extents {
        let mut off = start;
        while off < start + len {
            let n = CHUNK.min(start + len - off);
            let data = read(off, n)?;
            anyhow::ensure!(data.len() as u64 == n, "short read at offset {off}");
            each(off, &data)?;
            off += n;
            done += n;
            crate::status::progress(done, total, "bytes", t0.elapsed());
        }
    }
    Ok(done)
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
    let t0 = Instant::now();
    let done = copy_chunks(
        &byte_extents(&map),
        |off, n| {
            api.get_bytes(&format!(
                "/api/v1/volumes/{volume}/data?offset={off}&length={n}"
            ))
        },
        |off, data| {
            if data.iter().any(|b| *b != 0) {
                f.write_all_at(data, off)?;
            }
            Ok(())
        },
    )?;
    f.sync_all()?;
    println!(
        "exported {volume} to {} ({size} bytes, {done} mapped) in {:.1} s",
        file.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn hex16(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = s
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

fn to_hex(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `lazarus volume export VOLUME@SNAP FILE [--since A]`: a raw image of the snapshot,
/// or (with `since`) an incremental export of what it changed since snapshot A.
pub fn export_snapshot(
    api: &Api,
    volume: &str,
    snap: &str,
    since: Option<&str>,
    file: &Path,
) -> anyhow::Result<()> {
    let q = since.map_or(String::new(), |a| format!("?since={a}"));
    let d = client::ok(api.get(&format!(
        "/api/v1/volumes/{volume}/snapshots/{snap}/diff{q}"
    ))?)?;
    let size = d["size_bytes"].as_u64().context("no size in the answer")?;
    let extents = byte_extents(&d);
    let t0 = Instant::now();
    let read = |off: u64, n: u64| -> anyhow::Result<Vec<u8>> {
        api.get_bytes(&format!(
            "/api/v1/volumes/{volume}/snapshots/{snap}/data?offset={off}&length={n}"
        ))
    };
    match since {
        None => {
            let f =
                File::create(file).with_context(|| format!("cannot create {}", file.display()))?;
            f.set_len(size)?;
            let done = copy_chunks(&extents, read, |off, data| {
                if data.iter().any(|b| *b != 0) {
                    f.write_all_at(data, off)?;
                }
                Ok(())
            })?;
            f.sync_all()?;
            println!(
                "exported {volume}@{snap} to {} ({size} bytes, {done} mapped) in {:.1} s",
                file.display(),
                t0.elapsed().as_secs_f64()
            );
        }
        Some(a) => {
            let h = diff::Header {
                size_bytes: size,
                volume: volume.to_string(),
                since: a.to_string(),
                since_root: hex16(d["since_root"].as_str().unwrap_or("")),
                snapshot: snap.to_string(),
                root: hex16(d["root"].as_str().unwrap_or("")),
            };
            let f =
                File::create(file).with_context(|| format!("cannot create {}", file.display()))?;
            let mut out = diff::Out::new(std::io::BufWriter::new(f), &h)?;
            // What B leaves unmapped where A had blocks: zero records, nothing read.
            let mut holes = runs_in_bytes(&d["holes"]).into_iter().peekable();
            let mut holes_before = |out: &mut diff::Out<_>, end: u64| -> std::io::Result<u64> {
                let mut n = 0;
                while let Some((off, len)) = holes.next_if(|h| h.0 < end) {
                    out.zero(off, len, false)?;
                    n += len;
                }
                Ok(n)
            };
            let mut done = copy_chunks(&extents, read, |off, data| {
                holes_before(&mut out, off)?;
                if data.iter().all(|b| *b == 0) {
                    out.zero(off, data.len() as u64, true)?;
                } else {
                    out.data(off, data)?;
                }
                Ok(())
            })?;
            done += holes_before(&mut out, u64::MAX)?;
            let records = out.records;
            let f = out.finish()?.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            let bytes = f.metadata()?.len();
            println!(
                "exported {volume}@{snap} since {a} to {}: {done} bytes changed in {records} record(s), {bytes} bytes written, in {:.1} s",
                file.display(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// `lazarus volume import FILE --volume V --diff`: checks the whole file (its CRC)
/// before changing anything, checks that the volume holds what the diff starts from
/// (its checksum root is the `since` snapshot's, unless `force`), then applies it and
/// flushes.
pub fn import_diff(api: &Api, file: &Path, volume: &str, force: bool) -> anyhow::Result<()> {
    let open = || -> anyhow::Result<diff::In<std::io::BufReader<File>>> {
        let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        diff::In::open(std::io::BufReader::new(f))
            .with_context(|| format!("{} is not a usable incremental export", file.display()))
    };
    // Pass 1: the whole file verifies before anything is written.
    let mut r = open()?;
    let mut changed = 0u64;
    while let Some(rec) = r
        .next_record()
        .with_context(|| format!("{} is damaged", file.display()))?
    {
        changed += match rec {
            diff::Record::Data(_, d) => d.len() as u64,
            diff::Record::Zero(_, n, _) => n,
        };
    }
    let h = r.header.clone();
    let mut size = volume_size(api, volume)?;
    let v = client::ok(api.get(&format!("/api/v1/volumes/{volume}"))?)?;
    let root = v["root"].as_str().unwrap_or("").to_string();
    let holds_since = root == to_hex(&h.since_root);
    if size < h.size_bytes {
        if !holds_since {
            anyhow::bail!(
                "volume {volume:?} is {size} bytes; the diff is of a {} byte volume (grow it first: lazarus volume resize)",
                h.size_bytes
            );
        }
        // It holds A exactly, and the volume grew between A and B: so does this one.
        client::ok(api.post(
            &format!("/api/v1/volumes/{volume}/resize"),
            &json!({ "size": h.size_bytes }),
        )?)?;
        println!(
            "grew {volume} from {size} to {} bytes, as {}@{} is",
            h.size_bytes, h.volume, h.snapshot
        );
        size = h.size_bytes;
    }
    if !holds_since && !force {
        anyhow::bail!(
            "volume {volume:?} does not hold snapshot {}@{} (its root is {}, the diff starts from {}): apply the diffs in order, or pass --force",
            h.volume,
            h.since,
            crate::short_hex(&root),
            &to_hex(&h.since_root)[..12]
        );
    }
    let t0 = Instant::now();
    let mut r = open()?;
    let mut done = 0u64;
    while let Some(rec) = r.next_record()? {
        match rec {
            diff::Record::Data(off, d) => {
                client::ok(
                    api.put_bytes(&format!("/api/v1/volumes/{volume}/data?offset={off}"), &d)?,
                )?;
                done += d.len() as u64;
            }
            diff::Record::Zero(off, n, mapped) => {
                client::ok(api.post(
                    &format!(
                        "/api/v1/volumes/{volume}/zero?offset={off}&length={n}&no_hole={mapped}"
                    ),
                    &json!({}),
                )?)?;
                done += n;
            }
        }
        crate::status::progress(done, changed, "bytes", t0.elapsed());
    }
    client::ok(api.post(&format!("/api/v1/volumes/{volume}/flush"), &json!({}))?)?;
    println!(
        "applied {} ({}@{} since {}) to {volume}: {done} bytes in {:.1} s (flushed)",
        file.display(),
        h.volume,
        h.snapshot,
        h.since,
        t0.elapsed().as_secs_f64()
    );
    // The volume now holds the snapshot the diff leads to, if it held the one it
    // starts from: their checksum roots agree (a volume of another size, or one
    // written meanwhile, differs).
    let v = client::ok(api.get(&format!("/api/v1/volumes/{volume}"))?)?;
    let after = v["root"].as_str().unwrap_or("");
    if after == to_hex(&h.root) {
        println!(
            "verified: {volume}'s checksum root is {}@{}'s ({})",
            h.volume,
            h.snapshot,
            crate::short_hex(after)
        );
    } else if !force && size == h.size_bytes {
        anyhow::bail!(
            "after applying, volume {volume:?} does not hold {}@{}: its checksum root is {}, the snapshot's {} (was it written meanwhile?)",
            h.volume,
            h.snapshot,
            crate::short_hex(after),
            &to_hex(&h.root)[..12]
        );
    } else {
        println!(
            "{volume}'s checksum root is not {}@{}'s ({}, started from another state or size)",
            h.volume,
            h.snapshot,
            crate::short_hex(after)
        );
    }
    Ok(())
}

/// Incremental export files (docs/format.md, "Incremental export").
pub mod diff {
    use std::io::{Read, Write};

    pub const MAGIC: &[u8; 8] = b"LZDIFF01";
    pub const VERSION: u32 = 1;
    pub const END: u8 = 0;
    pub const DATA: u8 = 1;
    pub const ZERO: u8 = 2;
    /// Zeroes stored as blocks (written zeroes, or zeroes provisioned with
    /// NBD_CMD_FLAG_NO_HOLE), where `ZERO` is a range left unmapped: the two read
    /// alike, but the volume's checksum tree tells them apart.
    pub const ZERO_MAPPED: u8 = 3;

    /// What a diff file says of itself.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Header {
        pub size_bytes: u64,
        pub volume: String,
        /// The snapshot the diff starts from, and its root.
        pub since: String,
        pub since_root: [u8; 16],
        /// The snapshot it leads to, and its root.
        pub snapshot: String,
        pub root: [u8; 16],
    }

    /// A writer that keeps the CRC32C of everything it wrote.
    pub struct Out<W: Write> {
        w: W,
        crc: u32,
        pub records: u64,
    }

    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u16).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    impl<W: Write> Out<W> {
        pub fn new(w: W, h: &Header) -> std::io::Result<Out<W>> {
            let mut o = Out {
                w,
                crc: 0,
                records: 0,
            };
            let mut b = Vec::new();
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&h.size_bytes.to_le_bytes());
            put_str(&mut b, &h.volume);
            put_str(&mut b, &h.since);
            b.extend_from_slice(&h.since_root);
            put_str(&mut b, &h.snapshot);
            b.extend_from_slice(&h.root);
            o.put(&b)?;
            Ok(o)
        }

        fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
            self.crc = crc32c::crc32c_append(self.crc, b);
            self.w.write_all(b)
        }

        pub fn data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut h = vec![DATA];
            h.extend_from_slice(&offset.to_le_bytes());
            h.extend_from_slice(&(data.len() as u64).to_le_bytes());
            self.put(&h)?;
            self.put(data)?;
            self.records += 1;
            Ok(())
        }

        /// Zeroes: unmapped, or (`mapped`) stored as zero blocks.
        pub fn zero(&mut self, offset: u64, length: u64, mapped: bool) -> std::io::Result<()> {
            let mut h = vec![if mapped { ZERO_MAPPED } else { ZERO }];
            h.extend_from_slice(&offset.to_le_bytes());
            h.extend_from_slice(&length.to_le_bytes());
            self.records += 1;
            self.put(&h)
        }

        /// The end record and the CRC; returns the writer.
        pub fn finish(mut self) -> std::io::Result<W> {
            let mut e = vec![END];
            e.extend_from_slice(&self.records.to_le_bytes());
            self.put(&e)?;
            let crc = self.crc;
            self.w.write_all(&crc.to_le_bytes())?;
            self.w.flush()?;
            Ok(self.w)
        }
    }

    /// One record of a diff.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Record {
        Data(u64, Vec<u8>),
        /// Offset, length, and whether the zeroes are stored as blocks (`ZERO_MAPPED`).
        Zero(u64, u64, bool),
    }

    /// A reader that checks the CRC as it goes; `next` returns None at the end
    /// record, once the CRC and the record count have matched.
    pub struct In<R: Read> {
        r: R,
        crc: u32,
        records: u64,
        pub header: Header,
    }

    fn bad(m: impl Into<String>) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, m.into())
    }

    /// The largest data record accepted (the exporter writes at most 4 MiB).
    const RECORD_MAX_BYTES: u64 = 64 << 20;

    impl<R: Read> In<R> {
        fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
            let mut b = vec![0u8; n];
            self.r.read_exact(&mut b).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    bad("the file ends early (truncated?)")
                } else {
                    e
                }
            })?;
            self.crc = crc32c::crc32c_append(self.crc, &b);
            Ok(b)
        }
        fn u64(&mut self) -> std::io::Result<u64> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
        }
        fn str(&mut self) -> std::io::Result<String> {
            let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
            String::from_utf8(self.take(n)?).map_err(|_| bad("a name is not UTF-8"))
        }
        fn root(&mut self) -> std::io::Result<[u8; 16]> {
            Ok(self.take(16)?.try_into().expect("16"))
        }

        pub fn open(r: R) -> std::io::Result<In<R>> {
            let mut i = In {
                r,
                crc: 0,
                records: 0,
                header: Header {
                    size_bytes: 0,
                    volume: String::new(),
                    since: String::new(),
                    since_root: [0; 16],
                    snapshot: String::new(),
                    root: [0; 16],
                },
            };
            if i.take(8)? != MAGIC {
                return Err(bad("not a Lazarus incremental export (bad magic)"));
            }
            let v = u32::from_le_bytes(i.take(4)?.try_into().expect("4"));
            if v != VERSION {
                return Err(bad(format!("unsupported version {v}")));
            }
            i.header.size_bytes = i.u64()?;
            i.header.volume = i.str()?;
            i.header.since = i.str()?;
            i.header.since_root = i.root()?;
            i.header.snapshot = i.str()?;
            i.header.root = i.root()?;
            Ok(i)
        }

        pub fn next_record(&mut self) -> std::io::Result<Option<Record>> {
            let kind = self.take(1)?[0];
            match kind {
                END => {
                    let n = self.u64()?;
                    let want = self.crc;
                    let mut c = [0u8; 4];
                    self.r
                        .read_exact(&mut c)
                        .map_err(|_| bad("the file ends before its CRC (truncated?)"))?;
                    if u32::from_le_bytes(c) != want {
                        return Err(bad("CRC mismatch: the file is damaged"));
                    }
                    if n != self.records {
                        return Err(bad("record count mismatch"));
                    }
                    let mut rest = [0u8; 1];
                    if self.r.read(&mut rest)? != 0 {
                        return Err(bad("bytes after the end record"));
                    }
                    Ok(None)
                }
                DATA | ZERO | ZERO_MAPPED => {
                    let off = self.u64()?;
                    let len = self.u64()?;
                    if off
                        .checked_add(len)
                        .is_none_or(|e| e > self.header.size_bytes)
                    {
                        return Err(bad(format!(
                            "a record at {off} length {len} lies past the end ({} bytes)",
                            self.header.size_bytes
                        )));
                    }
                    self.records += 1;
                    if kind != DATA {
                        return Ok(Some(Record::Zero(off, len, kind == ZERO_MAPPED)));
                    }
                    if len > RECORD_MAX_BYTES {
                        return Err(bad(format!("a data record of {len} bytes")));
                    }
                    Ok(Some(Record::Data(off, self.take(len as usize)?)))
                }
                k => Err(bad(format!("unknown record kind {k}"))),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn header() -> Header {
            Header {
                size_bytes: 1 << 20,
                volume: "vol0".into(),
                since: "a".into(),
                since_root: [1; 16],
                snapshot: "b".into(),
                root: [2; 16],
            }
        }

        fn sample() -> Vec<u8> {
            let mut o = Out::new(Vec::new(), &header()).unwrap();
            o.data(4096, &[7u8; 8192]).unwrap();
            o.zero(65536, 4096, false).unwrap();
            o.zero(1 << 19, 8192, true).unwrap();
            o.finish().unwrap()
        }

        #[test]
        fn roundtrip() {
            let b = sample();
            let mut i = In::open(&b[..]).unwrap();
            assert_eq!(i.header, header());
            assert_eq!(
                i.next_record().unwrap(),
                Some(Record::Data(4096, vec![7u8; 8192]))
            );
            assert_eq!(
                i.next_record().unwrap(),
                Some(Record::Zero(65536, 4096, false))
            );
            assert_eq!(
                i.next_record().unwrap(),
                Some(Record::Zero(1 << 19, 8192, true))
            );
            assert_eq!(i.next_record().unwrap(), None);
        }

        #[test]
        fn damage_and_truncation_are_errors() {
            let b = sample();
            // Every single flipped byte is caught (magic, header, record or CRC).
            for k in 0..b.len() {
                let mut d = b.clone();
                d[k] ^= 0x40;
                let r = In::open(&d[..]).and_then(|mut i| {
                    while i.next_record()?.is_some() {}
                    Ok(())
                });
                assert!(r.is_err(), "flip at {k} went unnoticed");
            }
            for cut in 0..b.len() {
                let r = In::open(&b[..cut]).and_then(|mut i| {
                    while i.next_record()?.is_some() {}
                    Ok(())
                });
                assert!(r.is_err(), "cut at {cut} went unnoticed");
            }
            let mut extra = b.clone();
            extra.push(0);
            let r = In::open(&extra[..]).and_then(|mut i| {
                while i.next_record()?.is_some() {}
                Ok(())
            });
            assert!(r.is_err());
        }
    }
}
