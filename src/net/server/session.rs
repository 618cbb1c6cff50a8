//! Each session's driver task on the server: it pumps the attached link, keeps the session
//! while it is detached, attaches resumed links, and expires it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use super::state::{Entry, NewLink, State};
use super::stats::Phase;
use crate::human::{printable, Rounded};
use crate::net::events::{LinkEvent, LinkLost, LinkStatus};
use crate::net::pump::{pump, PumpEnd};
use crate::net::quiet::quiet;
use crate::proto::{CloseCode, Event, SessionError, Ticket};

/// Applies ticket events to the table.
pub(super) fn sync_tickets(state: &State, entry: &Arc<Entry>, ev: Event) {
    let mut t = state.table();
    match ev {
        Event::TicketIssued(id) => {
            t.by_ticket.insert(id, entry.clone());
        }
        Event::TicketRetired(id) => {
            t.by_ticket.remove(&id);
        }
        Event::TicketReceived | Event::Suspect(_) | Event::PathSuspect | Event::Healthy => {}
    }
}

/// Drives one session until it ends: pumps its link, waits while it is detached (until its
/// expiry), and attaches each newer confirmed link. `link` is `None` when the first link's
/// confirmation frame already faulted.
pub(super) async fn session_task(
    state: Arc<State>,
    entry: Arc<Entry>,
    link: Option<TcpStream>,
    mut rx: mpsc::Receiver<NewLink>,
) {
    let shared = entry.shared.clone();
    let expiry = state.cfg.limits.session_expiry;
    let mut link = link;
    let mut faults = 0u64;
    let mut lost_at = Instant::now();
    // True when the link being replaced was still attached (a resume the client raced).
    let mut replaced = false;
    // The number of the attached (or last attached) link: only a newer one may replace it. A
    // link whose confirmation was held back while the client moved on is older, and its
    // attach would undo what the newer link did (its ticket, its offsets).
    let mut current = 0u64;
    let mut phase = Phase::new(&state.counters);
    loop {
        if shared.lock().session.failure().is_some() && link.is_none() {
            break;
        }
        let newer = move |l: &NewLink| {
            let fresh = l.number > current;
            if !fresh {
                debug!(link = l.number, current, "dropping an outdated link's confirmation");
            }
            fresh
        };
        phase.set(link.is_some());
        let new = match link.take() {
            Some(sock) => {
                // A link accepted on the listener's runtime is moved to the session's lane.
                let sock = match state.cfg.lanes.is_some() {
                    true => match crate::net::lanes::rehome(sock) {
                        Ok(sock) => sock,
                        Err(e) => {
                            debug!(error = %e, "could not move the link to the session's lane");
                            continue;
                        }
                    },
                    false => sock,
                };
                match pump(&shared, sock, Some((&mut rx, newer)), |ev| sync_tickets(&state, &entry, ev)).await {
                    PumpEnd::Over => break,
                    PumpEnd::Replaced(new) => {
                        lost_at = Instant::now();
                        replaced = true;
                        new
                    }
                    PumpEnd::Fault(cause) => {
                        let ended = {
                            let mut inner = shared.lock();
                            inner.session.detach();
                            inner.session.failure().is_some()
                        };
                        if ended || !cause.is_link_fault() {
                            break;
                        }
                        phase.set(false);
                        entry.track.detached();
                        faults += 1;
                        lost_at = Instant::now();
                        replaced = false;
                        quiet!(
                            entry.life,
                            info!(client = %entry.who, cause = %printable(&cause.to_string()), "session detached; waiting for resume")
                        );
                        let lost = LinkLost { cause: cause.to_string(), faults };
                        shared.set_status(LinkStatus::Reconnecting { cause: lost.cause.clone(), attempt: 0 });
                        shared.emit(LinkEvent::Lost(lost));
                        continue;
                    }
                }
            }
            None => {
                let next = async {
                    loop {
                        match rx.recv().await {
                            Some(l) if newer(&l) => return Some(l),
                            Some(_) => {}
                            None => return None,
                        }
                    }
                };
                let woken = shared.wake_driver.notified();
                let next = tokio::select! {
                    r = tokio::time::timeout_at((lost_at + expiry).into(), next) => r,
                    // Revoked (`Entry::revoke`), or a write while detached: look again.
                    () = woken => continue,
                };
                match next {
                    Ok(Some(new)) => new,
                    Ok(None) | Err(_) => {
                        quiet!(
                            entry.life,
                            info!(client = %entry.who, expiry = %Rounded(expiry), "session expired without a resume")
                        );
                        state.expired.fetch_add(1, Ordering::Relaxed);
                        shared.fail(CloseCode::Expired, SessionError::Expired(expiry));
                        break;
                    }
                }
            }
        };
        current = new.number;
        let now = Instant::now();
        let attached = {
            let mut inner = shared.lock();
            inner.session.detach();
            let r = inner
                .session
                .attach(
                    now,
                    new.transport,
                    new.client_received,
                    Some(new.resume_id),
                    Some(Ticket::for_server(state.cfg.server_id)),
                )
                .and_then(|a| inner.session.handle_frame(now, &new.confirm).map(|()| a));
            while let Some(ev) = inner.session.poll_event() {
                sync_tickets(&state, &entry, ev);
            }
            inner.wake_all();
            r
        };
        match attached {
            Ok(a) => {
                state.resumes.fetch_add(1, Ordering::Relaxed);
                entry.track.resumed(new.peer);
                let replayed_received = new.client_written.saturating_sub(shared.lock().session.received_offset());
                if replaced {
                    // The old link was still attached here: the client had stopped hearing it
                    // (how long ago, only the client knows).
                    quiet!(
                        entry.life,
                        info!(
                            client = %entry.who,
                            addr = %new.peer,
                            replayed_to_client = a.replayed,
                            replayed_from_client = replayed_received,
                            "session resumed on a new connection; the one it replaces was still attached here"
                        )
                    );
                } else {
                    quiet!(
                        entry.life,
                        info!(
                            client = %entry.who,
                            addr = %new.peer,
                            // How long this end held it detached: the client may have
                            // heard nothing for longer (a silent outage is seen here only
                            // once the link fails or a new one comes).
                            detached_here = %Rounded(now.saturating_duration_since(lost_at)),
                            replayed_to_client = a.replayed,
                            replayed_from_client = replayed_received,
                            "session resumed"
                        )
                    );
                }
                shared.set_status(LinkStatus::Connected);
                shared.emit(LinkEvent::Resumed {
                    peer: new.peer,
                    after: now.saturating_duration_since(lost_at),
                    replayed_sent: a.replayed,
                    replayed_received,
                });
                link = Some(new.sock);
            }
            Err(e) if e.is_link_fault() => {
                // The confirmation frame was bad: drop this connection only, as on a live link.
                quiet!(
                    entry.life,
                    warn!(client = %entry.who, error = %printable(&e.to_string()), "resumed connection sent a bad first frame; waiting for another")
                );
                shared.lock().session.detach();
                lost_at = Instant::now();
            }
            Err(e @ SessionError::BadResume(_)) => {
                // The client claims positions that were never sent: this end cannot resume it.
                // The CLOSE(Protocol) that says so goes out on the new link.
                quiet!(
                    entry.life,
                    warn!(client = %entry.who, error = %printable(&e.to_string()), "resume failed; ending session")
                );
                link = Some(new.sock);
            }
            Err(e) => {
                quiet!(
                    entry.life,
                    warn!(client = %entry.who, error = %printable(&e.to_string()), "resume failed; ending session")
                );
                break;
            }
        }
    }
    drop(phase);
    // Clean up: forget tickets and release the session's share of the limits.
    state.table().by_ticket.retain(|_, e| !Arc::ptr_eq(e, &entry));
    let stream = state.registry.remove(&entry, &state.counters);
    defer_end_line(&entry, stream);
    // The end line is logged by the last holder of the session's activity: this driver, now,
    // or the tunnel layer's `Peer` once its tunnels are done. Either way before the session
    // stops counting, which a stopping server waits for before it exits.
    let client = entry.client;
    drop(entry);
    shared.report_end();
    state.release(&client);
}

