//! Side-by-side tunnel benchmarks on loopback, all in one run: direct TCP, holdfast (the real
//! release binary: `holdfast client` forward -> `holdfast server` -> a local service), a plain
//! two-hop relay without encryption (two `socat -b 262144` hops), stunnel (TLS 1.3,
//! ChaCha20-Poly1305), spiped and `ssh -L` (aes128-gcm@openssh.com unless
//! `HOLDFAST_BENCH_SSH_CIPHER` names another). A tool that is not
//! installed is reported as skipped.
//!
//! ```text
//! cargo bench --bench tunnel
//! ```
//!
//! Environment (all optional):
//! - `HOLDFAST_BENCH_RUNS` rounds per metric (default 5); figures are medians over rounds, and
//!   every round measures every path back to back so that they share the machine's load.
//! - `HOLDFAST_BENCH_MIB` MiB per bulk transfer (default 256).
//! - `HOLDFAST_BENCH_PATHS` comma list among `direct,holdfast,holdfast-nomux,holdfast-chacha,socat,stunnel,spiped,ssh`
//!   (`holdfast-nomux` opens a session per connection, as before multiplexing; `holdfast-chacha` is holdfast with `--cipher chacha20-poly1305`, the cipher of the stunnel
//!   path; plain `holdfast` uses the default, AES-256-GCM on CPUs with AES instructions).
//! - `HOLDFAST_BENCH_METRICS` comma list among `tput,rtt,stdio,conn,streams,resume,hs,mem` (default all;
//!   `streams` is 8 concurrent downloads and one beside a stalled stream; `stdio` is the RTT through `holdfast connect`'s pipes, measured in the same rounds).
//!   Not in the default: `cpu`, one transfer of `HOLDFAST_BENCH_CPU_GIB` GiB (default 8) each way
//!   per path with the CPU time (utime + stime in `/proc`) of the path's client-side and
//!   server-side processes per byte moved, then the same per new connection (`HOLDFAST_BENCH_CONN`
//!   connections, at least 200, each with a one-byte echo); `delay`, round trips on a delayed path (see
//!   `tunnel/delay.rs`; `HOLDFAST_BENCH_DELAY_MS` one-way delay, default 25,
//!   `HOLDFAST_BENCH_DELAY_SAMPLES` samples of each measure, default 10).
//! - `HOLDFAST_BENCH_RESETS` resets in the resume test (default 60).
//! - `HOLDFAST_BENCH_BIN` the `holdfast` binary to run instead of this build's (to compare two
//!   builds in alternating runs).
//! - `HOLDFAST_BENCH_SESSIONS` idle sessions in the memory test (default 1000).
//!
//! See BENCHMARKS.md for the method and the results.
//!
//! Layout: this file reads the options and runs the rounds; `tunnel/paths.rs` starts each path,
//! `tunnel/service.rs` is the service behind them, `tunnel/metrics.rs`, `streams.rs` and
//! `stdio.rs` measure every path, `resume.rs`, `raw.rs` (handshake rate) and `memory.rs`
//! measure holdfast alone, and `report.rs` prints the tables.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use holdfast::keys::{load_private_key, load_public_key};
use tokio::net::TcpListener;

use memory::memory_test;
use metrics::{conn_echo, rtt, tput_down, tput_up};
use paths::{holdfast_keys, holdfast_server, setup_holdfast, setup_socat, setup_spiped, setup_stunnel};
use procs::{Setup, Tool};
use raw::{handshake_test, RawKeys};
use report::{PathStats, StdioStats};
use resume::resume_test;
use service::service;
use ssh::setup_ssh;
use util::{loadavg, loopback, s};

#[path = "tunnel/cpu.rs"]
mod cpu;
#[path = "tunnel/delay.rs"]
mod delay;
#[path = "tunnel/delay_relay.rs"]
mod delay_relay;
#[path = "tunnel/memory.rs"]
mod memory;
#[path = "tunnel/metrics.rs"]
mod metrics;
#[path = "tunnel/paths.rs"]
mod paths;
#[path = "tunnel/procs.rs"]
mod procs;
#[path = "tunnel/raw.rs"]
mod raw;
#[path = "tunnel/report.rs"]
mod report;
#[path = "tunnel/resume.rs"]
mod resume;
#[path = "tunnel/service.rs"]
mod service;
#[path = "tunnel/ssh.rs"]
mod ssh;
#[path = "tunnel/stdio.rs"]
mod stdio;
#[path = "tunnel/streams.rs"]
mod streams;
#[path = "tunnel/util.rs"]
mod util;

