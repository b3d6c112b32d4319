//! A journal file of arbitrary content (valid headers, arbitrary records) opened and
//! replayed by the store: never a panic, and the store opens or reports an error.
#![no_main]
use lazarus_store::journal::{encode_record, HEADER_SLOT_BYTES, RECORDS_START};
use lazarus_store::{Store, StoreOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("lzfuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        // A fresh store with one volume, then replace the journal's records.
        let s = match Store::open(&dir, StoreOptions { journal_bytes: 8 << 20, ..Default::default() }) { Ok(s) => s, Err(_) => return };
        let _ = s.create_volume("v", 1 << 20);
    }
    let jpath = dir.join("journal.log");
    let mut j = std::fs::read(&jpath).unwrap();
    let gen_slot = (0..2).map(|i| i * HEADER_SLOT_BYTES as usize).find(|o| lazarus_store::journal::decode_header_generation(&j[*o..*o + 4096]).is_some()).unwrap();
    let gen = lazarus_store::journal::decode_header_generation(&j[gen_slot..gen_slot + 4096]).unwrap();
    let mut pos = RECORDS_START as usize;
    let mut lsn = 1;
    // Each chunk: kind byte + payload, wrapped as a valid record so replay sees it.
    for chunk in data.split(|b| *b == 0xff).take(64) {
        if chunk.is_empty() { continue; }
        let rec = encode_record(gen, lsn, chunk[0] % 8, &chunk[1..]);
        if pos + rec.len() > j.len() { break; }
        j[pos..pos + rec.len()].copy_from_slice(&rec);
        pos += rec.len();
        lsn += 1;
    }
    std::fs::write(&jpath, &j).unwrap();
    let _ = Store::open(&dir, StoreOptions { journal_bytes: 8 << 20, ..Default::default() });
    let _ = std::fs::remove_dir_all(&dir);
});
