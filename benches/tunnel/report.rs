//! The report: per-path figures gathered over the rounds, and the tables printed from them.

use std::collections::HashMap;

use super::memory::MemResult;
use super::resume::ResumeResult;
use super::util::{loadavg, median, read_to_string, s};
use super::{Opts, MSG};

/// `v` with `prec` decimals, or a dash.
pub(crate) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => s("–"),
    }
}

/// `hf / other` as "1.23×", or a dash.
pub(crate) fn ratio(hf: Option<f64>, other: Option<f64>) -> String {
    match (hf, other) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}×", a / b),
        _ => s("–"),
    }
}

/// The figures of one path, one entry per round.
#[derive(Default)]
pub(crate) struct PathStats {
    /// Upload, Gbit/s.
    pub(crate) up: Vec<f64>,
    /// Download, Gbit/s.
    pub(crate) down: Vec<f64>,
    /// Round trip of 64 B, p50, µs.
    pub(crate) rtt50: Vec<f64>,
    /// Round trip of 64 B, p99, µs.
    pub(crate) rtt99: Vec<f64>,
    /// New connection + one-byte echo, p50, µs.
    pub(crate) conn50: Vec<f64>,
    /// New connection + one-byte echo, p90, µs.
    pub(crate) conn90: Vec<f64>,
    /// Eight downloads at once, total Gbit/s.
    pub(crate) down8: Vec<f64>,
    /// One download beside a stalled stream, Gbit/s.
    pub(crate) stalled: Vec<f64>,
    /// What went wrong, by metric.
    pub(crate) errors: Vec<String>,
}

/// Round trips through `holdfast connect`'s pipes, gathered over the rounds.
#[derive(Default)]
pub(crate) struct StdioStats {
    /// p50 of each round, µs.
    pub(crate) p50: Vec<f64>,
    /// p99 of each round, µs.
    pub(crate) p99: Vec<f64>,
    /// What went wrong in a round.
    pub(crate) errors: Vec<String>,
}

/// The title, the machine and the settings.
pub(crate) fn header(opts: &Opts) {
    let cpu = read_to_string("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("# holdfast tunnel benchmark");
    println!();
    println!(
        "machine: {nproc} CPUs, {cpu}, Linux {}; load average at start: {}",
        read_to_string("/proc/sys/kernel/osrelease").trim(),
        loadavg()
    );
    println!(
        "settings: {} rounds, {} MiB per transfer, {} round trips of {MSG} B, {} new connections per round",
        opts.runs,
        opts.bytes >> 20,
        opts.rtt_samples,
        opts.conn_samples
    );
    println!();
}

/// The tables of the metrics that run on every path, in the order `names` were started, then
/// the paths that did not start and the errors.
pub(crate) fn paths(
    opts: &Opts,
    names: &[&'static str],
    stats: &HashMap<&'static str, PathStats>,
    skipped: &[(String, String)],
) {
    let med = |name: &str, f: fn(&PathStats) -> &Vec<f64>| median(f(&stats[name]));
    println!("## All paths (medians of {} rounds)", opts.runs);
    println!();
    println!(
        "| path | up Gbit/s | down Gbit/s | RTT p50 µs | RTT p99 µs | connect+echo p50 µs | connect+echo p90 µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for n in names {
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} |",
            fmt_opt(med(n, |s| &s.up), 2),
            fmt_opt(med(n, |s| &s.down), 2),
            fmt_opt(med(n, |s| &s.rtt50), 0),
            fmt_opt(med(n, |s| &s.rtt99), 0),
            fmt_opt(med(n, |s| &s.conn50), 0),
            fmt_opt(med(n, |s| &s.conn90), 0),
        );
    }
    for (p, why) in skipped {
        println!("| {p} | {why} | | | | | |");
    }
    println!();
    if opts.metric("streams") {
        println!("## Many streams (medians of {} rounds)", opts.runs);
        println!();
        println!("| path | 1 stream down Gbit/s | 8 streams down, total Gbit/s | 1 stream down beside a stalled one, Gbit/s |");
        println!("|---|---:|---:|---:|");
        for n in names {
            let (one, eight, stalled) = (med(n, |s| &s.down), med(n, |s| &s.down8), med(n, |s| &s.stalled));
            println!("| {n} | {} | {} | {} |", fmt_opt(one, 2), fmt_opt(eight, 2), fmt_opt(stalled, 2));
        }
        println!();
    }
    if names.contains(&"holdfast") {
        println!("## holdfast relative to each path (same run; > 1 means holdfast is larger)");
        println!();
        println!("| vs | up | down | RTT p50 | RTT p99 | connect+echo p50 | connect+echo p90 |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for n in names.iter().filter(|n| **n != "holdfast") {
            let r = |f: fn(&PathStats) -> &Vec<f64>| ratio(med("holdfast", f), med(n, f));
            println!(
                "| {n} | {} | {} | {} | {} | {} | {} |",
                r(|s| &s.up),
                r(|s| &s.down),
                r(|s| &s.rtt50),
                r(|s| &s.rtt99),
                r(|s| &s.conn50),
                r(|s| &s.conn90)
            );
        }
        println!();
    }
    for n in names {
        let e = &stats[n].errors;
        if !e.is_empty() {
            println!("errors on {n}: {}", e.join("; "));
        }
    }
}

