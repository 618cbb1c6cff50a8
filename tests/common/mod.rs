#![allow(dead_code)]

pub mod chaos;
pub mod harness;
pub mod low_order;
pub mod netns;
