//! Blocking work (store writes, flushes, file syncs) kept off the async threads: on a
//! thread of tokio's blocking pool, or inline on a simulated host (docs/simulator.md:
//! the simulated disk does not block, and a thread would make a simulated run depend
//! on the operating system's scheduling). Outside a simulation these are exactly
//! `tokio::task::spawn_blocking` and `block_in_place`.

use crate::net::in_simulation;

/// Runs `f` where it may block, and waits for it.
pub async fn blocking<T, F>(f: F) -> Result<T, tokio::task::JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if in_simulation() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

/// Starts `f` where it may block, without waiting for it.
pub fn detach_blocking<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    if in_simulation() {
        f();
        return;
    }
    drop(tokio::task::spawn_blocking(f));
}

/// Runs `f`, which may block, on this task's thread (tokio moves the other tasks off
/// it first).
pub fn block_in_place<T>(f: impl FnOnce() -> T) -> T {
    if in_simulation() {
        return f();
    }
    tokio::task::block_in_place(f)
}