/// The line for `holdfast connect`, relative to the holdfast forward.
pub(crate) fn stdio(names: &[&'static str], stats: &HashMap<&'static str, PathStats>, st: &StdioStats) {
    let med = |name: &str, f: fn(&PathStats) -> &Vec<f64>| median(f(&stats[name]));
    let fwd = names.contains(&"holdfast").then(|| med("holdfast", |s| &s.rtt50)).flatten();
    println!(
        "holdfast connect (stdio pipes) RTT of {MSG} B: p50 {} µs, p99 {} µs; p50 relative to the holdfast \
             forward in the same rounds: {}",
        fmt_opt(median(&st.p50), 0),
        fmt_opt(median(&st.p99), 0),
        ratio(median(&st.p50), fwd)
    );
    if !st.errors.is_empty() {
        println!("errors on holdfast connect: {}", st.errors.join("; "));
    }
    println!();
}

/// The metrics of holdfast alone (resume, handshake rate, memory), then the load average.
pub(crate) fn holdfast_only(
    opts: &Opts,
    resume: Option<&ResumeResult>,
    hs: Option<(f64, f64)>,
    mem: Option<&MemResult>,
) {
    if resume.is_some() || hs.is_some() || mem.is_some() {
        println!("## holdfast only");
        println!();
    }
    if let Some(r) = resume {
        println!(
            "- resume after a reset mid-transfer ({} resets, {:.0} MiB downloaded meanwhile): reset to data \
             flowing again p50 {:.2} ms, p99 {:.2} ms; client-measured detection to resumed p50 {} ms",
            r.n,
            r.mib_during,
            r.p50_ms,
            r.p99_ms,
            fmt_opt(r.client_p50_ms, 2)
        );
        println!(
            "- bytes replayed per resume (both directions): median {}, max {}, total {}",
            r.replayed_median.map_or(s("–"), |v| v.to_string()),
            r.replayed_max.map_or(s("–"), |v| v.to_string()),
            r.replayed_total.map_or(s("–"), |v| v.to_string())
        );
    }
    if let Some((rate, cpu)) = hs {
        println!(
            "- handshakes per second (IK + key confirmation, 16 concurrent clients, median of {}): {rate:.0}/s; \
             server CPU per handshake {cpu:.0} µs (≈ {:.0}/s per core)",
            opts.runs.min(3),
            1e6 / cpu.max(1.0)
        );
    }
    if let Some(m) = mem {
        let per = |a: u64, b: u64, n: usize| (a.saturating_sub(b)) as f64 / n as f64;
        println!(
            "- server memory per idle session ({} sessions, each with its service connection): {:.1} KiB \
             (VmRSS {} → {} KiB); after all links dropped (detached sessions): {} KiB, {:.1} KiB per session",
            m.sessions,
            per(m.idle_kib, m.base_kib, m.sessions),
            m.base_kib,
            m.idle_kib,
            m.detached_kib,
            per(m.detached_kib, m.base_kib, m.sessions),
        );
        if m.busy_sessions > 0 {
            println!(
                "- server memory per busy session ({} sessions in bulk transfer, 4 up and 4 down): {:.0} KiB \
                 (VmRSS {} → peak {} KiB)",
                m.busy_sessions,
                per(m.busy_peak_kib, m.busy_base_kib, m.busy_sessions),
                m.busy_base_kib,
                m.busy_peak_kib
            );
        }
    }
    println!();
    println!("load average at end: {}", loadavg());
}
