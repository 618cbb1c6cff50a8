//! The network-namespace world of the fault tests: a client, a router and a server namespace on
//! veth links, the real `holdfast` binary at both ends, and a data app at each end, with the
//! faults a router can make (see `tests/netns.rs` and `tests/recovery.rs`).

use std::io::Write;
use std::time::{Duration, Instant};

use super::netns::{ms, now_ns, preflight, run, skip, AppReport, AppSpec, Lab, Line, Proc};

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
pub const TIMERS: [&str; 4] = ["--keepalive", "200ms", "--dead-after", "1s"];
pub const PORT: &str = "7700";
pub const SERVER_IP: &str = "10.2.0.2";
/// Pace of each direction in the single-fault tests: slow enough that the apps' receive
/// buffers stay empty, so the first bytes after a fault mark the resume sharply.
pub const PACE: u64 = 16 << 20;
pub const START: Duration = Duration::from_secs(10);
pub const RESUME: Duration = Duration::from_secs(15);

/// The lab: client ns <-> router ns <-> server ns, on two veth links.
///
/// - client: `hfc` 10.1.0.2/24, default route via the router's 10.1.0.1;
/// - router: `hfr0` 10.1.0.1/24 and 10.1.7.1/24 (the subnet the client roams to), `hfr1`
///   10.2.0.1/24; forwards, and is where outages and resets happen (one atomic `nft` command
///   each, acting on both directions at once, like a broken or hostile middlebox);
/// - server: `hfs` 10.2.0.2/24, default route via 10.2.0.1, except with `nat`: then the router
///   masquerades the client and the server has no route back to the client's subnet at all.
pub struct Opts {
    pub nat: bool,
    pub rate: u64,
    pub client_args: Vec<&'static str>,
    pub server_args: Vec<&'static str>,
    pub tools: Vec<&'static str>,
    /// Short timers ([`TIMERS`]) on both ends; `false` runs with the defaults.
    pub fast: bool,
    /// Extra environment of the client process.
    pub client_env: Vec<(&'static str, String)>,
}

impl Opts {
    pub fn new() -> Opts {
        Opts {
            nat: false,
            rate: PACE,
            client_args: vec![],
            server_args: vec![],
            tools: vec!["ss"],
            fast: true,
            client_env: vec![],
        }
    }

    /// The defaults of both ends: no timer is shortened.
    pub fn defaults() -> Opts {
        Opts { fast: false, ..Opts::new() }
    }
}

/// Time to resume after one fault, in ms from the moment the network was usable again.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    /// Until the client logged the resume (the handshake on the new connection completed).
    pub tunnel: f64,
    /// Until new bytes reached the apps in both directions.
    pub data: f64,
}

pub fn record(kind: &str, r: Resume) {
    let line = format!("netns resume: {kind}: tunnel {:.1} ms, data both ways {:.1} ms", r.tunnel, r.data);
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Ok(path) = std::env::var("HOLDFAST_NETNS_RESULTS") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{kind}\t{:.1}\t{:.1}", r.tunnel, r.data);
        }
    }
}

/// A running tunnel between two namespaces, with an app at each end. Fields drop in order:
/// processes first, the lab (namespaces) last.
pub struct World {
    pub app_c: Proc,
    pub app_s: Proc,
    pub client: Proc,
    pub server: Proc,
    pub server_cmd: Vec<String>,
    pub ns_c: String,
    pub ns_s: String,
    pub ns_r: String,
    pub name: &'static str,
    pub lab: Lab,
}

