//! The responder's static-static results, computed ahead of time for every allowed client key.
//!
//! The `ss` token of a first connection (`Noise_IK`) is `X25519(server static, client static)`,
//! the same value for every handshake of that client. A server that computed it per handshake
//! spent a quarter of its handshake work on it; one that cached it for recent clients answered
//! faster for them, and so told a scanner which keys had connected recently (an IK hello can
//! claim any key, and `ss` is computed before the claim fails to authenticate). Here it is
//! computed once per allowed key when the allow-list is loaded, and every claimed key, allowed
//! or not, costs the same table look-up: an unknown key gets a decoy value, which makes the
//! message fail to authenticate exactly as a forged claim does.

use std::collections::HashMap;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::dh::x25519;
use crate::keys::{PrivateKey, PublicKey};

/// Precomputed `X25519(server static, client static)` for a set of client keys, and a decoy for
/// every other key. Cheap to clone; the secrets are wiped when the last clone is dropped.
#[derive(Clone)]
pub struct StaticSecrets {
    inner: Arc<Inner>,
}

struct Inner {
    ss: HashMap<[u8; 32], Zeroizing<[u8; 32]>>,
    decoy: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticSecrets").field("keys", &self.inner.ss.len()).finish_non_exhaustive()
    }
}

impl StaticSecrets {
    /// Computes the results of `local` (the server's static key) with each of `clients`: one
    /// scalar multiplication per key (about 40 µs each). Keys whose result is all zero
    /// (low-order keys, which authenticate nobody) are left out.
    pub fn new<'a>(local: &PrivateKey, clients: impl IntoIterator<Item = &'a PublicKey>) -> Self {
        let mut ss = HashMap::new();
        for k in clients {
            let r = Zeroizing::new(x25519(local.as_bytes(), k.as_bytes()));
            if *r != [0u8; 32] {
                ss.insert(*k.as_bytes(), r);
            }
        }
        Self::with(ss)
    }

    /// No keys: every first connection fails to authenticate.
    pub fn empty() -> Self {
        Self::with(HashMap::new())
    }

    fn with(ss: HashMap<[u8; 32], Zeroizing<[u8; 32]>>) -> Self {
        use rand::RngCore;
        let mut decoy = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut decoy[..]);
        decoy[0] |= 1;
        StaticSecrets { inner: Arc::new(Inner { ss, decoy }) }
    }

    /// Number of keys with a precomputed result.
    pub fn len(&self) -> usize {
        self.inner.ss.len()
    }

    /// True when no key has one.
    pub fn is_empty(&self) -> bool {
        self.inner.ss.is_empty()
    }

    pub(crate) fn ss(&self, client: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        self.inner.ss.get(client).cloned()
    }

    pub(crate) fn decoy(&self) -> Zeroizing<[u8; 32]> {
        self.inner.decoy.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::proto::dh::MULTIPLICATIONS;
    use crate::proto::handshake::{read_hello, ClientHandshake, HandshakeError, Hello};
    use crate::proto::Cipher;

    fn multiplications(f: impl FnOnce()) -> u64 {
        let before = MULTIPLICATIONS.with(|m| m.get());
        f();
        MULTIPLICATIONS.with(|m| m.get()) - before
    }

    /// Review item 6: a first-connection hello costs the server the same work whatever key it
    /// claims, allowed and seen many times or never seen: no multiplication for `ss` at all. An
    /// old per-pair cache answered repeat clients one multiplication sooner, which a scanner
    /// could time.
    #[test]
    fn every_claimed_key_costs_the_same() {
        let server = Keypair::generate();
        let (known, unknown) = (Keypair::generate(), Keypair::generate());
        let table = StaticSecrets::new(&server.private, [&known.public]);
        for round in 0..4u64 {
            let mut outcome = Vec::new();
            let cost: Vec<u64> = [&known, &unknown]
                .iter()
                .map(|k| {
                    let (_, hello) =
                        ClientHandshake::initial(&k.private, &server.public, Cipher::AesGcm, round + 1).unwrap();
                    multiplications(|| {
                        outcome.push(
                            read_hello(&hello, &server.private, Some(&table), |_| None).map(|r| r.hello().clone()),
                        )
                    })
                })
                .collect();
            assert_eq!(cost[0], cost[1], "round {round}: known and unknown keys cost differently");
            assert_eq!(cost[0], 1, "round {round}: only `es` is computed");
            assert!(matches!(&outcome[0], Ok(Hello::Initial { client, .. }) if *client == known.public));
            assert_eq!(
                outcome[1].as_ref().err(),
                Some(&HandshakeError::NotAllowed(unknown.public)),
                "an unknown key must fail (message 1 does not authenticate), naming the claim"
            );
        }
    }

    #[test]
    fn low_order_keys_get_no_entry() {
        let server = Keypair::generate();
        let zero = PublicKey::from_bytes([0u8; 32]);
        assert!(StaticSecrets::new(&server.private, [&zero]).is_empty());
    }
}
