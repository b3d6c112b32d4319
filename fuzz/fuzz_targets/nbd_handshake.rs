//! A stream of options through the handshake state machine: never a panic, every
//! reply is well framed, and transmission starts only on a known export.
#![no_main]
use lazarus_nbd::*;
use libfuzzer_sys::fuzz_target;

struct Cat;
impl ExportCatalog for Cat {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "vol0").then(|| ExportInfo { name: "vol0".into(), size_bytes: 1 << 30, description: "d".into(), read_only: false, multi_conn: true })
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.lookup("vol0").into_iter().collect()
    }
    fn default_export(&self) -> Option<String> {
        Some("vol0".into())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let _ = parse_client_flags(data[..4].try_into().unwrap());
    let _ = parse_info_request(data);
    if data.len() >= OPTION_HEADER_LEN {
        let _ = OptionHeader::parse(data[..OPTION_HEADER_LEN].try_into().unwrap());
    }
    let tls = match (data[0] >> 1) & 3 {
        0 => TlsPolicy::Off,
        1 => TlsPolicy::On,
        _ => TlsPolicy::Require,
    };
    let mut hs = Handshake::with_tls(data[0] & 1 == 1, tls);
    let mut rest = &data[1..];
    while rest.len() >= 3 {
        let opt = rest[0] as u32 % 13;
        let len = (rest[1] as usize).min(rest.len() - 2);
        let body = &rest[2..2 + len];
        rest = &rest[2 + len..];
        match hs.handle(opt, body, &Cat) {
            OptionOutcome::StartTls { reply } => {
                assert!(tls != TlsPolicy::Off && !hs.encrypted);
                assert_eq!(reply.len(), 20);
                hs.tls_started();
            }
            OptionOutcome::Continue { reply } | OptionOutcome::Abort { reply } => {
                let mut r = &reply[..];
                while !r.is_empty() {
                    assert!(r.len() >= 20);
                    let l = u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize;
                    r = &r[20 + l..];
                }
            }
            OptionOutcome::Transmission { export, .. } => {
                assert_eq!(export.name, "vol0");
                // Never an export in the clear where TLS is required.
                assert!(tls != TlsPolicy::Require || hs.encrypted);
                return;
            }
            OptionOutcome::Close { .. } => return,
        }
    }
});
