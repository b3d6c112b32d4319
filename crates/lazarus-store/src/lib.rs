//! Lazarus's on-disk formats and the single-node block store: content-addressed
//! blocks, per-volume slice and checksum files, and the journal that keeps them
//! consistent across crashes. Layout and crash argument: `docs/format.md`.

pub mod blocks;
pub mod disk;
pub mod error;
mod id_table;
pub mod journal;
pub mod page_cache;
pub mod snapshot;
pub mod store;
pub mod volume;

pub use error::{ReadError, StoreError, WriteError};
pub use snapshot::Snapshot;
pub use store::{Locations, RecoveryReport, Store, StoreOptions};
pub use volume::{Allocation, Volume, VolumeMeta};
