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
mod nix_client;
mod ops;
mod pressure;
mod private_caches;
mod s3;
mod tenancy;
