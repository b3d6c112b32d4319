//! NBD protocol codec, without I/O.
//!
//! The fixed-newstyle handshake is a state machine ([`Handshake`]) fed whole option
//! messages; the transmission phase is [`Request::parse`] for the 28-byte request
//! header plus reply encoders. The tokio server in the `lazarus` binary moves bytes
//! between a socket and these functions; everything that decides anything is here and
//! tested without a socket. Protocol reference: `doc/proto.md` of NetworkBlockDevice/nbd.

use thiserror::Error;

pub mod consts {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    // Handshake flags (server) and client flags.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // Options.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;
    pub const OPT_EXTENDED_HEADERS: u32 = 11;

    // Option reply types.
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

    // Info types.
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // Transmission flags.
    pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_FUA: u16 = 1 << 3;
    pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    // Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    // Command flags.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

    // Structured reply.
    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

    // The `base:allocation` meta context: its one context id here, and its flags.
    pub const META_BASE_ALLOCATION: &str = "base:allocation";
    pub const BASE_ALLOCATION_ID: u32 = 1;
    pub const STATE_HOLE: u32 = 1 << 0;
    pub const STATE_ZERO: u32 = 1 << 1;

    // Errors.
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

use consts::*;

/// Largest payload a client may send or ask for in one request (2^25, the size the
/// protocol says servers should always accept).
pub const PAYLOAD_MAX_BYTES: u32 = 1 << 25;
/// Largest option payload we read; names are at most 4 KiB, so this is generous.
pub const OPTION_DATA_MAX_BYTES: u32 = 1 << 16;
/// Longest export name we accept (the protocol's own limit).
pub const EXPORT_NAME_MAX_BYTES: usize = 4096;
/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option header (IHAVEOPT, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// What the server knows about an export, as advertised in the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size_bytes: u64,
    pub description: String,
    pub read_only: bool,
    /// CAN_MULTI_CONN is advertised only when a FLUSH on one connection covers writes
    /// completed on every other connection.
    pub multi_conn: bool,
}

impl ExportInfo {
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// Where the handshake finds exports.
pub trait ExportCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    fn list(&self) -> Vec<ExportInfo>;
    /// Name used when a client asks for the empty name.
    fn default_export(&self) -> Option<String>;
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("client did not set the fixed-newstyle flag (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option data of {0} bytes exceeds the limit of {OPTION_DATA_MAX_BYTES}")]
    OptionTooLarge(u32),
    #[error("write payload of {0} bytes exceeds the limit of {PAYLOAD_MAX_BYTES}")]
    PayloadTooLarge(u32),
    #[error("export {0:?} does not exist")]
    UnknownExport(String),
}

/// The 18 bytes the server sends first.
pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Parses the client's 4-byte flags; returns whether the client asked for NO_ZEROES.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<bool, ProtocolError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle(flags));
    }
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    /// Parses an option header. A bad magic is fatal; an over-long option is reported so
    /// the caller can skip its data and answer `NBD_REP_ERR_TOO_BIG`.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
        let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
        Ok(OptionHeader { option, length })
    }
}

/// Encodes one option reply.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn option_error(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply_type, message.as_bytes())
}

/// What the I/O layer does after an option.
#[derive(Debug, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Send `reply`, then read the next option.
    Continue { reply: Vec<u8> },
    /// Send `reply`, then close the connection (NBD_OPT_ABORT).
    Abort { reply: Vec<u8> },
    /// Send `reply`, then enter transmission on `export`.
    Transmission {
        reply: Vec<u8>,
        export: ExportInfo,
        structured: bool,
    },
    /// Close without replying (the protocol's answer to a bad NBD_OPT_EXPORT_NAME).
    Close { reason: String },
    /// Send `reply` (unencrypted), then run the TLS handshake as server on the same
    /// connection and, once it has succeeded, call [`Handshake::tls_started`] and read
    /// the next option inside TLS.
    StartTls { reply: Vec<u8> },
}