/// Prepares the line that says how the session ended: logged once its driver and every [`Peer`]
/// of it are done (see [`super::status::Activity`]), after the lines of its tunnels. Its byte
/// counts are its tunnels' together, as their "tunnel closed" lines give them, if the tunnel
/// layer reported any ([`Peer::carried`]); else its stream bytes (`stream`).
///
/// [`Peer`]: super::Peer
/// [`Peer::carried`]: super::Peer::carried
fn defer_end_line(entry: &Entry, stream: (u64, u64)) {
    let failure = entry.shared.lock().session.failure().cloned();
    let lasted = Rounded(entry.opened.elapsed());
    let who = entry.who.clone();
    let log = entry.life.clone();
    let line = move |tunnels: Option<((u64, u64, u64), u64)>| {
        let ((to_client, from_client, tunnels), tunnels_reset) = tunnels.unwrap_or(((stream.0, stream.1, 0), 0));
        match failure {
            None | Some(SessionError::Finished) => {
                quiet!(
                    log,
                    info!(client = %who, to_client, from_client, tunnels, tunnels_reset, %lasted, "session closed")
                )
            }
            Some(e @ SessionError::Expired(_)) => {
                quiet!(
                    log,
                    info!(client = %who, to_client, from_client, tunnels, tunnels_reset, %lasted, reason = %printable(&e.to_string()), "session ended")
                )
            }
            Some(e) => {
                quiet!(
                    log,
                    warn!(client = %who, to_client, from_client, tunnels, tunnels_reset, %lasted, reason = %printable(&e.to_string()), "session ended")
                )
            }
        }
    };
    *entry.activity.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(line));
}
