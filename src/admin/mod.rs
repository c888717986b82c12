//! What `cache-admin` is made of besides its commands: the client of the admin API
//! (`client`) and what it prints and parses for people (`output`). In the library so
//! that they are tested like the rest.

pub mod client;
pub mod jobs;
pub mod output;
