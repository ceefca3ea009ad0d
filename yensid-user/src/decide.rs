//! Decisions and the state they are made from: the pure policy, the
//! registry of builders' live state, health probes, the policy hook and
//! the link watcher.

pub mod health;
pub mod hook;
pub mod link;
pub mod load;
pub mod local;
pub mod policy;
pub mod registry;
pub mod scrape;
