//! Integration tests: the real `cachet` binary on loopback ports, driven by the real
//! `nix` client and by raw HTTP. One test binary, modules by subject.

mod harness;

mod admin_cli;
mod bad_input;
mod crash;
mod flood;
mod garage;
mod gc;
mod golden;
mod hostile;
mod memory;
mod nix_client;
mod ops;
mod postgres;
mod pressure;
mod private_caches;
mod quota;
mod replicas;
mod s3;
mod space;
mod tenancy;
