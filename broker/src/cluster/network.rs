//! The cluster's transport (placeholder until the network work lands).
#![allow(dead_code, unused)]
pub struct Network;
impl Network {
    pub fn new(_token: Option<String>) -> Network { Network }
}
