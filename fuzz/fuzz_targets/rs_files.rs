//! The recovery server's files damaged on disk. The first byte picks what: the
//! coordination file (`coord.json`) with the rest as its content; a volume's log with
//! the rest as its content; or a valid log of a few records (built from the first
//! bytes) with the rest as damage (byte flips at offsets, then a cut). Opening it,
//! reading every record back with and without the latest-only replay set, and
//! opening the whole server: never a panic, an error at most.
#![no_main]
use lazarus_recovery::log::{self, ChangeLog, RecordKind};
use libfuzzer_sys::fuzz_target;

fn read_all(path: &std::path::Path) {
    if let Ok(l) = ChangeLog::open(path) {
        let skip = log::superseded(l.entries());
        for s in [None, Some(&skip)] {
            let mut offset = 0;
            for _ in 0..256 {
                match l.read_skipping(offset, 1 << 16, s) {
                    Ok((_, next, _)) if next > offset => offset = next,
                    _ => break,
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, content)) = data.split_first() else { return };
    let dir = std::env::temp_dir().join(format!("lzfuzz-rsf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let path = dir.join("logs").join("vol0.1.log");
    match which % 3 {
        0 => {
            std::fs::write(dir.join("coord.json"), content).unwrap();
            if let Ok(c) = log::load_coord(&dir) {
                let _ = log::save_coord(&dir, &c);
            }
            let _ = lazarus_recovery::server::RecoveryServer::open(&dir);
        }
        1 => {
            std::fs::write(&path, content).unwrap();
            read_all(&path);
        }
        _ => {
            let n = content.first().map_or(0, |b| (b % 8) as usize);
            let (recs, damage) = content.split_at(content.len().min(1 + n * 4));
            {
                let mut l = ChangeLog::open(&path).unwrap();
                for (i, r) in recs.get(1..).unwrap_or(&[]).chunks(4).enumerate() {
                    let lba = r[0] as u64 * 7;
                    let count = 1 + r.get(1).map_or(0, |c| c % 4) as u32;
                    let (kind, data) = match r.get(2).map_or(0, |k| k % 3) {
                        0 => (RecordKind::Write, vec![r[0]; count as usize * 4096]),
                        1 => (RecordKind::Zero, Vec::new()),
                        _ => (RecordKind::ZeroProvision, Vec::new()),
                    };
                    let _ = l.append(kind, lba, count, 1, 1 + i as u64, &data);
                }
                let end = l.sync_handle().and_then(|f| f.len()).unwrap_or(0);
                l.mark_synced(end);
            }
            let mut bytes = std::fs::read(&path).unwrap();
            for d in damage.chunks(3) {
                if d.len() == 3 && !bytes.is_empty() {
                    let at = u16::from_le_bytes([d[0], d[1]]) as usize % bytes.len();
                    bytes[at] ^= d[2] | 1;
                } else if let Some(&cut) = d.first() {
                    let keep = bytes.len().saturating_sub(cut as usize);
                    bytes.truncate(keep);
                }
            }
            std::fs::write(&path, &bytes).unwrap();
            read_all(&path);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
});
