//! The node's interfaces over rtnetlink: listing them with their counters,
//! watching link events, and which of them match the configured globs.

pub mod hops;
pub mod ifmatch;
pub mod link_dump;
pub mod links;
