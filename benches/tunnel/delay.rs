//! Round trips on a delayed path (issue 22): a relay in this process between the client and
//! its server adds a fixed delay each way (`delay_relay.rs`), and every figure is given in
//! round trips of that path (measured through the same kind of relay).
//!
//! - Start: from starting the client process (`holdfast client --local`, or `ssh -L`) to the
//!   first byte of a program's first connection reaching the service, the program connecting
//!   as soon as the local port takes connections and writing at once.
//! - Live: on a running client whose session is up, from a new local connection's `connect()`
//!   to its first byte reaching the service.
//!
//! The service stamps the arrival of each connection's first byte; the connection's first
//! eight bytes name the sample.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::delay_relay::DelayRelays;
use super::metrics::rtt;
use super::paths::{holdfast_client_args, holdfast_server, HoldfastKeys};
use super::procs::{spawn, Setup};
use super::report::fmt_opt;
use super::ssh::start_sshd;
use super::util::{err, free_port, loopback, s};
use super::BIN;

/// Settings of the delay metric.
pub(crate) struct DelayOpts {
    /// Added each way.
    pub(crate) delay: Duration,
    /// Samples of each measure.
    pub(crate) samples: usize,
    /// Which paths to measure: `holdfast`, `holdfast-nomux`, `ssh`.
    pub(crate) paths: Vec<String>,
}

/// The figures of one client.
pub(crate) struct DelayResult {
    /// How the client is reported.
    name: &'static str,
    /// Client start to first byte at the service.
    start: Vec<Duration>,
    /// New connection on a live session to first byte at the service.
    live: Vec<Duration>,
    /// What went wrong.
    errors: Vec<String>,
}

/// How long a client may take to start or a first byte to arrive, at most.
const PATIENCE: Duration = Duration::from_secs(30);

/// A client to measure: how it is reported and how it starts, given its local port.
struct Client<'a> {
    /// How it is reported.
    name: &'static str,
    /// Starts it forwarding the local port given to the stamp service.
    start: Box<dyn Fn(u16) -> io::Result<Child> + 'a>,
}

/// Runs the metric: the path's round trip, then each client's figures, and prints them.
pub(crate) async fn run(dir: &Path, keys: &HoldfastKeys, echo: u16, o: &DelayOpts) -> io::Result<()> {
    let l = TcpListener::bind(loopback(0)).await?;
    let stamp_port = l.local_addr()?.port();
    let (tx, mut stamps) = mpsc::channel(64);
    // A set, so that the service ends with this function, however it ends.
    let mut stamper = tokio::task::JoinSet::new();
    stamper.spawn(stamp_service(l, tx));
    let (server, sport) = holdfast_server(dir, keys, stamp_port, "delay-server.log", &[]).await?;
    let mut procs = super::procs::Tool::new("delay", loopback(sport));
    procs.children.push(server);
    let sshd = if o.paths.iter().any(|p| p == "ssh") {
        match start_sshd(dir, "delay-ssh").await {
            Ok(d) => Some(d),
            Err(Setup::Skipped(why) | Setup::Failed(why)) => {
                println!("delay: ssh -L {why}");
                None
            }
            Err(Setup::Ready(_)) => None,
        }
    } else {
        None
    };
    let mut upstreams = vec![loopback(echo), loopback(sport)];
    upstreams.extend(sshd.as_ref().map(|d| loopback(d.port)));
    let (relays, ports) = DelayRelays::start(&upstreams, o.delay)?;
    let (rtt_p50, _) = rtt(loopback(ports[0]), 20).await?;
    let rtt = Duration::from_secs_f64(rtt_p50 / 1e6);

    let hf = ports[1];
    let holdfast = |extra: &'static [&'static str], log: &'static str| {
        move |local: u16| {
            let mut args = holdfast_client_args(keys, hf, local);
            args.extend(extra.iter().map(|a| s(a)));
            spawn(dir, log, &*BIN, &args)
        }
    };
    let mut clients: Vec<Client<'_>> = Vec::new();
    if o.paths.iter().any(|p| p == "holdfast") {
        clients.push(Client { name: "holdfast", start: Box::new(holdfast(&["--no-check"], "delay-client.log")) });
        let check = holdfast(&[], "delay-check-client.log");
        clients.push(Client { name: "holdfast (start-up check on)", start: Box::new(check) });
    }
    if o.paths.iter().any(|p| p == "holdfast-nomux") {
        let nomux = holdfast(&["--no-check", "--no-mux"], "delay-nomux-client.log");
        clients.push(Client { name: "holdfast --no-mux", start: Box::new(nomux) });
    }
    if let (Some(d), Some(&via)) = (&sshd, ports.get(2)) {
        let ssh = move |local: u16| d.forward(dir, "delay-ssh.log", via, local, stamp_port);
        clients.push(Client { name: "ssh -L", start: Box::new(ssh) });
    }
    let mut results = Vec::new();
    for c in &clients {
        eprintln!("delay: {}", c.name);
        results.push(measure(c, o.samples, &mut stamps).await);
    }
    drop(clients);
    drop(relays);
    drop(sshd);
    drop(procs);
    drop(stamper);
    report(&results, o, rtt);
    Ok(())
}

