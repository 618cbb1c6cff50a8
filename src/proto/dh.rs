//! X25519 for the Noise handshakes, computed on the Edwards form of the curve.
//!
//! snow's own X25519 runs the Montgomery ladder on curve25519-dalek's portable 64-bit field
//! arithmetic, and four of the five scalar multiplications of every handshake side are such
//! variable-base ones: they were three quarters of a server's CPU time per handshake. The same
//! function is computed here by mapping the peer's `u` coordinate to an Edwards point and using
//! curve25519-dalek's variable-base multiplication, which has a vectorised (AVX2) backend chosen
//! at run time. The result is identical (`[k]P` and `[k](-P)` have the same `u`, and the clamped
//! scalar is used unreduced, so torsion components vanish exactly as in the ladder); a `u` on the
//! twist, which has no Edwards point, falls back to the ladder. Both are constant-time in the
//! secret scalar; whether `u` is on the curve or its twist depends only on the public key.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use curve25519_dalek::montgomery::MontgomeryPoint;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::statics::StaticSecrets;

#[cfg(test)]
thread_local! {
    /// Variable-base multiplications done by this thread (tests count the work of a handshake).
    pub(crate) static MULTIPLICATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// `X25519(k, u)` of RFC 7748.
pub(crate) fn x25519(k: &[u8; 32], u: &[u8; 32]) -> [u8; 32] {
    #[cfg(test)]
    MULTIPLICATIONS.with(|m| m.set(m.get() + 1));
    let m = MontgomeryPoint(*u);
    match m.to_edwards(0) {
        Some(p) => p.mul_clamped(*k).to_montgomery().to_bytes(),
        None => m.mul_clamped(*k).to_bytes(),
    }
}

/// Public keys of the static private keys this process has used, by a salted SHA-256 of the
/// private key (never the key itself, and the random per-process salt means the stored digest
/// cannot be checked against a candidate key): every handshake hands snow the static private
/// key, and deriving its public key again (a fixed-base multiplication and an inversion) was a
/// tenth of a handshake.
static STATIC_PUBLIC: Mutex<Vec<([u8; 32], [u8; 32])>> = Mutex::new(Vec::new());
const MAX_STATIC_PUBLIC: usize = 16;

fn public_of_static(private: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    static SALT: OnceLock<[u8; 32]> = OnceLock::new();
    let salt = SALT.get_or_init(|| {
        use rand::RngCore;
        let mut s = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut s);
        s
    });
    let id: [u8; 32] = sha2::Sha256::new().chain_update(salt).chain_update(private).finalize().into();
    let found = {
        let g = STATIC_PUBLIC.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().find(|(k, _)| bool::from(k.ct_eq(&id))).map(|(_, public)| *public)
    };
    found.unwrap_or_else(|| {
        let public = MontgomeryPoint::mul_base_clamped(*private).to_bytes();
        let mut g = STATIC_PUBLIC.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_STATIC_PUBLIC {
            g.clear();
        }
        g.push((id, public));
        public
    })
}

/// Ephemeral key pairs generated ahead of time by a background thread, so that a handshake does
/// not wait for its own fixed-base multiplication (about a tenth of each side's work on the
/// critical path of a new connection). Each pair is handed out once and its slot wiped; the
/// pool holds at most `EPHEMERAL_POOL` unused pairs (which a memory snapshot would expose along
/// with the process's static key). A forked child never uses the pool: it would share the
/// parent's pairs, and it has no refill thread.
struct EphemeralPool {
    keys: Mutex<Vec<KeyPair>>,
    low: Condvar,
    pid: u32,
}

/// A private key (wiped on drop) and its public key.
type KeyPair = (Zeroizing<[u8; 32]>, [u8; 32]);

const EPHEMERAL_POOL: usize = 8;