impl World {
    /// Builds the lab and starts everything, or prints why it cannot run and returns `None`.
    pub fn start(name: &'static str, tag: &str, opts: Opts) -> Option<World> {
        if let Err(reason) = preflight(&opts.tools) {
            skip(name, &reason);
            return None;
        }
        let mut lab = Lab::new(tag).expect("lab scratch directory");
        let ns_c = match lab.netns("c") {
            Ok(n) => n,
            Err(e) => {
                skip(name, &format!("cannot create a network namespace: {e}"));
                return None;
            }
        };
        let ns_s = lab.netns("s").expect("second namespace");
        fn setup<T>(r: Result<T, String>) -> T {
            r.unwrap_or_else(|e| panic!("lab set-up failed: {e}"))
        }
        let ns_r = setup(lab.netns("r"));
        setup(lab.veth(&ns_c, "hfc", &ns_r, "hfr0"));
        setup(lab.veth(&ns_r, "hfr1", &ns_s, "hfs"));
        setup(lab.ip(&ns_c, &["addr", "add", "10.1.0.2/24", "dev", "hfc"]));
        setup(lab.ip(&ns_c, &["route", "add", "default", "via", "10.1.0.1"]));
        setup(lab.ip(&ns_r, &["addr", "add", "10.1.0.1/24", "dev", "hfr0"]));
        setup(lab.ip(&ns_r, &["addr", "add", "10.1.7.1/24", "dev", "hfr0"]));
        setup(lab.ip(&ns_r, &["addr", "add", "10.2.0.1/24", "dev", "hfr1"]));
        setup(lab.ip(&ns_s, &["addr", "add", "10.2.0.2/24", "dev", "hfs"]));
        setup(lab.sysctl(&ns_r, "net/ipv4/ip_forward", "1"));
        if opts.nat {
            setup(lab.nft(&ns_r, &nat_rules("20000-20999")));
        } else {
            setup(lab.ip(&ns_s, &["route", "add", "default", "via", "10.2.0.1"]));
        }

        // Keys, made by the binary itself.
        let dir = lab.dir.clone();
        let (skey, ckey) = (dir.join("server"), dir.join("client"));
        setup(run(BIN, &["keygen", "--out", &skey.to_string_lossy()]));
        let client_pub = setup(run(BIN, &["keygen", "--out", &ckey.to_string_lossy()]));
        std::fs::write(dir.join("authorized"), format!("{} netns-client\n", client_pub.trim())).expect("allow-list");

        let app_s =
            AppSpec { mode: "listen:127.0.0.1:9000".into(), seed: 2, rate: opts.rate }.spawn(&lab, &ns_s, "app-s");
        if app_s.log.wait_line("HF listening", 0, START).is_none() {
            panic!("{name}: the server-side app did not start:\n{}", app_s.tail(20));
        }

        let listen = format!("{SERVER_IP}:{PORT}");
        let mut server_cmd: Vec<String> =
            ["server", "--listen", &listen, "--service", "data=127.0.0.1:9000"].iter().map(|s| s.to_string()).collect();
        for (flag, path) in [("--key", dir.join("server.key")), ("--authorized", dir.join("authorized"))] {
            server_cmd.push(flag.into());
            server_cmd.push(path.to_string_lossy().into_owned());
        }
        let timers: &[&str] = if opts.fast { &TIMERS } else { &[] };
        server_cmd.extend(timers.iter().chain(&opts.server_args).map(|s| s.to_string()));
        let server = spawn_server(&lab, &ns_s, &server_cmd, name);

        let mut client_cmd: Vec<String> =
            ["client", "--server", &listen, "--local", "127.0.0.1:2000", "--service", "data", "--no-check"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        for (flag, path) in [("--server-key", dir.join("server.pub")), ("--key", dir.join("client.key"))] {
            client_cmd.push(flag.into());
            client_cmd.push(path.to_string_lossy().into_owned());
        }
        client_cmd.extend(timers.iter().chain(&opts.client_args).map(|s| s.to_string()));
        let args: Vec<&str> = client_cmd.iter().map(String::as_str).collect();
        let client = lab.spawn(&ns_c, "client", BIN.as_ref(), &args, &opts.client_env);
        if client.log.wait_line("forwarding", 0, START).is_none() {
            panic!("{name}: holdfast client did not start:\n{}", client.tail(20));
        }

        let app_c =
            AppSpec { mode: "dial:127.0.0.1:2000".into(), seed: 1, rate: opts.rate }.spawn(&lab, &ns_c, "app-c");
        let w = World { app_c, app_s, client, server, server_cmd, ns_c, ns_s, ns_r, name, lab };
        let flowing = w.wait_flow(0, 256 << 10, START);
        w.check(flowing.is_some(), "data did not start flowing both ways");
        Some(w)
    }

    pub fn procs(&self) -> [&Proc; 4] {
        [&self.client, &self.server, &self.app_c, &self.app_s]
    }

    pub fn diag(&self) -> String {
        let mut s = String::new();
        for p in self.procs() {
            s += &p.tail(40);
        }
        let apps = [("app-c", self.app_c.log.app()), ("app-s", self.app_s.log.app())];
        for (label, a) in apps {
            s += &format!(
                "  [{label}] received {} sent {} rx_done {:?} rx_err {:?} tx_done {:?} tx_err {:?}\n",
                a.received(),
                a.sent,
                a.rx_done,
                a.rx_err,
                a.tx_done,
                a.tx_err
            );
        }
        s
    }

    #[track_caller]
    pub fn check(&self, ok: bool, what: &str) {
        if !ok {
            panic!("{}: {what}\n{}", self.name, self.diag());
        }
    }

    /// Waits until both apps have received at least `min` bytes at or after time `after`;
    /// returns the later of the two first such receipts.
    pub fn wait_flow(&self, after: u64, min: u64, timeout: Duration) -> Option<u64> {
        let mut first = [None, None];
        let deadline = Instant::now() + timeout;
        for (i, app) in [&self.app_c, &self.app_s].iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            first[i] = app.log.wait(left, |_, a: &AppReport| {
                let (t, base) = a.first_receipt_after(after)?;
                (a.received() >= base + min || min == 0).then_some(t)
            });
        }
        Some(first[0]?.max(first[1]?))
    }

