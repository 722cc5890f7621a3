pub mod dhcp;
pub mod hop;
pub mod kernel;
pub mod tc;
pub mod tracepoints;
pub mod vhost;
