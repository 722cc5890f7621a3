pub mod tc;
