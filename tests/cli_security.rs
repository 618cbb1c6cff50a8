//! Security review fixes (issue 13), checked through the real binary: low-order keys, keys never
//! echoed, file permissions, control characters from peers in the logs, per-key services.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;

use common::cli::*;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use holdfast::keys::{self, Keypair};

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
        assert_error(st, &err, &["--server-key", "low-order key that anyone can impersonate", "holdfast keygen"]);
        assert!(!err.contains("cannot access"), "{err}");
    }
    let real = Keypair::generate().public;
    std::fs::write(&keys.authorized, format!("{real} alice\n{ZERO_KEY} anyone\n")).unwrap();
    let (st, _, err) = run(&server_args(&keys, s(&keys.authorized)), b"").await;
    assert_error(st, &err, &[s(&keys.authorized), "line 2", "low-order key that anyone can impersonate"]);
}

/// A closed port: the key checks come before any connection.
fn nowhere() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

/// `holdfast connect` with `flag` set to `value` instead of the working one.
async fn connect_with(keys: &Keys, flag: &str, value: &str) -> (std::process::ExitStatus, String) {
    let mut args = keys.client_args("connect", nowhere(), "echo");
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.to_string();
    let (st, _, err) = run(&strs(&args), b"").await;
    (st, err)
}

/// `holdfast server` with its `--key` set to `key`.
async fn server_with_key(keys: &Keys, key: &Path) -> (std::process::ExitStatus, String) {
    let (st, _, err) = run(
        &server_args(keys, s(&keys.authorized))
            .iter()
            .map(|a| if *a == s(&keys.server_key) { s(key) } else { a })
            .collect::<Vec<_>>(),
        b"",
    )
    .await;
    (st, err)
}

/// A private key given as `--key` itself (not a file) is never echoed, on the client or the
/// server: the message says that `--key` takes a file path.
#[tokio::test]
async fn a_key_given_as_key_is_never_echoed() {
    let keys = Keys::new("echo-key");
    let secret = Keypair::generate().private.to_base64();
    let unpadded = secret.trim_end_matches('=').to_string();
    for given in [secret.to_string(), unpadded] {
        let (st, err) = connect_with(&keys, "--key", &given).await;
        assert_error(
            st,
            &err,
            &["--key takes the path of a private key file", "must not be given on the command line"],
        );
        assert!(!err.contains(&given[..12]) && !err.contains(&given[20..32]), "the key was echoed:\n{err}");
        let mut args = server_args(&keys, s(&keys.authorized));
        let i = args.iter().position(|a| *a == "--key").unwrap();
        args[i + 1] = &given;
        let (st, _, err) = run(&args, b"").await;
        assert_error(st, &err, &["--key takes the path of a private key file"]);
        assert!(!err.contains(&given[..12]), "the server echoed the key:\n{err}");
    }
}

/// A public key given as `--key` (a `.pub` file, or a file holding the same key as its `.pub`
/// sibling) is refused on the client and the server, even with mode 0600; before, it was used
/// as a private key.
#[tokio::test]
async fn a_public_key_given_as_key_is_refused() {
    let keys = Keys::new("pub-as-key");
    std::fs::set_permissions(&keys.server_pub, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server_key = s(&keys.server_key).to_string();
    let (st, err) = connect_with(&keys, "--key", s(&keys.server_pub)).await;
    let want = format!("this is a public key; --key takes the private key file ({server_key})");
    assert_error(st, &err, &[&format!("--key {}", s(&keys.server_pub)), &want]);
    let (st, err) = server_with_key(&keys, &keys.server_pub).await;
    assert_error(st, &err, &[&want]);

    // laptop.key holds the key of laptop.pub (copied over by mistake).
    let public = Keypair::generate().public;
    let (laptop_key, laptop_pub) = (keys.dir.path("laptop.key"), keys.dir.path("laptop.pub"));
    keys::save_public_key(&laptop_pub, &public).unwrap();
    std::fs::write(&laptop_key, format!("{public}\n")).unwrap();
    std::fs::set_permissions(&laptop_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let same = format!("this is a public key (the same as {}); --key takes the private key file", s(&laptop_pub));
    let (st, err) = connect_with(&keys, "--key", s(&laptop_key)).await;
    assert_error(st, &err, &[&same]);
    let (st, err) = server_with_key(&keys, &laptop_key).await;
    assert_error(st, &err, &[&same]);
}

/// Every file error starts with the flag the file came from.
#[tokio::test]
async fn file_errors_name_their_flag() {
    let keys = Keys::new("flags");
    let nope = keys.dir.path("nope");
    for flag in ["--key", "--server-key"] {
        let (st, err) = connect_with(&keys, flag, s(&nope)).await;
        assert_error(st, &err, &[&format!("{flag} {}: cannot read: no such file", s(&nope))]);
    }
    let (st, err) = server_with_key(&keys, &nope).await;
    assert_error(st, &err, &[&format!("--key {}: cannot read: no such file", s(&nope))]);
    let (st, _, err) = run(&server_args(&keys, s(&nope)), b"").await;
    assert_error(st, &err, &[&format!("--authorized {}: cannot read: no such file", s(&nope))]);
}
