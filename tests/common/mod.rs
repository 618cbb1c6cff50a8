#![allow(dead_code)]

pub mod chaos;
pub mod harness;
pub mod netns;
