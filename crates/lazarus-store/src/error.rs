//! Errors by operation family. Corruption found on disk is an error value that names
//! what was expected and what was found; it is never a panic.

use lazarus_types::Lba;
use std::io;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupted {what} in {path}: {detail}")]
    Corrupted {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    #[error("snapshot {0:?} does not exist")]
    NoSuchSnapshot(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no space left on device")]
    NoSpace,
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> StoreError {
        let path = path.into();
        if crate::disk::is_enospc(&source) {
            return StoreError::NoSpace;
        }
        StoreError::Io { path, source }
    }
}

/// Why a read could not return data. Every variant is answered with EIO to a client:
/// the store never hands out bytes it cannot prove.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("LBA {0:?} is in a damaged slice page and could not be recovered")]
    Unrecoverable(Lba),
    #[error("block for LBA {lba:?} is corrupt or missing (id {id})")]
    CorruptBlock {
        lba: Lba,
        id: String,
        block: lazarus_types::BlockId,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("no space left on device")]
    NoSpace,
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> WriteError {
        match e {
            StoreError::NoSpace => WriteError::NoSpace,
            other => WriteError::Store(other),
        }
    }
}
