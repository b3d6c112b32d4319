//! What a node tells its operator, as leaves that import nothing of the node: the event
//! timeline (`events`) and the Prometheus metrics (`metrics`). The node records into
//! them; the admin API and the dashboard read them.

pub mod events;
pub mod metrics;