/// What a server offers of NBD over TLS (`NBD_OPT_STARTTLS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS: STARTTLS is refused.
    #[default]
    Off,
    /// TLS for clients that ask for it; others are served in the clear.
    On,
    /// TLS or nothing: before STARTTLS every option but NBD_OPT_ABORT is refused with
    /// NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which cannot be refused, closes).
    Require,
}

/// The handshake after the greeting and the client flags: feed it each option.
#[derive(Debug, Default)]
pub struct Handshake {
    pub no_zeroes: bool,
    pub structured: bool,
    pub tls: TlsPolicy,
    /// Whether STARTTLS has succeeded on this connection.
    pub encrypted: bool,
    /// The export for which NBD_OPT_SET_META_CONTEXT selected `base:allocation`.
    pub allocation_for: Option<String>,
}

/// Block sizes advertised: minimum 1 (any byte alignment is accepted and served by
/// read-modify-write), preferred 4 KiB, maximum `PAYLOAD_MAX_BYTES`.
pub const BLOCK_SIZE_MIN: u32 = 1;
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;

impl Handshake {
    pub fn new(no_zeroes: bool) -> Handshake {
        Handshake::with_tls(no_zeroes, TlsPolicy::Off)
    }

    pub fn with_tls(no_zeroes: bool, tls: TlsPolicy) -> Handshake {
        Handshake {
            no_zeroes,
            structured: false,
            tls,
            encrypted: false,
            allocation_for: None,
        }
    }

    /// The TLS handshake after a `StartTls` outcome succeeded: what was negotiated in
    /// the clear is forgotten (the protocol requires it; a man in the middle could
    /// have chosen it), and the options that follow are read inside TLS.
    pub fn tls_started(&mut self) {
        self.structured = false;
        self.allocation_for = None;
        self.encrypted = true;
    }

    /// Whether transmission on `export` (the name it resolved to) answers
    /// NBD_CMD_BLOCK_STATUS for `base:allocation`: selected for that export, with
    /// structured replies.
    pub fn allocation_selected(&self, export: &str) -> bool {
        self.structured && self.allocation_for.as_deref() == Some(export)
    }

