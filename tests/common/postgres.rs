//! A throw-away PostgreSQL cluster for tests: made with `initdb` in the test's temp dir, run as
//! the unprivileged `postgres` user on a port chosen at run time, stopped (`pg_ctl stop -m
//! immediate`) on drop. Authentication is `trust`, and only 127.0.0.1 and a socket directory in
//! the temp dir are listened on.

use std::path::PathBuf;

use tokio::process::Command;

use super::procs::{free_port, output, run_ok, s, which, TempDir, LIMIT};

/// The user the server runs as (Debian's postgresql package creates it).
pub const USER: &str = "postgres";

/// A server program: from the newest `/usr/lib/postgresql/N/bin` (Debian keeps initdb and
/// pg_ctl only there), else from `PATH`.
pub fn bin(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    dirs.sort();
    dirs.into_iter().rev().map(|(_, d)| d.join(program)).find(|p| p.exists()).or_else(|| which(program))
}

/// Why a cluster cannot be made here, if it cannot.
pub fn check() -> Result<(), String> {
    let missing: Vec<&str> = ["initdb", "pg_ctl", "pgbench", "psql"].into_iter().filter(|p| bin(p).is_none()).collect();
    if !missing.is_empty() {
        return Err(format!("not installed: {}", missing.join(", ")));
    }
    if which("runuser").is_none() {
        return Err("not installed: runuser".into());
    }
    ids().map(|_| ())
}

/// The uid and gid of [`USER`].
fn ids() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(USER)).ok_or("no postgres user")?;
    let f: Vec<&str> = line.split(':').collect();
    match (f.get(2).and_then(|v| v.parse().ok()), f.get(3).and_then(|v| v.parse().ok())) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(format!("bad passwd line: {line}")),
    }
}

/// A running cluster; stopped on drop.
pub struct Postgres {
    pub port: u16,
    data: PathBuf,
    pub sockets: PathBuf,
}

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", USER, "--"]).arg(bin(program).unwrap_or_else(|| program.into()));
    cmd
}

impl Postgres {
    /// Creates a cluster under `dir` and starts it; returns once it accepts connections.
    pub async fn start(dir: &TempDir) -> Postgres {
        let (uid, gid) = ids().expect("postgres user");
        let (data, sockets) = (dir.path("pgdata"), dir.path("pgsock"));
        for d in [&data, &sockets] {
            std::fs::create_dir_all(d).unwrap();
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
        let mut init = as_postgres("initdb");
        init.args(["-D", s(&data), "--auth=trust", "-U", USER, "--no-sync"]).current_dir(dir.root());
        run_ok("initdb", &mut init).await;
        for _ in 0..5 {
            let port = free_port();
            let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", s(&sockets));
            let log = data.join("server.log");
            let mut start = as_postgres("pg_ctl");
            start.args(["-D", s(&data), "-l", s(&log), "-o", &opts, "-w", "-t", "30", "start"]).current_dir(dir.root());
            let out = output("pg_ctl start", &mut start, LIMIT * 2).await;
            let pg = Postgres { port, data: data.clone(), sockets: sockets.clone() };
            if out.status.success() {
                return pg;
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            drop(pg);
            assert!(log.contains("already in use"), "postgres did not start:\n{log}");
        }
        panic!("postgres found no free port in 5 tries");
    }

    /// `psql` straight to the server (through its socket directory), as [`USER`].
    pub fn psql(&self, sql: &str) -> Command {
        let mut cmd = Command::new(bin("psql").expect("psql"));
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", s(&self.sockets), "-p", &self.port.to_string()]);
        cmd.args(["-U", USER, "-d", "postgres", "-c", sql]);
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Synchronous on purpose: drop may run while a panic unwinds, outside any runtime.
        let _ = std::process::Command::new("runuser")
            .args(["-u", USER, "--"])
            .arg(bin("pg_ctl").unwrap_or_else(|| "pg_ctl".into()))
            .args(["-D", s(&self.data), "stop", "-m", "immediate", "-w", "-t", "30"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
