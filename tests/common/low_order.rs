//! A hello from someone who holds no private key but claims a low-order public key: with the
//! all-zero key, the static-static secret is zero whatever the server's key, so the claimant can
//! compute every handshake key without a private key. A correct server refuses it.

use holdfast::keys::PublicKey;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// An X25519 "key" whose public value is zero and whose every DH result is zero (what X25519
/// gives for a low-order point).
#[derive(Default)]
struct ZeroKey {
    real: Option<Box<dyn Dh>>,
    fixed: bool,
}

impl Dh for ZeroKey {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, _privkey: &[u8]) {
        self.fixed = true;
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        // Ephemeral keys are real ones.
        let mut real = DefaultResolver.resolve_dh(&DHChoice::Curve25519).expect("x25519");
        real.generate(rng)?;
        self.real = Some(real);
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        match &self.real {
            Some(r) if !self.fixed => r.pubkey(),
            _ => &[0u8; 32],
        }
    }
    fn privkey(&self) -> &[u8] {
        match &self.real {
            Some(r) if !self.fixed => r.privkey(),
            _ => &[0u8; 32],
        }
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        match &self.real {
            Some(r) if !self.fixed => r.dh(pubkey, out),
            _ => {
                out[..32].fill(0);
                Ok(())
            }
        }
    }
}

struct ZeroResolver;

impl CryptoResolver for ZeroResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }
    fn resolve_dh(&self, _choice: &DHChoice) -> Option<Box<dyn Dh>> {
        Some(Box::<ZeroKey>::default())
    }
    fn resolve_hash(&self, _choice: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }
    fn resolve_cipher(&self, _choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// An IK hello (version 3, ChaChaPoly) to `server` claiming the all-zero static key, with the
/// first-connection timestamp `stamp`.
pub fn hello_as_zero_key(server: &PublicKey, stamp: u64) -> Vec<u8> {
    let header = [b'H', b'F', b'S', b'T', holdfast::proto::handshake::VERSION, 0x01];
    let resolver: BoxedCryptoResolver =
        Box::new(FallbackResolver::new(Box::new(ZeroResolver), Box::new(DefaultResolver)));
    let mut hs = snow::Builder::with_resolver("Noise_IK_25519_ChaChaPoly_BLAKE2s".parse().unwrap(), resolver)
        .prologue(&header)
        .and_then(|b| b.local_private_key(&[1u8; 32]))
        .and_then(|b| b.remote_public_key(server.as_bytes()))
        .and_then(|b| b.build_initiator())
        .expect("initiator");
    let mut msg = [0u8; 256];
    let n = hs.write_message(&stamp.to_be_bytes(), &mut msg).expect("message 1");
    [&header[..], &msg[..n]].concat()
}
