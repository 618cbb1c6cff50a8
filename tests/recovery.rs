//! The faults people actually have, with the default settings of both ends (issue 12): the
//! client's address changes, the path goes silent for seconds, a middlebox resets everything
//! for a while, the laptop sleeps. Same world as `tests/netns.rs` (client, router and server
//! namespaces, the real binary, a data app at each end, SHA-256 of both directions at the end).
//!
//! Each test writes its time to data flowing again both ways to stderr (`netns resume: …`) and
//! to `HOLDFAST_NETNS_RESULTS` when set; `BENCHMARKS.md` has the table. Nothing asserts a speed:
//! the assertions are on outcomes (bytes, hashes, that a race or a wake was seen, what the
//! server holds). Skips and `HOLDFAST_REQUIRE_NETNS` work as in `tests/netns.rs`.

mod common;

use std::time::Duration;

use common::netns::{app_main, ms, now_ns, Line};
use common::world::*;

/// Not a test: the data app that the tests run inside namespaces.
#[test]
#[ignore = "helper process of the netns tests (runs only when they start it)"]
fn netns_app() {
    if !app_main() {
        println!("netns_app: the netns tests' helper process; nothing to do on its own");
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("signal the client");
}

/// Roaming: the client's address is replaced by one in another subnet, with a new default
/// route. The client hears of it from the kernel (netlink) and resumes from the new address at
/// once, instead of waiting for the dead-peer time (15 s by default).
#[test]
fn roaming_with_default_timers() {
    let Some(mut w) = World::start("roaming_with_default_timers", "r1", Opts::defaults()) else {
        return;
    };
    sleep_ms(300);
    let ns_c = w.ns_c.clone();
    // t0 is taken as the last step (the new route) starts: the client may resume as soon as
    // the kernel has it, before the `ip` process that added it has even exited, so a t0 taken
    // afterwards could come after the resume. The figure therefore includes that step's time.
    let mut t0 = 0;
    for args in [
        &["addr", "del", "10.1.0.2/24", "dev", "hfc"][..],
        &["addr", "add", "10.1.7.2/24", "dev", "hfc"],
        &["route", "add", "default", "via", "10.1.7.1"],
    ] {
        t0 = now_ns();
        let r = w.lab.ip(&ns_c, args);
        w.check(r.is_ok(), &format!("roaming step failed: {r:?}"));
    }
    let r = w.resume_after(t0);
    record("default timers: roaming (new address and route)", r);
    let peers = w.server_peers();
    w.check(peers.iter().any(|p| p.starts_with("10.1.7.2:")), &format!("server peers after roaming: {peers:?}"));
    w.check(w.client.log.count("link suspect") >= 1, "the client did not suspect the link on the change");
    w.finish();
}

/// Silent outages of 1, 5 and 20 s with data flowing both ways: the client suspects the link
/// within about a second, keeps dialing on a 250 ms schedule, and data flows again right after
/// the path works (not at the kernel's next SYN retransmission).
#[test]
fn silent_outages_with_default_timers() {
    let Some(mut w) = World::start("silent_outages_with_default_timers", "r2", Opts::defaults()) else {
        return;
    };
    for secs in [1u64, 5, 20] {
        sleep_ms(400);
        let fault = now_ns();
        w.blackhole(true);
        sleep_ms(secs * 1000);
        let t0 = w.blackhole(false);
        let suspect = |l: &Line| l.at >= fault && l.text.contains("link suspect");
        let seen = w.client.log.lines().into_iter().find(suspect);
        w.check(seen.is_some(), &format!("{secs} s outage: the client never suspected the link"));
        let r = w.resume_after(t0);
        let noticed = seen.map_or(0.0, |l| ms(fault, l.at));
        eprintln!("netns recovery: {secs} s outage noticed (link suspect) after {noticed:.0} ms");
        record(&format!("default timers: silent outage {secs} s"), r);
        let more = w.wait_flow(now_ns(), 64 << 10, RESUME);
        w.check(more.is_some(), "data stopped after the resume");
    }
    w.finish();
}

/// A 60 s silent outage (a benchmark: over a minute; `cargo test --release --test recovery --
/// --ignored outage_60s`).
#[test]
#[ignore = "a minute long; run for BENCHMARKS.md"]
fn outage_60s_with_default_timers() {
    let Some(mut w) = World::start("outage_60s_with_default_timers", "r7", Opts::defaults()) else {
        return;
    };
    sleep_ms(400);
    w.blackhole(true);
    sleep_ms(60_000);
    let t0 = w.blackhole(false);
    let r = w.resume_after(t0);
    record("default timers: silent outage 60 s", r);
    w.finish();
}

/// A middlebox resets every tunnel packet for 2 s: connection attempts are refused, and the
/// client retries on the short schedule for the first seconds instead of backing off.
#[test]
fn reset_storm_2s_with_default_timers() {
    let Some(mut w) = World::start("reset_storm_2s_with_default_timers", "r3", Opts::defaults()) else {
        return;
    };
    sleep_ms(300);
    let fault = now_ns();
    w.reject(true);
    sleep_ms(2000);
    let t0 = w.reject(false);
    w.lost_at(fault, Duration::ZERO);
    let r = w.resume_after(t0);
    record("default timers: resets for 2 s", r);
    w.finish();
}

/// A suspend, simulated: the client process is frozen (SIGSTOP) while the path drops everything,
/// and its boot clock is moved on by the frozen time (`HOLDFAST_TEST_SUSPEND_FILE`), which is
/// what a real suspend does to `CLOCK_BOOTTIME` and not to `CLOCK_MONOTONIC`. On waking, the
/// client notices the jump and resumes at once.
#[test]
fn wake_from_sleep_with_default_timers() {
    let lab_file = std::env::temp_dir().join(format!("holdfast-suspend-{}", std::process::id()));
    std::fs::write(&lab_file, "0").expect("suspend file");
    let mut opts = Opts::defaults();
    opts.client_env.push(("HOLDFAST_TEST_SUSPEND_FILE", lab_file.to_string_lossy().into_owned()));
    let Some(mut w) = World::start("wake_from_sleep_with_default_timers", "r4", opts) else {
        let _ = std::fs::remove_file(&lab_file);
        return;
    };
    sleep_ms(300);
    w.blackhole(true);
    signal(w.client.pid, rustix::process::Signal::STOP);
    // While "asleep" the server's end dies: its socket is destroyed (a reset the client never
    // sees, since the path drops it).
    sleep_ms(3000);
    w.kill_sockets(false);
    std::fs::write(&lab_file, (30u64 * 1_000_000_000).to_string()).expect("suspend file");
    w.blackhole(false);
    let t0 = now_ns();
    signal(w.client.pid, rustix::process::Signal::CONT);
    let r = w.resume_after(t0);
    record("default timers: wake from a 3 s freeze (30 s of simulated sleep)", r);
    w.finish();
    let _ = std::fs::remove_file(&lab_file);
}

/// A sleep longer than the server keeps a detached session: on waking, the client learns at
/// once that the session is lost and says so, instead of retrying for the give-up time.
#[test]
fn wake_after_the_session_expired_reports_it_lost() {
    let lab_file = std::env::temp_dir().join(format!("holdfast-suspend-x-{}", std::process::id()));
    std::fs::write(&lab_file, "0").expect("suspend file");
    let mut opts = Opts::defaults();
    opts.server_args = vec!["--session-expiry", "2s", "--dead-after", "1s", "--keepalive", "300ms"];
    opts.client_env.push(("HOLDFAST_TEST_SUSPEND_FILE", lab_file.to_string_lossy().into_owned()));
    let Some(mut w) = World::start("wake_after_the_session_expired_reports_it_lost", "r5", opts) else {
        let _ = std::fs::remove_file(&lab_file);
        return;
    };
    sleep_ms(300);
    w.blackhole(true);
    signal(w.client.pid, rustix::process::Signal::STOP);
    let gone = w.server.log.wait_line("session expired", 0, Duration::from_secs(20));
    w.check(gone.is_some(), "the server did not expire the session while the client slept");
    std::fs::write(&lab_file, (3600u64 * 1_000_000_000).to_string()).expect("suspend file");
    w.blackhole(false);
    let t0 = now_ns();
    signal(w.client.pid, rustix::process::Signal::CONT);
    let lost = w.client_line("session lost", t0, Duration::from_secs(10));
    w.check(lost.is_some(), "the client did not report the session lost after waking");
    let after = lost.map_or(0.0, |l| ms(t0, l.at));
    eprintln!("netns recovery: woke after the session expired; session lost reported after {after:.0} ms");
    record_ms("default timers: wake after expiry, session lost reported", after);
    let _ = std::fs::remove_file(&lab_file);
}

fn record_ms(kind: &str, v: f64) {
    record(kind, Resume { tunnel: v, data: v });
}
