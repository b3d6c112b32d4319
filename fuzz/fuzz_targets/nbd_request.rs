//! Any 28 bytes (plus an export size and read-only bit) through the request parser and
//! validator: never a panic; a request that validates lies inside the export.
#![no_main]
use lazarus_nbd::{Command, Request, REQUEST_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < REQUEST_HEADER_LEN + 9 {
        return;
    }
    let hdr: [u8; REQUEST_HEADER_LEN] = data[..REQUEST_HEADER_LEN].try_into().unwrap();
    let size = u64::from_le_bytes(data[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + 8].try_into().unwrap());
    let ro = data[REQUEST_HEADER_LEN + 8] & 1 == 1;
    if let Ok(r) = Request::parse(&hdr) {
        if r.validate(size, ro).is_ok() {
            match r.command {
                Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
                    assert!(r.offset.checked_add(r.length as u64).is_some_and(|e| e <= size));
                    assert!(!ro || r.command == Command::Read);
                }
                Command::Unknown(_) => panic!("unknown command validated"),
                _ => {}
            }
        }
    }
});