fn ephemeral_pool() -> &'static EphemeralPool {
    static POOL: OnceLock<EphemeralPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let spawned = std::thread::Builder::new().name("holdfast-keys".into()).spawn(refill_ephemerals);
        if spawned.is_err() {
            tracing::debug!("no key pre-generation thread; ephemeral keys are generated inline");
        }
        EphemeralPool {
            keys: Mutex::new(Vec::with_capacity(EPHEMERAL_POOL)),
            low: Condvar::new(),
            pid: std::process::id(),
        }
    })
}

/// The pre-generation thread: keeps the pool full.
fn refill_ephemerals() {
    use rand::RngCore;
    let pool = ephemeral_pool();
    loop {
        {
            let mut g = pool.keys.lock().unwrap_or_else(|p| p.into_inner());
            while g.len() >= EPHEMERAL_POOL {
                g = pool.low.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        let mut private = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut private[..]);
        let public = MontgomeryPoint::mul_base_clamped(*private).to_bytes();
        pool.keys.lock().unwrap_or_else(|p| p.into_inner()).push((private, public));
    }
}

/// A pre-generated ephemeral pair, if one is ready (and a nudge to the thread to make more).
/// The pair is copied out and its slot wiped, so no copy stays behind in the pool's storage.
fn take_ephemeral() -> Option<KeyPair> {
    let pool = ephemeral_pool();
    if pool.pid != std::process::id() {
        return None;
    }
    let pair = {
        let mut keys = pool.keys.lock().unwrap_or_else(|p| p.into_inner());
        let (private, public) = keys.last_mut()?;
        let pair = (Zeroizing::new(**private), *public);
        private.zeroize();
        keys.pop();
        pair
    };
    pool.low.notify_one();
    Some(pair)
}

#[derive(Default)]
struct Dh25519 {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    /// A key given with `set` (a static key), not generated (an ephemeral one).
    fixed: bool,
    /// Responder only: the precomputed `ss` results of the allowed client keys, and what to do
    /// for a key without one.
    statics: Option<(StaticSecrets, Miss)>,
    /// Static-key DH calls so far: a responder's are `es` (0) then `ss` (1) in IK and KK.
    calls: AtomicU8,
}

impl Dh25519 {
    fn derive_public(&mut self) {
        self.public = MontgomeryPoint::mul_base_clamped(*self.private).to_bytes();
    }
}

impl Dh for Dh25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        let n = privkey.len().min(32);
        self.private[..n].copy_from_slice(&privkey[..n]);
        self.fixed = true;
        self.public = public_of_static(&self.private);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        self.fixed = false;
        if let Some((private, public)) = take_ephemeral() {
            self.private = private;
            self.public = public;
            return Ok(());
        }
        rng.try_fill_bytes(&mut self.private[..])?;
        self.derive_public();
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private[..]
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let u: [u8; 32] = pubkey.get(..32).and_then(|p| p.try_into().ok()).ok_or(snow::Error::Dh)?;
        let call = if self.fixed { self.calls.fetch_add(1, Ordering::Relaxed) } else { u8::MAX };
        let shared = match (&self.statics, call) {
            // The responder's `ss`: the same table look-up for every claimed client key, known
            // or not, so its timing tells nothing about which keys are allowed or have
            // connected. An unknown key gets a value that fails the message's authentication.
            (Some((table, miss)), 1) => match (table.ss(&u), miss) {
                (Some(ss), _) => ss,
                (None, Miss::Refuse(claimed)) => {
                    *claimed.lock().unwrap_or_else(|p| p.into_inner()) = Some(u);
                    table.decoy()
                }
                (None, Miss::Compute) => Zeroizing::new(x25519(&self.private, &u)),
            },
            _ => Zeroizing::new(x25519(&self.private, &u)),
        };
        // A low-order peer key gives the all-zero result, whoever holds it: refuse it, as
        // WireGuard does, so that a key like AAAA…= authenticates nobody.
        if bool::from(shared.ct_eq(&[0u8; 32])) {
            return Err(snow::Error::Dh);
        }
        let n = out.len().min(32);
        out[..n].copy_from_slice(&shared[..n]);
        Ok(())
    }
}