    /// Handles one option with its data (at most `OPTION_DATA_MAX_BYTES`).
    pub fn handle(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
        if self.tls == TlsPolicy::Require
            && !self.encrypted
            && option != OPT_STARTTLS
            && option != OPT_ABORT
        {
            if option == OPT_EXPORT_NAME {
                return OptionOutcome::Close {
                    reason: "NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS".into(),
                };
            }
            return cont(option_error(
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            ));
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, catalog),
            OPT_ABORT => OptionOutcome::Abort {
                reply: option_reply(option, REP_ACK, &[]),
            },
            OPT_LIST => {
                if !data.is_empty() {
                    return cont(option_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    ));
                }
                let mut reply = Vec::new();
                for e in catalog.list() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply.extend(option_reply(option, REP_SERVER, &d));
                }
                reply.extend(option_reply(option, REP_ACK, &[]));
                cont(reply)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, catalog),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return cont(option_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    ));
                }
                self.structured = true;
                cont(option_reply(option, REP_ACK, &[]))
            }
            OPT_STARTTLS => self.starttls(data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog)
            }
            OPT_EXTENDED_HEADERS => {
                cont(option_error(option, REP_ERR_UNSUP, "option not supported"))
            }
            _ => cont(option_error(
                option,
                REP_ERR_UNSUP,
                &format!("unknown option {option}"),
            )),
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: the one context served
    /// is `base:allocation` (a LIST with no query, or the query `base:`, names it too).
    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // Whatever happens next, an earlier selection no longer holds.
            self.allocation_for = None;
        }
        if !self.structured {
            return cont(option_error(
                option,
                REP_ERR_INVALID,
                "meta contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first",
            ));
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return cont(option_error(
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_*_META_CONTEXT data",
            ));
        };
        let export = match self.resolve_for(option, &name, catalog) {
            Ok(e) => e,
            Err(refusal) => return refusal,
        };
        let chosen = if queries.is_empty() {
            !set
        } else {
            queries
                .iter()
                .any(|q| q == META_BASE_ALLOCATION || (!set && q == "base:"))
        };
        let mut reply = Vec::new();
        if chosen {
            // A LIST's replies carry context id 0; a SET's the id requests will name.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            reply.extend(option_reply(option, REP_META_CONTEXT, &d));
        }
        reply.extend(option_reply(option, REP_ACK, &[]));
        if set && chosen {
            self.allocation_for = Some(export.name);
        }
        cont(reply)
    }

    fn starttls(&mut self, data: &[u8]) -> OptionOutcome {
        let option = OPT_STARTTLS;
        if self.tls == TlsPolicy::Off {
            return cont(option_error(
                option,
                REP_ERR_POLICY,
                "TLS is not offered by this server",
            ));
        }
        if !data.is_empty() {
            return cont(option_error(
                option,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            ));
        }
        if self.encrypted {
            return cont(option_error(
                option,
                REP_ERR_INVALID,
                "TLS is already on for this connection",
            ));
        }
        OptionOutcome::StartTls {
            reply: option_reply(option, REP_ACK, &[]),
        }
    }

    /// `resolve`, or the NBD_REP_ERR_UNKNOWN reply to `option` that names the export.
    fn resolve_for(
        &self,
        option: u32,
        name: &str,
        catalog: &dyn ExportCatalog,
    ) -> Result<ExportInfo, OptionOutcome> {
        self.resolve(name, catalog).ok_or_else(|| {
            cont(option_error(
                option,
                REP_ERR_UNKNOWN,
                &format!("unknown export {name:?}"),
            ))
        })
    }

    fn resolve(&self, name: &str, catalog: &dyn ExportCatalog) -> Option<ExportInfo> {
        if name.is_empty() {
            return catalog.default_export().and_then(|n| catalog.lookup(&n));
        }
        catalog.lookup(name)
    }

    fn export_name(&mut self, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
        let Ok(name) = std::str::from_utf8(data) else {
            return OptionOutcome::Close {
                reason: "export name is not UTF-8".into(),
            };
        };
        let Some(export) = self.resolve(name, catalog) else {
            return OptionOutcome::Close {
                reason: format!("unknown export {name:?}"),
            };
        };
        let mut reply = Vec::with_capacity(134);
        reply.extend_from_slice(&export.size_bytes.to_be_bytes());
        reply.extend_from_slice(&export.transmission_flags().to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        // NBD_OPT_EXPORT_NAME predates structured replies being usable with it only
        // if negotiated earlier, which is allowed; keep what was negotiated.
        OptionOutcome::Transmission {
            reply,
            export,
            structured: self.structured,
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
        let Some((name, requests)) = parse_info_request(data) else {
            return cont(option_error(
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO data",
            ));
        };
        let export = match self.resolve_for(option, &name, catalog) {
            Ok(e) => e,
            Err(refusal) => return refusal,
        };
        let mut reply = Vec::new();
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size_bytes.to_be_bytes());
        info.extend_from_slice(&export.transmission_flags().to_be_bytes());
        reply.extend(option_reply(option, REP_INFO, &info));
        // Block sizes are always sent: the minimum of 1 tells clients that any
        // alignment works, the preferred size that 4 KiB avoids read-modify-write.
        let mut bs = Vec::with_capacity(14);
        bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
        bs.extend_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
        bs.extend_from_slice(&PAYLOAD_MAX_BYTES.to_be_bytes());
        reply.extend(option_reply(option, REP_INFO, &bs));
        for r in requests {
            match r {
                INFO_NAME => {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply.extend(option_reply(option, REP_INFO, &d));
                }
                INFO_DESCRIPTION if !export.description.is_empty() => {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply.extend(option_reply(option, REP_INFO, &d));
                }
                _ => {} // Unknown or already-sent info requests are ignored, as the protocol allows.
            }
        }
        reply.extend(option_reply(option, REP_ACK, &[]));
        if option == OPT_GO {
            OptionOutcome::Transmission {
                reply,
                export,
                structured: self.structured,
            }
        } else {
            cont(reply)
        }
    }
}

fn cont(reply: Vec<u8>) -> OptionOutcome {
    OptionOutcome::Continue { reply }
}

