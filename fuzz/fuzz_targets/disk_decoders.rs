//! Arbitrary bytes through every on-disk decoder: slice header, checksum header, slice
//! page, journal header and record. Corrupt input is an error, never a panic, and
//! whatever decodes re-encodes to the same bytes.
#![no_main]
use lazarus_store::journal::{decode_header_generation, decode_record, encode_record};
use lazarus_store::volume::{decode_cksum_header, decode_page, decode_slice_header, encode_cksum_header, encode_page, encode_slice_header};
use lazarus_types::BLOCK_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut page = vec![0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    page[..n].copy_from_slice(&data[..n]);
    if let Ok(m) = decode_slice_header(&page) {
        assert_eq!(encode_slice_header(&m), page);
    }
    let _ = decode_slice_header(data);
    if let Some(h) = decode_cksum_header(&page) {
        assert_eq!(decode_cksum_header(&encode_cksum_header(&h)), Some(h));
    }
    let p = decode_page(&page);
    assert_eq!(encode_page(&p[..]), page);
    let _ = decode_header_generation(&page);
    if let Some((r, len)) = decode_record(data, 1, 1) {
        assert!(len <= data.len());
        assert_eq!(encode_record(1, r.lsn, r.kind, &r.payload), data[..len].to_vec());
    }
});
