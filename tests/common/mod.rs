#![allow(dead_code)]

pub mod chaos;
pub mod cli;
pub mod echo;
pub mod faults;
pub mod guard;
pub mod harness;
pub mod http;
pub mod low_order;
pub mod netns;
pub mod postgres;
pub mod procs;
pub mod raw;
pub mod sshboot;
pub mod sshd;
pub mod tunnel;
pub mod world;