/// An option's leading export name (u32 length, UTF-8 text) and what follows it.
fn parse_export_name(data: &[u8]) -> Option<(String, &[u8])> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > EXPORT_NAME_MAX_BYTES {
        return None;
    }
    let name = std::str::from_utf8(data.get(4..4 + name_len)?)
        .ok()?
        .to_string();
    Some((name, &data[4 + name_len..]))
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, u16s.
pub fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, rest) = parse_export_name(data)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let reqs = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, reqs))
}

/// Parses NBD_OPT_LIST/SET_META_CONTEXT data: u32 name length, name, u32 query count,
/// then each query as u32 length and text.
pub fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut rest) = parse_export_name(data)?;
    let count = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
    rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
        let q = std::str::from_utf8(rest.get(4..4usize.checked_add(len)?)?).ok()?;
        queries.push(q.to_string());
        rest = &rest[4 + len..];
    }
    rest.is_empty().then_some((name, queries))
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    /// A command this server does not implement; answered with EINVAL.
    Unknown(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Parses a 28-byte request header. A bad magic is fatal (the stream is lost).
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtocolError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic {
                expected: REQUEST_MAGIC as u64,
                found: magic as u64,
            });
        }
        let flags = u16::from_be_bytes([b[4], b[5]]);
        let ty = u16::from_be_bytes([b[6], b[7]]);
        let cookie = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(b[16..24].try_into().expect("8 bytes"));
        let length = u32::from_be_bytes(b[24..28].try_into().expect("4 bytes"));
        let command = match ty {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        };
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    pub fn no_hole(&self) -> bool {
        self.flags & CMD_FLAG_NO_HOLE != 0
    }

    /// Checks the request against the export; `Err` is the NBD error to reply with.
    /// Error codes follow proto.md "Error values": writes and write-zeroes beyond the
    /// end get ENOSPC, reads and trims EINVAL.
    pub fn validate(&self, export_size_bytes: u64, read_only: bool) -> Result<(), u32> {
        let known = match self.command {
            Command::Read | Command::Write => CMD_FLAG_FUA,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Trim | Command::Flush => CMD_FLAG_FUA,
            Command::BlockStatus => CMD_FLAG_REQ_ONE,
            Command::Disconnect => 0,
            Command::Unknown(_) => return Err(EINVAL),
        };
        if self.flags & !known != 0 {
            return Err(EINVAL);
        }
        let end = self.offset.checked_add(self.length as u64);
        let in_range = matches!(end, Some(e) if e <= export_size_bytes);
        match self.command {
            Command::Read => {
                if self.length > PAYLOAD_MAX_BYTES || !in_range {
                    return Err(EINVAL);
                }
            }
            Command::BlockStatus => {
                if self.length == 0 || !in_range {
                    return Err(EINVAL);
                }
            }
            Command::Write | Command::WriteZeroes | Command::Trim => {
                if read_only {
                    return Err(EPERM);
                }
                if !in_range {
                    return Err(if self.command == Command::Trim {
                        EINVAL
                    } else {
                        ENOSPC
                    });
                }
            }
            Command::Flush => {
                if self.offset != 0 || self.length != 0 {
                    return Err(EINVAL);
                }
            }
            Command::Disconnect | Command::Unknown(_) => {}
        }
        Ok(())
    }
}

