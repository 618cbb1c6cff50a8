//! `holdfast connect` (one stream on stdin/stdout, the ssh ProxyCommand mode): request/response
//! round trips through its pipes, to compare with the same round trips through a `holdfast
//! client` forward in the same run.

use std::io;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::metrics::echo_rtt;
use super::paths::HoldfastKeys;
use super::{BIN, SERVICE_NAME};

/// Round trips of 64 B through a fresh `holdfast connect` to the server on `port`:
/// (p50, p99) in µs.
pub(crate) async fn rtt(keys: &HoldfastKeys, port: u16, samples: usize) -> io::Result<(f64, f64)> {
    let mut child = Command::new(&*BIN)
        .arg("-q")
        .arg("connect")
        .args(["--server", &format!("127.0.0.1:{port}"), "--service", SERVICE_NAME])
        .arg("--server-key")
        .arg(&keys.server_pub)
        .arg("--key")
        .arg(&keys.client_key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (Some(mut input), Some(mut output)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(io::Error::other("no pipes to holdfast connect"));
    };
    let times = echo_rtt(&mut output, &mut input, samples).await;
    drop(input);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    times
}
