//! Client sessions' fence tokens at a primary: a forwarded write carries the token its
//! client connection was given, and runs only while no newer connection to the volume
//! has opened a session since (so a write of a connection that has gone cannot land
//! after one made by its successor).

use crate::cluster::Cluster;
use lazarus_rpc::msg::FenceToken;

impl Cluster {
    /// On the primary: the volume's fence token (`open`: a new client session, which
    /// stops every token handed out before from admitting writes).
    pub fn fence_token(&self, volume: &str, open: bool) -> FenceToken {
        let mut f = self.fences.lock();
        let n = f.entry(volume.to_string()).or_default();
        if open {
            *n += 1;
        }
        FenceToken {
            incarnation: self.incarnation(),
            fence: *n,
            epoch: self.effective(volume).map_or(0, |v| v.epoch),
        }
    }

    /// Whether a forwarded write with this token may run here now.
    pub fn fence_admits(&self, volume: &str, t: &FenceToken) -> bool {
        t.incarnation == self.incarnation()
            && t.fence >= self.fences.lock().get(volume).copied().unwrap_or(0)
            && self.effective(volume).is_some_and(|v| v.epoch == t.epoch)
    }
}
