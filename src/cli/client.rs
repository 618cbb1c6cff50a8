//! `holdfast client` (a local forward) and `holdfast connect` (one stream on stdio).

use std::io::{Read, Write};

use anyhow::{Context, Result};
use holdfast::net::{LinkEvent, Recovery, RecoveryPolicy};
use holdfast::proto::Cipher;
use holdfast::tunnel;
use holdfast::ClientConfig;
use tracing::{error, info, warn};

use crate::args::{CipherArg, ClientArgs, ClientCommon, ConnectArgs, OnFault};
use crate::keyfiles::{load_keypair, load_server_key};
use crate::session_config;

fn client_config(c: &ClientCommon) -> Result<ClientConfig> {
    tunnel::check_name(&c.service)?;
    let mut cfg = ClientConfig::new(load_keypair(&c.key)?, load_server_key(&c.server_key)?);
    cfg.session = session_config(&c.timers)?;
    cfg.recovery = RecoveryPolicy { give_up_after: c.give_up, ..RecoveryPolicy::default() };
    cfg.cipher = match c.cipher {
        CipherArg::Auto => Cipher::preferred(),
        CipherArg::Aes256Gcm => Cipher::AesGcm,
        CipherArg::Chacha20Poly1305 => Cipher::ChaChaPoly,
    };
    if let OnFault::Ask = c.on_fault {
        cfg.recovery = cfg.recovery.with_hook(|lost| async move {
            tokio::task::spawn_blocking(move || ask_tty(&lost.cause)).await.unwrap_or(Recovery::Fail)
        });
    }
    Ok(cfg)
}

/// Asks on the controlling terminal whether to recover. Without a terminal, recovers.
fn ask_tty(cause: &str) -> Recovery {
    let Ok(mut tty) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") else {
        warn!("--on-fault ask: no terminal to ask; recovering");
        return Recovery::Recover;
    };
    let _ = write!(tty, "\r\nholdfast: link lost ({cause}). Recover? [Y/n] ");
    let _ = tty.flush();
    let mut line = String::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = tty.read(&mut byte) {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0] as char);
    }
    match line.trim().to_ascii_lowercase().as_str() {
        "n" | "no" => Recovery::Fail,
        _ => Recovery::Recover,
    }
}

fn log_event(from: std::net::SocketAddr, ev: LinkEvent) {
    match ev {
        LinkEvent::Lost(l) => warn!(%from, cause = %l.cause, faults = l.faults, "link lost; reconnecting"),
        LinkEvent::Resumed { after, replayed_sent, replayed_received, peer } => {
            info!(%from, %peer, ?after, replayed_sent, replayed_received, "link resumed")
        }
        LinkEvent::Failed { reason } => error!(%from, %reason, "stream failed"),
        LinkEvent::Reconnecting { attempt, elapsed } if attempt > 1 => {
            info!(%from, attempt, ?elapsed, "reconnecting")
        }
        _ => {}
    }
}

pub(crate) async fn client(args: ClientArgs) -> Result<()> {
    let c = &args.common;
    let cfg = client_config(c)?;
    let local =
        tokio::net::TcpListener::bind(&args.local).await.with_context(|| format!("cannot listen on {}", args.local))?;
    if !args.no_check {
        let mut probe = tunnel::open(&c.server, cfg.clone(), &c.service).await?;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut probe).await;
    }
    info!(local = %local.local_addr()?, server = %c.server, service = %c.service, "forwarding");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((from, ev)) = rx.recv().await {
            log_event(from, ev);
        }
    });
    tokio::select! {
        r = tunnel::forward(local, c.server.clone(), cfg, c.service.clone(), Some(tx)) => r?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; exiting"),
    }
    Ok(())
}

pub(crate) async fn connect(args: ConnectArgs) -> Result<()> {
    let c = &args.common;
    // The library logs link events itself; stdout carries only stream bytes.
    let stream = tunnel::open(&c.server, client_config(c)?, &c.service).await?;
    tunnel::stdio(stream).await?;
    Ok(())
}
