//! Integration tests of `ballast-storage` through its public API.

mod basics;
mod corruption;
mod support;