/// The release binary under test: this build's, or `HOLDFAST_BENCH_BIN` (to compare two builds
/// in alternating runs).
static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("HOLDFAST_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_holdfast").to_string())
});
/// The service name every holdfast path forwards to.
const SERVICE_NAME: &str = "bench";
/// Payload of the request/response test.
const MSG: usize = 64;

/// What to run, from the environment (see the crate docs).
struct Opts {
    /// Rounds per metric (`HOLDFAST_BENCH_RUNS`).
    runs: usize,
    /// Bytes per bulk transfer (`HOLDFAST_BENCH_MIB`).
    bytes: u64,
    /// Paths to measure, in order (`HOLDFAST_BENCH_PATHS`).
    paths: Vec<String>,
    /// Metrics to run (`HOLDFAST_BENCH_METRICS`).
    metrics: Vec<String>,
    /// Resets in the resume test (`HOLDFAST_BENCH_RESETS`).
    resets: usize,
    /// Idle sessions in the memory test (`HOLDFAST_BENCH_SESSIONS`).
    sessions: usize,
    /// Round trips per round (`HOLDFAST_BENCH_RTT`).
    rtt_samples: usize,
    /// New connections per round (`HOLDFAST_BENCH_CONN`).
    conn_samples: usize,
    /// GiB each way in the `cpu` metric (`HOLDFAST_BENCH_CPU_GIB`).
    cpu_gib: u64,
    /// Delay added each way in the `delay` metric, ms (`HOLDFAST_BENCH_DELAY_MS`).
    delay_ms: u64,
    /// Samples of each measure in the `delay` metric (`HOLDFAST_BENCH_DELAY_SAMPLES`).
    delay_samples: usize,
}

/// The variable `name` parsed, or `default` when unset or unparsable.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The comma list in `name`, or `default`.
fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name).unwrap_or_else(|_| default.to_string()).split(',').map(|s| s.trim().to_string()).collect()
}

impl Opts {
    /// Reads every `HOLDFAST_BENCH_*` variable, with its default.
    fn from_env() -> Self {
        Opts {
            runs: env_or("HOLDFAST_BENCH_RUNS", 5usize).max(1),
            bytes: env_or("HOLDFAST_BENCH_MIB", 256u64).max(1) << 20,
            paths: env_list(
                "HOLDFAST_BENCH_PATHS",
                "direct,holdfast,holdfast-nomux,holdfast-chacha,socat,stunnel,spiped,ssh",
            ),
            metrics: env_list("HOLDFAST_BENCH_METRICS", "tput,rtt,conn,streams,resume,hs,mem"),
            resets: env_or("HOLDFAST_BENCH_RESETS", 60usize).max(1),
            sessions: env_or("HOLDFAST_BENCH_SESSIONS", 1000usize).max(1),
            rtt_samples: env_or("HOLDFAST_BENCH_RTT", 5000usize).max(100),
            conn_samples: env_or("HOLDFAST_BENCH_CONN", 50usize).max(10),
            cpu_gib: env_or("HOLDFAST_BENCH_CPU_GIB", 8u64).max(1),
            delay_ms: env_or("HOLDFAST_BENCH_DELAY_MS", 25u64).max(1),
            delay_samples: env_or("HOLDFAST_BENCH_DELAY_SAMPLES", 10usize).max(1),
        }
    }

    /// Whether metric `m` was asked for.
    fn metric(&self, m: &str) -> bool {
        self.metrics.iter().any(|x| x == m)
    }
}

/// Builds the runtime and runs the benchmark.
fn main() {
    let opts = Opts::from_env();
    // One worker per CPU, set explicitly so that TOKIO_WORKER_THREADS (which the holdfast
    // processes inherit) changes only them.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().expect("runtime");
    rt.block_on(run(opts));
}

