//! CPU per byte (issue 22): one bulk transfer each way through a path, and the CPU time (user +
//! system, from `/proc/PID/stat`) that the path's client-side and server-side processes spent
//! on it, divided by the bytes moved.

use std::io;
use std::time::Duration;

use super::metrics::{tput_down, tput_up};
use super::procs::Tool;
use super::report::{fmt_opt, ratio};
use super::util::{err, tree_cpu_time};

/// What one transfer cost.
#[derive(Clone, Copy)]
pub(crate) struct Cost {
    /// Throughput of the transfer, Gbit/s.
    pub(crate) gbit: f64,
    /// CPU of the client-side processes, ns per byte moved.
    pub(crate) client: f64,
    /// CPU of the server-side processes, ns per byte moved.
    pub(crate) server: f64,
}

/// The cost of one path, each way.
pub(crate) struct PathCost {
    /// How the path is reported.
    pub(crate) name: &'static str,
    /// Uploading (program to service), or why not.
    pub(crate) up: Result<Cost, String>,
    /// Downloading, or why not.
    pub(crate) down: Result<Cost, String>,
}

/// Moves `bytes` up and then `bytes` down through `t`, one connection each; `None` when the
/// path has no processes of its own on both sides (direct TCP).
pub(crate) async fn measure(t: &Tool, bytes: u64) -> Option<PathCost> {
    let (client, server) = (t.client_pid()?, t.server_pid?);
    let one = |up: bool| async move {
        let run = async {
            let before = (tree_cpu_time(client), tree_cpu_time(server));
            let gbit = if up { tput_up(t.entry, bytes).await? } else { tput_down(t.entry, bytes).await? };
            // Let a helper forked for the connection (socat's) end and be reaped.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let after = (tree_cpu_time(client), tree_cpu_time(server));
            let per_byte = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
                (Some(a), Some(b)) => Ok(b.saturating_sub(a).as_nanos() as f64 / bytes as f64),
                _ => Err(err("no CPU time in /proc")),
            };
            Ok::<_, io::Error>(Cost {
                gbit,
                client: per_byte(before.0, after.0)?,
                server: per_byte(before.1, after.1)?,
            })
        };
        // Generous: 8 GiB at 0.2 Gbit/s.
        match tokio::time::timeout(Duration::from_secs(360).max(Duration::from_secs(bytes >> 27)), run).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        }
    };
    let up = one(true).await;
    let down = one(false).await;
    Some(PathCost { name: t.name, up, down })
}

/// Both ways together: the mean of up and down (each moved the same bytes).
fn both(c: &PathCost) -> Option<Cost> {
    let (u, d) = (c.up.as_ref().ok()?, c.down.as_ref().ok()?);
    Some(Cost {
        gbit: (u.gbit + d.gbit) / 2.0,
        client: (u.client + d.client) / 2.0,
        server: (u.server + d.server) / 2.0,
    })
}

/// The table of CPU per byte, and holdfast against `holdfast --no-mux` when both ran.
pub(crate) fn report(costs: &[PathCost], gib: u64) {
    println!("## CPU per byte (one transfer of {gib} GiB each way; utime + stime of each side's processes)");
    println!();
    println!(
        "| path | up Gbit/s | down Gbit/s | client ns/B up | client ns/B down | client ns/B both | server ns/B up | \
         server ns/B down | server ns/B both |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let f = |c: &Result<Cost, String>, pick: fn(&Cost) -> f64| fmt_opt(c.as_ref().ok().map(pick), 2);
    for c in costs {
        let b = both(c);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            f(&c.up, |c| c.gbit),
            f(&c.down, |c| c.gbit),
            f(&c.up, |c| c.client),
            f(&c.down, |c| c.client),
            fmt_opt(b.map(|b| b.client), 2),
            f(&c.up, |c| c.server),
            f(&c.down, |c| c.server),
            fmt_opt(b.map(|b| b.server), 2),
        );
    }
    println!();
    for c in costs {
        for (way, r) in [("up", &c.up), ("down", &c.down)] {
            if let Err(e) = r {
                println!("errors on {} (cpu, {way}): {e}", c.name);
            }
        }
    }
    let find = |n: &str| costs.iter().find(|c| c.name == n);
    if let (Some(hf), Some(nomux)) = (find("holdfast"), find("holdfast --no-mux")) {
        let r = |a: Option<f64>, b: Option<f64>| ratio(a, b);
        let (x, y) = (both(hf), both(nomux));
        println!(
            "holdfast against holdfast --no-mux (same run; < 1 means less CPU): client {} up, {} down, {} both; \
             server {} up, {} down, {} both",
            r(hf.up.as_ref().ok().map(|c| c.client), nomux.up.as_ref().ok().map(|c| c.client)),
            r(hf.down.as_ref().ok().map(|c| c.client), nomux.down.as_ref().ok().map(|c| c.client)),
            r(x.map(|c| c.client), y.map(|c| c.client)),
            r(hf.up.as_ref().ok().map(|c| c.server), nomux.up.as_ref().ok().map(|c| c.server)),
            r(hf.down.as_ref().ok().map(|c| c.server), nomux.down.as_ref().ok().map(|c| c.server)),
            r(x.map(|c| c.server), y.map(|c| c.server)),
        );
        println!();
    }
}

/// One path's CPU per new connection: its name, and (connect+echo p50 µs, client µs per
/// connection, server µs per connection) or why not.
pub(crate) type ConnCost = (&'static str, Result<(f64, f64, f64), String>);

/// CPU per new connection: `n` connections through `t`, one after another (each a one-byte
/// echo, `pace` apart), and the CPU time its client-side and server-side processes spent, in
/// µs per connection; `None` for a path without processes on both sides.
pub(crate) async fn per_connection(
    t: &Tool,
    n: usize,
    pace: Duration,
) -> Option<(&'static str, Result<(f64, f64, f64), String>)> {
    let (client, server) = (t.client_pid()?, t.server_pid?);
    let run = async {
        let before = (tree_cpu_time(client), tree_cpu_time(server));
        let (p50, _) = super::metrics::conn_echo(t.entry, n, pace).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = (tree_cpu_time(client), tree_cpu_time(server));
        let per = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Ok(b.saturating_sub(a).as_nanos() as f64 / 1e3 / n as f64),
            _ => Err(err("no CPU time in /proc")),
        };
        Ok::<_, io::Error>((p50, per(before.0, after.0)?, per(before.1, after.1)?))
    };
    let r = match tokio::time::timeout(Duration::from_secs(600), run).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    };
    Some((t.name, r))
}

/// The table of CPU per new connection.
pub(crate) fn report_connections(rows: &[ConnCost], n: usize) {
    println!("## CPU per new connection ({n} connections, each with a one-byte echo; utime + stime of each side's processes)");
    println!();
    println!("| path | connect+echo p50 µs | client µs per connection | server µs per connection |");
    println!("|---|---:|---:|---:|");
    for (name, r) in rows {
        match r {
            Ok((p50, c, s)) => println!("| {name} | {p50:.0} | {c:.0} | {s:.0} |"),
            Err(e) => println!("| {name} | – | – | – |  (error: {e})"),
        }
    }
    println!();
}
