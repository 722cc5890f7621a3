//! Test support: frames and captures that tests (here and in the lab
//! crate) feed to the parser and the kernel programs. Compiled for unit
//! tests and behind the `test-support` feature, never into the agent.

pub mod corpus;
pub mod pcap;