/// Starts the service and every path, runs the metrics and prints the report.
async fn run(opts: Opts) {
    let dir = std::env::temp_dir().join(format!("holdfast-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    report::header(&opts);
    let svc_l = TcpListener::bind("127.0.0.1:0").await.expect("service");
    let svc = svc_l.local_addr().expect("addr").port();
    tokio::spawn(service(svc_l));
    let keys = holdfast_keys(&dir).expect("holdfast keys");

    // Start every path.
    let mut tools: Vec<Tool> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for p in &opts.paths {
        let setup = match p.as_str() {
            "direct" => {
                Setup::Ready(Tool { name: "direct TCP", entry: loopback(svc), children: vec![], server_pid: None })
            }
            "holdfast" => setup_holdfast(&dir, &keys, svc, "holdfast", &[]).await,
            "holdfast-nomux" => setup_holdfast(&dir, &keys, svc, "holdfast --no-mux", &["--no-mux"]).await,
            "holdfast-chacha" => {
                setup_holdfast(&dir, &keys, svc, "holdfast ChaCha20", &["--cipher", "chacha20-poly1305"]).await
            }
            "socat" => setup_socat(&dir, svc).await,
            "stunnel" => setup_stunnel(&dir, svc).await,
            "spiped" => setup_spiped(&dir, svc).await,
            "ssh" => setup_ssh(&dir, svc).await,
            other => Setup::Skipped(format!("unknown path '{other}'")),
        };
        match setup {
            Setup::Ready(t) => tools.push(t),
            Setup::Skipped(why) => skipped.push((p.clone(), format!("skipped: {why}"))),
            Setup::Failed(why) => skipped.push((p.clone(), format!("FAILED to start: {why}"))),
        }
    }
    for (p, why) in &skipped {
        println!("{p}: {why}");
    }
    let mut stats: HashMap<&'static str, PathStats> = tools.iter().map(|t| (t.name, PathStats::default())).collect();
    let limit = Duration::from_secs(120);
    // `holdfast connect` (stdio) gets a server of its own, with the same settings as the path's.
    let mut stdio_server = None;
    if opts.metric("stdio") {
        match holdfast_server(&dir, &keys, svc, "stdio-server.log", &["-q"]).await {
            Ok((child, port)) => {
                stdio_server =
                    Some((Tool { name: "stdio", entry: loopback(port), children: vec![child], server_pid: None }, port))
            }
            Err(e) => println!("stdio: FAILED to start its server: {e}"),
        }
    }
    let mut stdio_stats = StdioStats::default();

    let rounds = if ["tput", "rtt", "conn", "streams", "stdio"].iter().any(|m| opts.metric(m)) { opts.runs } else { 0 };
    for round in 0..rounds {
        eprintln!("round {}/{} (load {})", round + 1, opts.runs, loadavg());
        if let Some((_, port)) = &stdio_server {
            match tokio::time::timeout(limit, stdio::rtt(&keys, *port, opts.rtt_samples)).await {
                Ok(Ok((a, b))) => {
                    stdio_stats.p50.push(a);
                    stdio_stats.p99.push(b);
                }
                Ok(Err(e)) => stdio_stats.errors.push(format!("{e}")),
                Err(_) => stdio_stats.errors.push(s("timed out")),
            }
        }
        // Alternate the order so that no path always runs first.
        let order: Vec<usize> =
            if round % 2 == 0 { (0..tools.len()).collect() } else { (0..tools.len()).rev().collect() };
        for &i in &order {
            let t = &tools[i];
            let st = stats.get_mut(t.name).expect("stats");
            if opts.metric("tput") {
                match tokio::time::timeout(limit, tput_up(t.entry, opts.bytes)).await {
                    Ok(Ok(v)) => st.up.push(v),
                    Ok(Err(e)) => st.errors.push(format!("up: {e}")),
                    Err(_) => st.errors.push(s("up: timed out")),
                }
                match tokio::time::timeout(limit, tput_down(t.entry, opts.bytes)).await {
                    Ok(Ok(v)) => st.down.push(v),
                    Ok(Err(e)) => st.errors.push(format!("down: {e}")),
                    Err(_) => st.errors.push(s("down: timed out")),
                }
            }
            if opts.metric("streams") {
                match tokio::time::timeout(limit, streams::tput_down_n(t.entry, opts.bytes, 8)).await {
                    Ok(Ok(v)) => st.down8.push(v),
                    Ok(Err(e)) => st.errors.push(format!("8 streams: {e}")),
                    Err(_) => st.errors.push(s("8 streams: timed out")),
                }
                match tokio::time::timeout(limit, streams::tput_down_beside_stalled(t.entry, opts.bytes)).await {
                    Ok(Ok(v)) => st.stalled.push(v),
                    Ok(Err(e)) => st.errors.push(format!("beside a stalled stream: {e}")),
                    Err(_) => st.errors.push(s("beside a stalled stream: timed out")),
                }
            }
            if opts.metric("rtt") {
                match tokio::time::timeout(limit, rtt(t.entry, opts.rtt_samples)).await {
                    Ok(Ok((a, b))) => {
                        st.rtt50.push(a);
                        st.rtt99.push(b);
                    }
                    Ok(Err(e)) => st.errors.push(format!("rtt: {e}")),
                    Err(_) => st.errors.push(s("rtt: timed out")),
                }
            }
            if opts.metric("conn") {
                // 60 ms apart: under the holdfast server's default per-source handshake rate
                // limit (20/s), and the same pace for every path.
                let pace = Duration::from_millis(60);
                match tokio::time::timeout(limit, conn_echo(t.entry, opts.conn_samples, pace)).await {
                    Ok(Ok((a, b))) => {
                        st.conn50.push(a);
                        st.conn90.push(b);
                    }
                    Ok(Err(e)) => st.errors.push(format!("conn: {e}")),
                    Err(_) => st.errors.push(s("conn: timed out")),
                }
            }
        }
    }

    let names: Vec<&'static str> = tools.iter().map(|t| t.name).collect();
    if ["tput", "rtt", "conn", "streams"].iter().any(|m| opts.metric(m)) {
        report::paths(&opts, &names, &stats, &skipped);
    }
    if stdio_server.is_some() {
        report::stdio(&names, &stats, &stdio_stats);
    }
    drop(stdio_server);
    if opts.metric("cpu") {
        let mut costs = Vec::new();
        for t in &tools {
            eprintln!("cpu: {} ({} GiB each way, load {})", t.name, opts.cpu_gib, loadavg());
            costs.extend(cpu::measure(t, opts.cpu_gib << 30).await);
        }
        cpu::report(&costs, opts.cpu_gib);
        // 60 ms apart, as the conn metric (a `--no-mux` path makes a session per connection).
        let n = opts.conn_samples.max(200);
        let mut rows = Vec::new();
        for t in &tools {
            eprintln!("cpu: {} ({n} new connections, load {})", t.name, loadavg());
            rows.extend(cpu::per_connection(t, n, Duration::from_millis(60)).await);
        }
        cpu::report_connections(&rows, n);
    }
    if opts.metric("delay") {
        eprintln!("delay: {} ms each way (load {})", opts.delay_ms, loadavg());
        let o = delay::DelayOpts {
            delay: Duration::from_millis(opts.delay_ms),
            samples: opts.delay_samples,
            paths: opts.paths.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(600), delay::run(&dir, &keys, svc, &o)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => println!("delay test FAILED: {e}"),
            Err(_) => println!("delay test timed out"),
        }
    }

    // holdfast-only metrics.
    let raw = Arc::new(RawKeys {
        client: load_private_key(&keys.client_key).expect("client key"),
        server: load_public_key(&keys.server_pub).expect("server key"),
    });
    let mut resume = None;
    if opts.metric("resume") {
        eprintln!("resume test ({} resets, load {})", opts.resets, loadavg());
        match tokio::time::timeout(Duration::from_secs(300), resume_test(&dir, &keys, svc, opts.resets)).await {
            Ok(Ok(r)) => resume = Some(r),
            Ok(Err(e)) => println!("resume test FAILED: {e}"),
            Err(_) => println!("resume test timed out"),
        }
    }
    let mut hs = None;
    if opts.metric("hs") {
        eprintln!("handshake rate (load {})", loadavg());
        match handshake_test(&dir, &keys, &raw, svc, opts.runs.min(3)).await {
            Ok(r) => hs = Some(r),
            Err(e) => println!("handshake test FAILED: {e}"),
        }
    }
    let mut mem = None;
    if opts.metric("mem") {
        eprintln!("memory test ({} idle sessions, load {})", opts.sessions, loadavg());
        let hf = tools.iter().find(|t| t.name == "holdfast");
        match memory_test(&dir, &keys, raw.clone(), svc, opts.sessions, hf).await {
            Ok(m) => mem = Some(m),
            Err(e) => println!("memory test FAILED: {e}"),
        }
    }

    report::holdfast_only(&opts, resume.as_ref(), hs, mem.as_ref());
    drop(tools);
    if std::env::var_os("HOLDFAST_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("logs kept in {}", dir.display());
    }
}
