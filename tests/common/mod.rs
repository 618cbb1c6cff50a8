#![allow(dead_code)]

pub mod chaos;
