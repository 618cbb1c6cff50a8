#![allow(dead_code)]

pub mod chaos;
pub mod cli;
pub mod harness;
pub mod netns;