    /// The first client log line containing `needle` at or after `after`.
    pub fn client_line(&self, needle: &str, after: u64, timeout: Duration) -> Option<Line> {
        self.client.log.wait_line(needle, after, timeout)
    }

    /// Measures the resume after a fault cleared at `t0`.
    pub fn resume_after(&self, t0: u64) -> Resume {
        let resumed = self.client_line("resumed", t0, RESUME);
        let resumed = resumed.unwrap_or_else(|| panic!("{}: no resume after the fault\n{}", self.name, self.diag()));
        let data = self.wait_flow(resumed.at.max(t0), 0, RESUME);
        self.check(data.is_some(), "data did not flow again after the resume");
        Resume { tunnel: ms(t0, resumed.at), data: ms(t0, data.unwrap_or(0)) }
    }

    /// The time the client logged a link loss, or the suspicion that races a new connection, at
    /// or after `after`.
    pub fn lost_at(&self, after: u64, timeout: Duration) -> u64 {
        let lost = self.client.log.wait(timeout, |lines, _| {
            lines
                .iter()
                .find(|l| l.at >= after && (l.text.contains("link lost") || l.text.contains("link suspect")))
                .map(|l| l.at)
        });
        self.check(lost.is_some(), "the client did not notice the fault");
        lost.unwrap_or(0)
    }

    pub fn nft(&mut self, ns: &str, script: &str) {
        let r = self.lab.nft(ns, script);
        self.check(r.is_ok(), &format!("nft failed: {r:?}"));
    }

    /// Installs (`Some`) or removes (`None`) the router's fault rules, in one atomic `nft`
    /// command. Returns when the command started: when removing, the network is usable again
    /// at some moment during the command, so times measured from its start are upper bounds.
    pub fn router_fault(&mut self, rules: Option<&str>) -> u64 {
        let started = now_ns();
        let ns_r = self.ns_r.clone();
        match rules {
            Some(r) => {
                let script = format!(
                    "table inet hffault {{\n chain faults {{\n  type filter hook forward priority -10\n  {r}\n }}\n}}\n"
                );
                self.nft(&ns_r, &script)
            }
            None => {
                let r = self.lab.exec(&ns_r, &["nft", "delete", "table", "inet", "hffault"]);
                self.check(r.is_ok(), &format!("nft failed: {r:?}"));
            }
        }
        started
    }

    /// Silent outage: the router drops every packet, both ways. No end sees any error.
    pub fn blackhole(&mut self, on: bool) -> u64 {
        self.router_fault(on.then_some("drop"))
    }

    /// Resets: the router answers every tunnel packet (except resets) with a TCP reset, both
    /// ways, as a hostile middlebox would.
    pub fn reject(&mut self, on: bool) -> u64 {
        self.router_fault(on.then_some("tcp flags & rst == 0 reject with tcp reset"))
    }

