//! The data path of one connection: SSH handoff, then kernel splice or
//! userspace copy.

pub mod admission;
pub mod handover;
pub mod ident;
pub mod proxy;
pub mod queue;
pub mod relay;
