//! What a client may ask of the server now: looked up on every request from the allow-list in
//! force, by the session's key (never by a name captured when the session opened), so that a
//! key renamed or restricted by a reload has its new rights on its next request.

use std::net::SocketAddr;

use super::{ConnectRule, Services};
use crate::keys::AllowedPeer;
use crate::net::{AllowListHandle, Peer};

/// The allow-list entry of `peer`'s key in the list in force, or `None` if the key is no longer
/// on it (its sessions are being ended: see [`AllowListHandle::set`]).
pub(super) fn current(peer: &Peer, allow: &AllowListHandle) -> Option<AllowedPeer> {
    allow.get().lookup(&peer.key).cloned()
}

/// How logs name `entry`'s client: quoted, as [`Peer::label`] does.
pub(super) fn label(entry: &AllowedPeer) -> String {
    crate::net::client_label(entry.name.as_deref(), &entry.key)
}

/// True if `rule` applies to `entry`: a rule naming its client always does, one naming another
/// client never, and one naming none only if `open` (the line gives that kind of forwarding).
fn applies(rule: &ConnectRule, entry: &AllowedPeer, open: bool) -> bool {
    match rule.client() {
        Some(c) => Some(c) == entry.name.as_deref(),
        None => open,
    }
}

/// The `--allow-connect` rules that apply to `entry` ([`AllowedPeer::connect`]).
pub(super) fn connect_rules(services: &Services, entry: &AllowedPeer) -> Vec<ConnectRule> {
    services.connect_rules().iter().filter(|r| applies(r, entry, entry.connect)).cloned().collect()
}

/// True if an `--allow-listen` rule that applies to `entry` ([`AllowedPeer::listen`]) gives it
/// `addr`.
pub(super) fn may_listen(services: &Services, entry: &AllowedPeer, addr: SocketAddr) -> bool {
    services.listen_rules().iter().any(|r| applies(r, entry, entry.listen) && r.gives(entry.name.as_deref(), addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{AllowList, Keypair};

    #[test]
    fn rules_apply_by_the_line_and_by_the_name() {
        let (a, b, c) = (Keypair::generate().public, Keypair::generate().public, Keypair::generate().public);
        let list =
            AllowList::parse(&format!("{a} open\n{b} ci services=echo\n{c} bastion forward=connect,listen\n")).unwrap();
        let mut services = Services::new();
        for r in ["127.0.0.1:*", "ci@10.0.0.1:22"] {
            services.allow_connect(r.parse().unwrap());
            services.allow_listen(r.parse().unwrap());
        }
        let rules =
            |k| connect_rules(&services, list.lookup(k).unwrap()).iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(rules(&a), ["127.0.0.1:*"]);
        assert_eq!(rules(&b), ["ci@10.0.0.1:22"], "a restricted key got a rule for everyone");
        assert_eq!(rules(&c), ["127.0.0.1:*"]);
        let listen = |k, addr: &str| may_listen(&services, list.lookup(k).unwrap(), addr.parse().unwrap());
        assert!(listen(&a, "127.0.0.1:80") && !listen(&a, "10.0.0.1:22"));
        assert!(!listen(&b, "127.0.0.1:80") && listen(&b, "10.0.0.1:22"));
        assert!(listen(&c, "127.0.0.1:80"));
    }
}