/// Encodes a request header (used by tests and by the node's own clients).
pub fn encode_request(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// A simple reply header (16 bytes); read data, if any, follows it.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk_header(flags: u16, ty: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk: 20-byte chunk header plus
/// the 8-byte offset; `data_len` bytes of data follow.
pub fn structured_read_header(cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..20].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len + 8,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final NBD_REPLY_TYPE_ERROR chunk with a human-readable message.
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A final NBD_REPLY_TYPE_BLOCK_STATUS chunk for context `id`: each extent as its
/// length in bytes and its flags (`STATE_HOLE`, `STATE_ZERO`), in order from the
/// request's offset.
pub fn block_status_reply(cookie: u64, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = Vec::with_capacity(20 + len);
    v.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    v.extend_from_slice(&id.to_be_bytes());
    for (length, flags) in extents {
        v.extend_from_slice(&length.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// A final NBD_REPLY_TYPE_NONE chunk (success without data).
pub fn structured_done(cookie: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cat(Vec<ExportInfo>);
    impl ExportCatalog for Cat {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            self.0.iter().find(|e| e.name == name).cloned()
        }
        fn list(&self) -> Vec<ExportInfo> {
            self.0.clone()
        }
        fn default_export(&self) -> Option<String> {
            self.0.first().map(|e| e.name.clone())
        }
    }

    fn cat() -> Cat {
        Cat(vec![ExportInfo {
            name: "vol0".into(),
            size_bytes: 1 << 30,
            description: "test".into(),
            read_only: false,
            multi_conn: true,
        }])
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// Splits a stream of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(
                u64::from_be_bytes(b[0..8].try_into().unwrap()),
                OPT_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            out.push((opt, ty, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn continued(o: OptionOutcome) -> Vec<(u32, u32, Vec<u8>)> {
        match o {
            OptionOutcome::Continue { reply } => replies(&reply),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn base_allocation_meta_context() {
        let mut hs = Handshake::new(true);
        let set = meta_data("vol0", &[META_BASE_ALLOCATION]);
        // Only with structured replies.
        let r = continued(hs.handle(OPT_SET_META_CONTEXT, &set, &cat()));
        assert_eq!(r[0].1, REP_ERR_INVALID);
        hs.handle(OPT_STRUCTURED_REPLY, &[], &cat());
        // LIST with no query, or "base:", names it with id 0; other queries nothing.
        for q in [&[][..], &["base:"][..]] {
            let r = continued(hs.handle(OPT_LIST_META_CONTEXT, &meta_data("vol0", q), &cat()));
            let mut want = 0u32.to_be_bytes().to_vec();
            want.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            assert_eq!(
                r,
                vec![
                    (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, want),
                    (OPT_LIST_META_CONTEXT, REP_ACK, vec![])
                ]
            );
        }
        let r = continued(hs.handle(
            OPT_LIST_META_CONTEXT,
            &meta_data("vol0", &["qemu:dirty-bitmap:x"]),
            &cat(),
        ));
        assert_eq!(r, vec![(OPT_LIST_META_CONTEXT, REP_ACK, vec![])]);
        assert!(!hs.allocation_selected("vol0"), "LIST selects nothing");
        // SET selects it, for that export, under id 1.
        let r = continued(hs.handle(OPT_SET_META_CONTEXT, &set, &cat()));
        let mut want = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        want.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        assert_eq!(r[0], (OPT_SET_META_CONTEXT, REP_META_CONTEXT, want));
        assert!(hs.allocation_selected("vol0"));
        assert!(
            !hs.allocation_selected("other"),
            "only for the export named"
        );
        // A SET that selects nothing, unknown exports, malformed data: nothing selected.
        hs.handle(OPT_SET_META_CONTEXT, &meta_data("vol0", &[]), &cat());
        assert!(!hs.allocation_selected("vol0"));
        hs.handle(OPT_SET_META_CONTEXT, &set, &cat());
        let r = continued(hs.handle(
            OPT_SET_META_CONTEXT,
            &meta_data("nope", &[META_BASE_ALLOCATION]),
            &cat(),
        ));
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert!(!hs.allocation_selected("vol0"));
        let mut bad = set.clone();
        bad.push(0);
        for d in [&bad[..], &set[..set.len() - 1], &[0, 0, 0, 4, b'v'][..]] {
            let r = continued(hs.handle(OPT_SET_META_CONTEXT, d, &cat()));
            assert_eq!(r[0].1, REP_ERR_INVALID, "{d:?}");
        }
        let mut huge = meta_data("vol0", &[]);
        huge[8..12].copy_from_slice(&1u32.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&huge), None);
        // TLS starting forgets it.
        hs.handle(OPT_SET_META_CONTEXT, &set, &cat());
        hs.tls_started();
        assert!(!hs.allocation_selected("vol0"));
    }

    #[test]
    fn block_status_requests_and_replies() {
        let req = |flags, offset, length| {
            Request::parse(&encode_request(flags, CMD_BLOCK_STATUS, 9, offset, length)).unwrap()
        };
        assert_eq!(req(0, 0, 4096).command, Command::BlockStatus);
        assert_eq!(req(0, 0, 4096).payload_len(), 0);
        assert_eq!(
            req(CMD_FLAG_REQ_ONE, 1, 4096).validate(1 << 20, true),
            Ok(())
        );
        assert_eq!(req(0, 0, 0).validate(1 << 20, false), Err(EINVAL));
        assert_eq!(req(0, 1 << 20, 1).validate(1 << 20, false), Err(EINVAL));
        assert_eq!(
            req(CMD_FLAG_FUA, 0, 1).validate(1 << 20, false),
            Err(EINVAL)
        );
        let r = block_status_reply(
            9,
            BASE_ALLOCATION_ID,
            &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)],
        );
        assert_eq!(r.len(), 20 + 4 + 16);
        assert_eq!(&r[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([r[4], r[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(u32::from_be_bytes(r[16..20].try_into().unwrap()), 20);
        assert_eq!(
            u32::from_be_bytes(r[20..24].try_into().unwrap()),
            BASE_ALLOCATION_ID
        );
        assert_eq!(u32::from_be_bytes(r[24..28].try_into().unwrap()), 4096);
        assert_eq!(u32::from_be_bytes(r[28..32].try_into().unwrap()), 3);
    }

    #[test]
    fn greeting_and_client_flags() {
        let g = server_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(true));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(false));
        assert!(matches!(
            parse_client_flags([0, 0, 0, 0]),
            Err(ProtocolError::NotFixedNewstyle(0))
        ));
        assert!(matches!(
            parse_client_flags([0, 0, 0, 5]),
            Err(ProtocolError::UnknownClientFlags(5))
        ));
    }

    #[test]
    fn option_header_magic() {
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            OptionHeader::parse(&h),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 7
            })
        );
        h[0] = 0;
        assert!(matches!(
            OptionHeader::parse(&h),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn go_known_export_enters_transmission() {
        let mut hs = Handshake::new(true);
        let out = hs.handle(OPT_STRUCTURED_REPLY, &[], &cat());
        let OptionOutcome::Continue { reply } = out else {
            panic!()
        };
        assert_eq!(
            replies(&reply),
            vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]
        );
        let out = hs.handle(
            OPT_GO,
            &info_data("vol0", &[INFO_NAME, INFO_DESCRIPTION, 99]),
            &cat(),
        );
        let OptionOutcome::Transmission {
            reply,
            export,
            structured,
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(structured);
        assert_eq!(export.name, "vol0");
        let r = replies(&reply);
        assert_eq!(r.last().unwrap().1, REP_ACK);
        let infos: Vec<u16> = r
            .iter()
            .filter(|x| x.1 == REP_INFO)
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        assert_eq!(
            infos,
            vec![INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
        );
        let exp = &r[0].2;
        assert_eq!(u64::from_be_bytes(exp[2..10].try_into().unwrap()), 1 << 30);
        let flags = u16::from_be_bytes([exp[10], exp[11]]);
        assert_ne!(flags & TFLAG_SEND_FLUSH, 0);
        assert_ne!(flags & TFLAG_SEND_FUA, 0);
        assert_ne!(flags & TFLAG_SEND_TRIM, 0);
        assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);
        assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
        let bs = &r[1].2;
        assert_eq!(u32::from_be_bytes(bs[2..6].try_into().unwrap()), 1);
        assert_eq!(u32::from_be_bytes(bs[6..10].try_into().unwrap()), 4096);
    }

    #[test]
    fn info_does_not_enter_transmission_and_empty_name_is_default() {
        let mut hs = Handshake::new(true);
        let out = hs.handle(OPT_INFO, &info_data("", &[]), &cat());
        let OptionOutcome::Continue { reply } = out else {
            panic!()
        };
        assert_eq!(replies(&reply).last().unwrap().1, REP_ACK);
    }

    #[test]
    fn unknown_export_and_malformed_info() {
        let mut hs = Handshake::new(true);
        let OptionOutcome::Continue { reply } = hs.handle(OPT_GO, &info_data("nope", &[]), &cat())
        else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_UNKNOWN);
        let OptionOutcome::Continue { reply } = hs.handle(OPT_GO, &[0, 0, 0, 9, b'a'], &cat())
        else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        // Count says 2 requests but only one is present.
        let mut d = info_data("vol0", &[INFO_NAME]);
        let n = d.len();
        d[n - 3] = 2;
        let OptionOutcome::Continue { reply } = hs.handle(OPT_INFO, &d, &cat()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
    }

    fn first_reply_type(o: OptionOutcome) -> u32 {
        match o {
            OptionOutcome::Continue { reply } => replies(&reply)[0].1,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn tls_required_refuses_every_option_but_starttls_and_abort_in_the_clear() {
        let mut hs = Handshake::with_tls(false, TlsPolicy::Require);
        for opt in [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, 999] {
            assert_eq!(
                first_reply_type(hs.handle(opt, &[], &cat())),
                REP_ERR_TLS_REQD
            );
        }
        for opt in [OPT_INFO, OPT_GO] {
            let d = info_data("vol0", &[]);
            assert_eq!(
                first_reply_type(hs.handle(opt, &d, &cat())),
                REP_ERR_TLS_REQD
            );
        }
        assert!(!hs.structured);
        assert!(matches!(
            hs.handle(OPT_EXPORT_NAME, b"vol0", &cat()),
            OptionOutcome::Close { .. }
        ));
        assert_eq!(
            first_reply_type(hs.handle(OPT_STARTTLS, &[1], &cat())),
            REP_ERR_INVALID
        );
        let OptionOutcome::StartTls { reply } = hs.handle(OPT_STARTTLS, &[], &cat()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ACK);
        hs.tls_started();
        // Inside TLS: served, and a second STARTTLS is refused.
        assert_eq!(
            first_reply_type(hs.handle(OPT_STARTTLS, &[], &cat())),
            REP_ERR_INVALID
        );
        let d = info_data("vol0", &[]);
        assert!(matches!(
            hs.handle(OPT_GO, &d, &cat()),
            OptionOutcome::Transmission { .. }
        ));
        let mut hs = Handshake::with_tls(false, TlsPolicy::Require);
        assert!(matches!(
            hs.handle(OPT_ABORT, &[], &cat()),
            OptionOutcome::Abort { .. }
        ));
    }

    #[test]
    fn tls_offered_serves_the_clear_and_forgets_its_options_after_starttls() {
        let mut hs = Handshake::with_tls(false, TlsPolicy::On);
        assert_eq!(
            first_reply_type(hs.handle(OPT_STRUCTURED_REPLY, &[], &cat())),
            REP_ACK
        );
        assert!(hs.structured);
        assert!(matches!(
            hs.handle(OPT_STARTTLS, &[], &cat()),
            OptionOutcome::StartTls { .. }
        ));
        hs.tls_started();
        assert!(!hs.structured, "options from before TLS are forgotten");
        // Off: STARTTLS is refused and the clear goes on.
        let mut hs = Handshake::new(false);
        assert_eq!(
            first_reply_type(hs.handle(OPT_STARTTLS, &[], &cat())),
            REP_ERR_POLICY
        );
        assert!(matches!(
            hs.handle(OPT_EXPORT_NAME, b"vol0", &cat()),
            OptionOutcome::Transmission { .. }
        ));
    }

    #[test]
    fn list_abort_unknown_and_unsupported() {
        let mut hs = Handshake::new(false);
        let OptionOutcome::Continue { reply } = hs.handle(OPT_LIST, &[], &cat()) else {
            panic!()
        };
        let r = replies(&reply);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..8], b"vol0");
        assert_eq!(r[1].1, REP_ACK);
        let OptionOutcome::Continue { reply } = hs.handle(OPT_LIST, &[1], &cat()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        let OptionOutcome::Continue { reply } = hs.handle(OPT_STRUCTURED_REPLY, &[1], &cat())
        else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_INVALID);
        assert!(!hs.structured);
        for opt in [OPT_EXTENDED_HEADERS, 999] {
            let OptionOutcome::Continue { reply } = hs.handle(opt, &[], &cat()) else {
                panic!()
            };
            assert_eq!(replies(&reply)[0].1, REP_ERR_UNSUP);
        }
        let OptionOutcome::Continue { reply } = hs.handle(OPT_STARTTLS, &[], &cat()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ERR_POLICY);
        let OptionOutcome::Abort { reply } = hs.handle(OPT_ABORT, &[], &cat()) else {
            panic!()
        };
        assert_eq!(replies(&reply)[0].1, REP_ACK);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let mut hs = Handshake::new(false);
        let OptionOutcome::Transmission { reply, .. } = hs.handle(OPT_EXPORT_NAME, b"vol0", &cat())
        else {
            panic!()
        };
        assert_eq!(reply.len(), 8 + 2 + 124);
        let mut hs = Handshake::new(true);
        let OptionOutcome::Transmission {
            reply, structured, ..
        } = hs.handle(OPT_EXPORT_NAME, b"", &cat())
        else {
            panic!()
        };
        assert_eq!(reply.len(), 10);
        assert!(!structured);
        assert!(matches!(
            hs.handle(OPT_EXPORT_NAME, b"x", &cat()),
            OptionOutcome::Close { .. }
        ));
        assert!(matches!(
            hs.handle(OPT_EXPORT_NAME, &[0xff], &cat()),
            OptionOutcome::Close { .. }
        ));
    }

    #[test]
    fn request_parse_and_validate() {
        let size = 1u64 << 20;
        let r = Request::parse(&encode_request(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512)).unwrap();
        assert_eq!(r.command, Command::Write);
        assert!(r.fua());
        assert_eq!(r.payload_len(), 512);
        assert_eq!(r.validate(size, false), Ok(()));
        assert_eq!(r.validate(size, true), Err(EPERM));
        let mut bad = encode_request(0, CMD_READ, 1, 0, 1);
        bad[0] = 0;
        assert!(matches!(
            Request::parse(&bad),
            Err(ProtocolError::BadMagic { .. })
        ));
        let check = |flags, cmd, off, len| {
            Request::parse(&encode_request(flags, cmd, 1, off, len))
                .unwrap()
                .validate(size, false)
        };
        assert_eq!(check(0, CMD_READ, size - 512, 512), Ok(()));
        assert_eq!(check(0, CMD_READ, size - 512, 513), Err(EINVAL));
        assert_eq!(check(0, CMD_READ, u64::MAX, 2), Err(EINVAL));
        assert_eq!(check(0, CMD_READ, 0, PAYLOAD_MAX_BYTES + 1), Err(EINVAL));
        assert_eq!(check(0, CMD_WRITE, size, 1), Err(ENOSPC));
        assert_eq!(check(0, CMD_WRITE_ZEROES, size, 1), Err(ENOSPC));
        assert_eq!(check(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 4096), Ok(()));
        assert_eq!(check(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 4096), Err(EINVAL));
        assert_eq!(check(0, CMD_TRIM, size, 1), Err(EINVAL));
        assert_eq!(check(0, CMD_FLUSH, 0, 0), Ok(()));
        assert_eq!(check(0, CMD_FLUSH, 1, 0), Err(EINVAL));
        assert_eq!(check(0, 42, 0, 0), Err(EINVAL));
        assert_eq!(check(1 << 9, CMD_READ, 0, 1), Err(EINVAL));
        assert_eq!(check(0, CMD_DISC, 0, 0), Ok(()));
    }

    #[test]
    fn reply_encodings() {
        let s = simple_reply(0x1122, EIO);
        assert_eq!(
            u32::from_be_bytes(s[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(s[4..8].try_into().unwrap()), EIO);
        let h = structured_read_header(9, 4096, 512);
        assert_eq!(u16::from_be_bytes([h[4], h[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u32::from_be_bytes(h[16..20].try_into().unwrap()), 520);
        let e = structured_error(9, EIO, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(u16::from_be_bytes([e[6], e[7]]), REPLY_TYPE_ERROR);
        let d = structured_done(3);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), REPLY_TYPE_NONE);
    }
}