    /// `ss -K` on the tunnel's real sockets at one end; returns how many it killed.
    pub fn kill_sockets(&self, client_side: bool) -> usize {
        let dport = format!(":{PORT}");
        let r = if client_side {
            self.lab.exec(&self.ns_c, &["ss", "-K", "-tn", "dst", SERVER_IP, "dport", "=", &dport])
        } else {
            self.lab.exec(&self.ns_s, &["ss", "-K", "-tn", "state", "established", "sport", "=", &dport])
        };
        let out = r.unwrap_or_else(|e| panic!("{}: ss -K failed: {e}", self.name));
        out.lines().filter(|l| l.contains(PORT)).count()
    }

    /// The peers of the server's established tunnel connections.
    pub fn server_peers(&self) -> Vec<String> {
        let dport = format!(":{PORT}");
        let out = self.lab.exec(&self.ns_s, &["ss", "-Htn", "state", "established", "sport", "=", &dport]);
        out.unwrap_or_default().lines().filter_map(|l| l.split_whitespace().last().map(str::to_string)).collect()
    }

    /// Stops both apps' senders, waits for both directions to finish, and checks the hashes.
    /// Returns the bytes moved (up, down).
    pub fn finish(&mut self) -> (u64, u64) {
        let stop = now_ns();
        self.app_c.send("stop");
        self.app_s.send("stop");
        for app in [&self.app_c, &self.app_s] {
            let done = app.log.wait(Duration::from_secs(60), |_, a| a.finished().then_some(()));
            self.check(done.is_some(), "the transfer did not finish after the senders stopped");
        }
        let (c, s) = (self.app_c.log.app(), self.app_s.log.app());
        self.check(c.tx_err.is_none() && s.tx_err.is_none(), "a sender failed");
        self.check(c.rx_err.is_none() && s.rx_err.is_none(), "a receiver failed");
        let (up_tx, up_rx) = (c.tx_done.clone().unwrap_or_default(), s.rx_done.clone().unwrap_or_default());
        let (dn_tx, dn_rx) = (s.tx_done.clone().unwrap_or_default(), c.rx_done.clone().unwrap_or_default());
        self.check(up_tx == up_rx, &format!("client-to-server mismatch: sent {up_tx:?}, received {up_rx:?}"));
        self.check(dn_tx == dn_rx, &format!("server-to-client mismatch: sent {dn_tx:?}, received {dn_rx:?}"));
        let failed = |l: &Line| l.text.contains("stream failed");
        let early = self.client.log.lines().into_iter().any(|l| failed(&l) && l.at < stop);
        self.check(!early, "the client reported a failed stream");
        // Known holdfast bug, reported: after a clean end (both FINs delivered) the client can
        // read the server's EOF before it has sent its own CLOSE, take it for a link fault, try
        // to resume and log "stream failed ... session lost". The program already got every
        // byte and a clean end, so it is not a data failure; say it loudly rather than flake.
        sleep_ms(200);
        if let Some(l) = self.client.log.lines().into_iter().find(|l| failed(l) && l.at >= stop) {
            let _ = writeln!(
                std::io::stderr(),
                "{}: warning: known bug: a failure was logged after the stream ended cleanly: {}",
                self.name,
                l.text
            );
        }
        (up_tx.0, dn_tx.0)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var("HOLDFAST_NETNS_VERBOSE").is_ok_and(|v| v == "1") {
            let _ = writeln!(std::io::stderr(), "--- {} logs ---\n{}", self.name, self.diag());
        }
    }
}

pub fn spawn_server(lab: &Lab, ns: &str, cmd: &[String], name: &str) -> Proc {
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let server = lab.spawn(ns, "server", BIN.as_ref(), &args, &[]);
    if server.log.wait_line("server ready", 0, START).is_none() {
        panic!("{name}: holdfast server did not start:\n{}", server.tail(20));
    }
    server
}

pub fn nat_rules(ports: &str) -> String {
    format!(
        "table ip hfnat {{\n chain post {{\n  type nat hook postrouting priority srcnat\n  \
         oifname \"hfr1\" meta l4proto tcp masquerade to :{ports}\n }}\n}}\n"
    )
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}