/// Both measures of one client: `samples` starts, then `samples` new connections on one
/// running client.
async fn measure(c: &Client<'_>, samples: usize, stamps: &mut mpsc::Receiver<(u64, Instant)>) -> DelayResult {
    let mut r = DelayResult { name: c.name, start: Vec::new(), live: Vec::new(), errors: Vec::new() };
    for _ in 0..samples {
        let local = free_port();
        let t0 = Instant::now();
        let mut child = match (c.start)(local) {
            Ok(ch) => Running(Some(ch)),
            Err(e) => {
                r.errors.push(format!("start: {e}"));
                return r;
            }
        };
        let id = rand::random();
        let sample = async {
            let _conn = first_connection(loopback(local), &mut child, id).await?;
            wait_stamp(stamps, id).await
        };
        match sample.await {
            Ok(t1) => r.start.push(t1 - t0),
            Err(e) => r.errors.push(format!("start: {e}")),
        }
        child.stop().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let local = free_port();
    let mut child = match (c.start)(local) {
        Ok(ch) => Running(Some(ch)),
        Err(e) => {
            r.errors.push(format!("live: {e}"));
            return r;
        }
    };
    // The first connection brings the session up; the measured ones find it live.
    let warm = async {
        let id = rand::random();
        let _conn = first_connection(loopback(local), &mut child, id).await?;
        wait_stamp(stamps, id).await
    };
    if let Err(e) = warm.await {
        r.errors.push(format!("live: {e}"));
        child.stop().await;
        return r;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..samples {
        let id = rand::random();
        let t0 = Instant::now();
        let sample = async {
            let mut conn = TcpStream::connect(loopback(local)).await?;
            conn.set_nodelay(true)?;
            conn.write_all(&u64::to_be_bytes(id)).await?;
            let t1 = wait_stamp(stamps, id).await?;
            Ok::<_, io::Error>((t1, conn))
        };
        match sample.await {
            Ok((t1, _conn)) => r.live.push(t1 - t0),
            Err(e) => r.errors.push(format!("live: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.stop().await;
    r
}

/// A started client, ended when dropped or stopped.
struct Running(Option<Child>);

impl Running {
    /// Asks the client to end (SIGTERM, so that a holdfast client closes its session), and
    /// kills it if it has not within 2 s.
    async fn stop(&mut self) {
        let Some(mut c) = self.0.take() else { return };
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The program's first connection: tries `local` every millisecond until it takes the
/// connection, then writes the sample's `id` at once.
async fn first_connection(local: SocketAddr, child: &mut Running, id: u64) -> io::Result<TcpStream> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(mut s) = TcpStream::connect(local).await {
            s.set_nodelay(true)?;
            s.write_all(&id.to_be_bytes()).await?;
            return Ok(s);
        }
        if let Some(c) = child.0.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(err(format!("the client exited ({st})")));
            }
        }
        if Instant::now() > deadline {
            return Err(err(format!("nothing listening on {local} after {PATIENCE:?}")));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// When the first byte of the connection named `id` reached the service.
async fn wait_stamp(stamps: &mut mpsc::Receiver<(u64, Instant)>, id: u64) -> io::Result<Instant> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, stamps.recv()).await {
            Ok(Some((got, t))) if got == id => return Ok(t),
            Ok(Some(_)) => {}
            Ok(None) => return Err(err("the stamp service ended")),
            Err(_) => return Err(err(format!("no byte at the service after {PATIENCE:?}"))),
        }
    }
}

/// The service of this metric: stamps each connection's first byte, sends the stamp with the
/// connection's name (its first eight bytes), then reads to the end.
async fn stamp_service(l: TcpListener, tx: mpsc::Sender<(u64, Instant)>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut id = [0u8; 8];
            let n = s.read(&mut id).await?;
            let t = Instant::now();
            if n == 0 {
                return Ok(());
            }
            s.read_exact(&mut id[n..]).await?;
            let _ = tx.try_send((u64::from_be_bytes(id), t));
            let mut rest = [0u8; 256];
            while s.read(&mut rest).await? > 0 {}
            Ok::<_, io::Error>(())
        });
    }
}

/// Prints the figures, as p50 (min–max) in ms and p50 in round trips of the path.
fn report(results: &[DelayResult], o: &DelayOpts, rtt: Duration) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "## Round trips on a delayed path ({} ms added each way by a relay between client and server; \
         its round trip {:.1} ms, p50 of 20; {} samples of each)",
        o.delay.as_millis(),
        ms(rtt),
        o.samples
    );
    println!();
    println!(
        "| client | start → first byte at the service, p50 ms (min–max) | in RTT | new connection → first byte, \
         p50 ms (min–max) | in RTT |"
    );
    println!("|---|---:|---:|---:|---:|");
    let cell = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        if v.is_empty() {
            return (s("–"), s("–"));
        }
        let p50 = v[v.len() / 2];
        (
            format!("{:.1} ({:.1}–{:.1})", ms(p50), ms(v[0]), ms(v[v.len() - 1])),
            fmt_opt(Some(p50.as_secs_f64() / rtt.as_secs_f64()), 2),
        )
    };
    for r in results {
        let ((a, ar), (b, br)) = (cell(&r.start), cell(&r.live));
        println!("| {} | {a} | {ar} | {b} | {br} |", r.name);
    }
    println!();
    for r in results.iter().filter(|r| !r.errors.is_empty()) {
        println!("errors on {} (delay): {}", r.name, r.errors.join("; "));
    }
}