/// What a responder's `ss` does for a client key that has no precomputed result.
#[derive(Clone, Debug)]
pub(crate) enum Miss {
    /// First connection: the key is not allowed, so the handshake must fail; use a decoy, and
    /// note the key that was claimed (for the server's log; nothing proves the claim).
    Refuse(Arc<Mutex<Option<[u8; 32]>>>),
    /// Resume: the key is the session's (perhaps no longer on the allow-list); compute it.
    Compute,
}

/// Resolves only the DH function; everything else falls through to snow's resolvers.
#[derive(Default)]
struct DhResolver {
    statics: Option<(StaticSecrets, Miss)>,
}

impl CryptoResolver for DhResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(Dh25519 { statics: self.statics.clone(), ..Dh25519::default() })),
            _ => None,
        }
    }

    fn resolve_hash(&self, _choice: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// The resolver for every handshake: this module's X25519, then ring (ChaChaPoly, AESGCM), then
/// snow's defaults (BLAKE2s, the RNG). A responder given `statics` takes its `ss` from them.
pub(crate) fn resolver(statics: Option<(StaticSecrets, Miss)>) -> BoxedCryptoResolver {
    let rest = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    Box::new(FallbackResolver::new(Box::new(DhResolver { statics }), Box::new(rest)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;
    use std::collections::HashSet;

    /// RFC 7748 section 5.2, first test vector.
    #[test]
    fn rfc7748_vector() {
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect();
            v.try_into().unwrap()
        };
        let k = hex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
        let u = hex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
        let want = hex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552");
        assert_eq!(x25519(&k, &u), want);
    }

    /// Generated ephemeral pairs (pre-generated or made inline) are valid and never repeat, and
    /// a static key's cached public key is its real one.
    #[test]
    fn ephemeral_and_static_key_pairs_are_consistent() {
        struct Os;
        impl Random for Os {
            fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), snow::Error> {
                rand::rngs::OsRng.fill_bytes(d);
                Ok(())
            }
        }
        let mut seen = HashSet::new();
        for _ in 0..64 {
            let mut d = Dh25519::default();
            d.generate(&mut Os).unwrap();
            assert_eq!(d.public, MontgomeryPoint::mul_base_clamped(*d.private).to_bytes());
            assert!(!d.fixed);
            assert!(seen.insert(*d.private), "an ephemeral key was handed out twice");
        }
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        for _ in 0..2 {
            let mut d = Dh25519::default();
            d.set(&k);
            assert_eq!(d.public, MontgomeryPoint::mul_base_clamped(k).to_bytes());
            assert!(d.fixed);
        }
    }

    /// The same as the ladder for random scalars and points on the curve, its twist, low-order
    /// points, and non-canonical encodings.
    #[test]
    fn matches_the_montgomery_ladder() {
        let mut rng = rand::thread_rng();
        let mut k = [0u8; 32];
        let mut u = [0u8; 32];
        let mut special: Vec<[u8; 32]> = vec![[0; 32], [0xff; 32]];
        let mut one = [0u8; 32];
        one[0] = 1;
        special.push(one);
        let mut minus_one = [0xffu8; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        special.push(minus_one);
        for i in 0..2000 {
            rng.fill_bytes(&mut k);
            if i < special.len() {
                u = special[i];
            } else if i % 2 == 0 {
                rng.fill_bytes(&mut u); // about half of these are on the twist
            } else {
                rng.fill_bytes(&mut u);
                u = MontgomeryPoint::mul_base_clamped(u).to_bytes();
            }
            assert_eq!(x25519(&k, &u), MontgomeryPoint(u).mul_clamped(k).to_bytes(), "k={k:?} u={u:?}");
        }
    }
}
