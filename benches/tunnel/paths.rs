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
        let st = Command::new(&*BIN)
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
    let mut child = spawn(dir, log, &*BIN, &args)?;
    // A bare TCP probe: the server drops it silently during the handshake phase.
    if let Err(e) = wait_port(loopback(port), std::slice::from_mut(&mut child)).await {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
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
    let mut args = holdfast_client_args(keys, server, local);
    args.push(s("--no-check"));
    args.extend(extra.iter().map(|a| s(a)));
    spawn(dir, log, &*BIN, &args)
}

/// The arguments of `holdfast client` forwarding `local` to the bench service through the
/// server on port `server`, with the client's defaults (its start-up check included).
pub(crate) fn holdfast_client_args(keys: &HoldfastKeys, server: u16, local: u16) -> Vec<String> {
    vec![
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
    ]
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
        let local = free_port();
        // Everything started is in `tool`, which ends it if a later step fails.
        let mut tool = Tool::new(name, loopback(local));
        let (server, sport) = holdfast_server(dir, keys, svc, &format!("{name}-server.log"), &[]).await?;
        tool.server_pid = Some(server.id());
        tool.children.push(server);
        tool.children.push(holdfast_client_with(dir, keys, sport, local, &format!("{name}-client.log"), client_extra)?);
        wait_port(tool.entry, &mut tool.children).await?;
        Ok::<_, io::Error>(tool)
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
        let mut tool = Tool::new("socat relay", loopback(entry));
        tool.children.push(spawn(dir, "socat-2.log", &socat, &hop(mid, svc))?);
        tool.server_pid = Some(tool.children[0].id());
        tool.children.push(spawn(dir, "socat-1.log", &socat, &hop(entry, mid))?);
        wait_port(tool.entry, &mut tool.children).await?;
        Ok::<_, io::Error>(tool)
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
        let mut tool = Tool::new("stunnel", loopback(entry));
        let conf = |end: &str| [dir.join(format!("stunnel-{end}.conf")).display().to_string()];
        tool.children.push(spawn(dir, "stunnel-server.log", &stunnel, &conf("server"))?);
        tool.server_pid = Some(tool.children[0].id());
        tool.children.push(spawn(dir, "stunnel-client.log", &stunnel, &conf("client"))?);
        wait_port(loopback(mid), &mut tool.children).await?;
        wait_port(tool.entry, &mut tool.children).await?;
        Ok::<_, io::Error>(tool)
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
        let mut tool = Tool::new("spiped", loopback(entry));
        tool.children.push(spawn(dir, "spiped-d.log", &spiped, &pipe("-d", mid, svc))?);
        tool.server_pid = Some(tool.children[0].id());
        tool.children.push(spawn(dir, "spiped-e.log", &spiped, &pipe("-e", entry, mid))?);
        wait_port(tool.entry, &mut tool.children).await?;
        Ok::<_, io::Error>(tool)
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("spiped: {e}")),
    }
}
