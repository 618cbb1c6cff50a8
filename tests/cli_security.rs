//! Security review fixes (issue 13), checked through the real binary: low-order keys, keys never
//! echoed, file permissions, control characters from peers in the logs, per-key services.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;

use common::cli::*;
use holdfast::keys::Keypair;

/// The all-zero key: a low-order point, which every private key "matches".
const ZERO_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn server_args<'a>(keys: &'a Keys, authorized: &'a str) -> Vec<&'a str> {
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", s(&keys.server_key)];
    args.extend(["--authorized", authorized, "--service", "x=127.0.0.1:1"]);
    args
}

/// A low-order key is refused wherever a public key is read from text: `--server-key` inline
/// and as a file, and an allow-list line.
#[tokio::test]
async fn low_order_keys_are_refused_at_every_entry_point() {
    let keys = Keys::new("low-order");
    let server: SocketAddr = "127.0.0.1:9".parse().unwrap(); // refused before any connection
    let zero_pub = keys.dir.path("zero.pub");
    std::fs::write(&zero_pub, format!("{ZERO_KEY}\n")).unwrap();
    for server_key in [ZERO_KEY, s(&zero_pub)] {
        let mut args = keys.client_args("connect", server, "echo");
        let i = args.iter().position(|a| a == "--server-key").unwrap();
        args[i + 1] = server_key.to_string();
        let (st, _, err) = run(&strs(&args), b"").await;
        assert_error(st, &err, &["low-order key that anyone can impersonate", "holdfast keygen"]);
        assert!(!err.contains("cannot access"), "{err}");
    }
    let real = Keypair::generate().public;
    std::fs::write(&keys.authorized, format!("{real} alice\n{ZERO_KEY} anyone\n")).unwrap();
    let (st, _, err) = run(&server_args(&keys, s(&keys.authorized)), b"").await;
    assert_error(st, &err, &[s(&keys.authorized), "line 2", "low-order key that anyone can impersonate"]);
}
