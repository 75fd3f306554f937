//! Integration tests of `ballast-storage` through its public API.

mod basics;
mod corruption;
mod dedupe;
mod faults;
mod growth;
mod limits;
mod model;
mod pool;
mod spare;
mod support;
