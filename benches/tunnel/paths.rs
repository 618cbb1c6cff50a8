//! The set-up of each path: holdfast (its keys, server and client), the two-hop socat relay,
//! stunnel, spiped and `ssh -L`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::procs::{spawn, wait_port, Setup, Tool};
use super::util::{err, free_port, loopback, read_to_string, s, which};
use super::{BIN, SERVICE_NAME};

/// The holdfast key files of a run.
pub(crate) struct HoldfastKeys {
    /// The server's private key.
    pub(crate) server_key: PathBuf,
    /// The server's public key, as the client pins it.
    pub(crate) server_pub: PathBuf,
    /// The client's private key.
    pub(crate) client_key: PathBuf,
    /// The server's authorized-keys file, listing the client's key.
    pub(crate) authorized: PathBuf,
}

/// Makes a server and a client key pair in `dir`, and the authorized-keys file.
pub(crate) fn holdfast_keys(dir: &Path) -> io::Result<HoldfastKeys> {
    for name in ["hf-server", "hf-client"] {
        let st = Command::new(BIN)
            .args(["keygen", "--out"])
            .arg(dir.join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !st.success() {
            return Err(err("holdfast keygen failed"));
        }
    }
    let authorized = dir.join("hf-authorized");
    std::fs::write(&authorized, format!("{} bench\n", read_to_string(dir.join("hf-client.pub")).trim()))?;
    Ok(HoldfastKeys {
        server_key: dir.join("hf-server.key"),
        server_pub: dir.join("hf-server.pub"),
        client_key: dir.join("hf-client.key"),
        authorized,
    })
}

/// Starts `holdfast server` on a free port with `extra` arguments; returns it and its port.
pub(crate) async fn holdfast_server(
    dir: &Path,
    keys: &HoldfastKeys,
    svc: u16,
    log: &str,
    pre: &[&str],
) -> io::Result<(Child, u16)> {
    holdfast_server_with(dir, keys, svc, log, pre, &[]).await
}

/// Like [`holdfast_server`], with `pre` arguments before the subcommand and `post` after it.
pub(crate) async fn holdfast_server_with(
    dir: &Path,
    keys: &HoldfastKeys,
    svc: u16,
    log: &str,
    pre: &[&str],
    post: &[&str],
) -> io::Result<(Child, u16)> {
    let port = free_port();
    let mut args: Vec<String> = pre.iter().map(|a| s(a)).collect();
    args.extend([
        s("server"),
        s("--listen"),
        format!("127.0.0.1:{port}"),
        s("--key"),
        keys.server_key.display().to_string(),
        s("--authorized"),
        keys.authorized.display().to_string(),
        s("--service"),
        format!("{SERVICE_NAME}=127.0.0.1:{svc}"),
    ]);
    args.extend(post.iter().map(|a| s(a)));
    let mut child = spawn(dir, log, BIN, &args)?;
    // A bare TCP probe: the server drops it silently during the handshake phase.
    wait_port(loopback(port), std::slice::from_mut(&mut child)).await?;
    Ok((child, port))
}

/// Starts `holdfast client` forwarding `local` to the bench service through the server on
/// port `server`.
pub(crate) fn holdfast_client(
    dir: &Path,
    keys: &HoldfastKeys,
    server: u16,
    local: u16,
    log: &str,
) -> io::Result<Child> {
    holdfast_client_with(dir, keys, server, local, log, &[])
}

/// Like [`holdfast_client`], with `extra` client arguments.
pub(crate) fn holdfast_client_with(
    dir: &Path,
    keys: &HoldfastKeys,
    server: u16,
    local: u16,
    log: &str,
    extra: &[&str],
) -> io::Result<Child> {
    let mut args = vec![
        s("client"),
        s("--server"),
        format!("127.0.0.1:{server}"),
        s("--server-key"),
        keys.server_pub.display().to_string(),
        s("--key"),
        keys.client_key.display().to_string(),
        s("--local"),
        format!("127.0.0.1:{local}"),
        s("--service"),
        s(SERVICE_NAME),
        s("--no-check"),
    ];
    args.extend(extra.iter().map(|a| s(a)));
    spawn(dir, log, BIN, &args)
}

/// The holdfast path: `name` is how it is reported, `client_extra` extra client arguments (the
/// `holdfast-chacha` path forces ChaCha20-Poly1305, the cipher stunnel uses here).
pub(crate) async fn setup_holdfast(
    dir: &Path,
    keys: &HoldfastKeys,
    svc: u16,
    name: &'static str,
    client_extra: &[&str],
) -> Setup {
    let run = async {
        let (server, sport) = holdfast_server(dir, keys, svc, &format!("{name}-server.log"), &[]).await?;
        let server_pid = server.id();
        let local = free_port();
        let client = holdfast_client_with(dir, keys, sport, local, &format!("{name}-client.log"), client_extra)?;
        let mut children = vec![server, client];
        wait_port(loopback(local), &mut children).await?;
        Ok::<_, io::Error>(Tool { name, entry: loopback(local), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("holdfast: {e}")),
    }
}

/// A plain two-hop relay without encryption: two `socat -b 262144` hops.
pub(crate) async fn setup_socat(dir: &Path, svc: u16) -> Setup {
    let Some(socat) = which("socat") else { return Setup::Skipped(s("socat not installed")) };
    let (entry, mid) = (free_port(), free_port());
    let hop = |listen: u16, to: u16| {
        vec![
            s("-b"),
            s("262144"),
            format!("TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,nodelay"),
            format!("TCP:127.0.0.1:{to},nodelay"),
        ]
    };
    let run = async {
        let second = spawn(dir, "socat-2.log", &socat, &hop(mid, svc))?;
        let first = spawn(dir, "socat-1.log", &socat, &hop(entry, mid))?;
        let mut children = vec![second, first];
        wait_port(loopback(entry), &mut children).await?;
        let server_pid = children[0].id();
        Ok::<_, io::Error>(Tool { name: "socat relay", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("socat: {e}")),
    }
}

/// stunnel client -> stunnel server, TLS 1.3 with ChaCha20-Poly1305 and a throwaway
/// certificate.
pub(crate) async fn setup_stunnel(dir: &Path, svc: u16) -> Setup {
    let Some(stunnel) = which("stunnel4").or_else(|| which("stunnel")) else {
        return Setup::Skipped(s("stunnel not installed (Debian: stunnel4)"));
    };
    let Some(openssl) = which("openssl") else { return Setup::Skipped(s("openssl not installed (for the cert)")) };
    let (cert, key) = (dir.join("stunnel-cert.pem"), dir.join("stunnel-key.pem"));
    let ok = Command::new(openssl)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Setup::Failed(s("stunnel: openssl could not make a certificate"));
    }
    let (entry, mid) = (free_port(), free_port());
    let common = "foreground = yes\npid =\ndebug = 3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let tls = "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nciphersuites = TLS_CHACHA20_POLY1305_SHA256\n";
    let server_conf = format!(
        "{common}[bench]\naccept = 127.0.0.1:{mid}\nconnect = 127.0.0.1:{svc}\ncert = {}\nkey = {}\n{tls}",
        cert.display(),
        key.display()
    );
    let client_conf = format!(
        "{common}[bench]\nclient = yes\naccept = 127.0.0.1:{entry}\nconnect = 127.0.0.1:{mid}\n\
         verifyPeer = yes\nCAfile = {}\n{tls}",
        cert.display()
    );
    let run = async {
        std::fs::write(dir.join("stunnel-server.conf"), server_conf)?;
        std::fs::write(dir.join("stunnel-client.conf"), client_conf)?;
        let server =
            spawn(dir, "stunnel-server.log", &stunnel, &[dir.join("stunnel-server.conf").display().to_string()])?;
        let client =
            spawn(dir, "stunnel-client.log", &stunnel, &[dir.join("stunnel-client.conf").display().to_string()])?;
        let server_pid = server.id();
        let mut children = vec![server, client];
        wait_port(loopback(mid), &mut children).await?;
        wait_port(loopback(entry), &mut children).await?;
        Ok::<_, io::Error>(Tool { name: "stunnel", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("stunnel: {e}")),
    }
}

/// spiped encrypting -> spiped decrypting, with a random key.
pub(crate) async fn setup_spiped(dir: &Path, svc: u16) -> Setup {
    let Some(spiped) = which("spiped") else { return Setup::Skipped(s("spiped not installed")) };
    let key = dir.join("spiped.key");
    let secret: [u8; 32] = rand::random();
    if std::fs::write(&key, secret).is_err() {
        return Setup::Failed(s("spiped: cannot write key"));
    }
    let (entry, mid) = (free_port(), free_port());
    let pipe = |mode: &str, from: u16, to: u16| {
        vec![
            s("-F"),
            s(mode),
            s("-s"),
            format!("[127.0.0.1]:{from}"),
            s("-t"),
            format!("[127.0.0.1]:{to}"),
            s("-k"),
            key.display().to_string(),
            s("-n"),
            s("2000"),
        ]
    };
    let run = async {
        let server = spawn(dir, "spiped-d.log", &spiped, &pipe("-d", mid, svc))?;
        let client = spawn(dir, "spiped-e.log", &spiped, &pipe("-e", entry, mid))?;
        let server_pid = server.id();
        let mut children = vec![server, client];
        wait_port(loopback(entry), &mut children).await?;
        Ok::<_, io::Error>(Tool { name: "spiped", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("spiped: {e}")),
    }
}

/// `ssh -L` to an sshd of its own (chacha20-poly1305@openssh.com), as the user running the
/// benchmark.
pub(crate) async fn setup_ssh(dir: &Path, svc: u16) -> Setup {
    let (Some(sshd), Some(ssh), Some(keygen)) = (which("sshd"), which("ssh"), which("ssh-keygen")) else {
        return Setup::Skipped(s("OpenSSH not installed (Debian: openssh-server openssh-client)"));
    };
    let user = Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| s("root"));
    let (host_key, user_key) = (dir.join("ssh-host"), dir.join("ssh-user"));
    for k in [&host_key, &user_key] {
        let ok = Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Setup::Failed(s("ssh: ssh-keygen failed"));
        }
    }
    // sshd insists on its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let (entry, port) = (free_port(), free_port());
    let conf = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\n\
         StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nCiphers chacha20-poly1305@openssh.com\nAllowTcpForwarding yes\n\
         LogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 100\n",
        host_key.display(),
        dir.join("ssh-authorized").display()
    );
    let run = async {
        std::fs::copy(user_key.with_extension("pub"), dir.join("ssh-authorized"))?;
        std::fs::write(dir.join("sshd.conf"), conf)?;
        let server =
            spawn(dir, "sshd.log", &sshd, &[s("-D"), s("-e"), s("-f"), dir.join("sshd.conf").display().to_string()])?;
        let server_pid = server.id();
        let mut children = vec![server];
        wait_port(loopback(port), &mut children).await?;
        let args = vec![
            s("-F"),
            s("/dev/null"),
            s("-N"),
            s("-T"),
            s("-L"),
            format!("127.0.0.1:{entry}:127.0.0.1:{svc}"),
            s("-p"),
            port.to_string(),
            s("-i"),
            user_key.display().to_string(),
            s("-o"),
            s("StrictHostKeyChecking=no"),
            s("-o"),
            s("UserKnownHostsFile=/dev/null"),
            s("-o"),
            s("Ciphers=chacha20-poly1305@openssh.com"),
            s("-o"),
            s("BatchMode=yes"),
            s("-o"),
            s("ExitOnForwardFailure=yes"),
            s("-o"),
            s("LogLevel=ERROR"),
            format!("{user}@127.0.0.1"),
        ];
        children.push(spawn(dir, "ssh.log", &ssh, &args)?);
        wait_port(loopback(entry), &mut children).await?;
        Ok::<_, io::Error>(Tool { name: "ssh -L", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("ssh: {e} (see {})", dir.join("sshd.log").display())),
    }
}
