//! The seams through which Lazarus's node and recovery server reach the outside world:
//! TCP connections (`net`), files (`fs`) and blocking work (`rt`). Each is the
//! operating system's, or, with the `sim` feature and when the caller runs on a
//! turmoil host, the deterministic simulator's (docs/simulator.md). One build serves
//! both: the choice is made at run time.
//!
//! This crate imports nothing of Lazarus; everything that does I/O imports it.

pub mod fs;
pub mod net;
pub mod rt;
