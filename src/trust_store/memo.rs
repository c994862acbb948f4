//! Signatures a trust store has already verified, so that what is the same on every handshake is
//! checked once: the CRLs' signatures (webpki verifies a CRL's signature each time it is used,
//! rustls/webpki#81) and the issuing CAs' signatures on one another, and a device's own
//! certificate when it comes back. Only a success is kept, under a digest of everything verified.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use boring::sha::Sha256;
use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};

/// The most signatures kept; past it the memo starts again (the CRLs and CAs come back at once).
const MAX_KEPT: usize = 4096;

/// Digests of verified (algorithm, key, message, signature), shared by a store's algorithms.
#[derive(Debug, Default)]
pub struct Verified(Mutex<HashSet<[u8; 32]>>);

/// A verification algorithm that consults, and fills, its store's [`Verified`].
#[derive(Debug)]
pub struct Memo {
    inner: &'static dyn SignatureVerificationAlgorithm,
    verified: Arc<Verified>,
}

/// `algs`, each behind the one memo.
pub fn wrap(algs: &[&'static dyn SignatureVerificationAlgorithm]) -> Vec<Memo> {
    let verified = Arc::new(Verified::default());
    algs.iter()
        .map(|inner| Memo {
            inner: *inner,
            verified: verified.clone(),
        })
        .collect()
}

impl Memo {
    fn digest(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&*self.inner.signature_alg_id(), &*self.inner.public_key_alg_id(), public_key, signature] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(message);
        h.finish()
    }
}

impl SignatureVerificationAlgorithm for Memo {
    fn verify_signature(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), InvalidSignature> {
        let digest = self.digest(public_key, message, signature);
        let lock = || self.verified.0.lock().unwrap_or_else(|e| e.into_inner());
        if lock().contains(&digest) {
            return Ok(());
        }
        self.inner.verify_signature(public_key, message, signature)?;
        let mut kept = lock();
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        kept.insert(digest);
        Ok(())
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts a signature that equals the message reversed; counts its calls.
    #[derive(Debug)]
    struct Reversed(AtomicUsize);

    impl SignatureVerificationAlgorithm for Reversed {
        fn verify_signature(&self, _key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), InvalidSignature> {
            self.0.fetch_add(1, Ordering::Relaxed);
            let want: Vec<u8> = message.iter().rev().copied().collect();
            (want == signature).then_some(()).ok_or(InvalidSignature)
        }
        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            AlgorithmIdentifier::from_slice(b"key")
        }
        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            AlgorithmIdentifier::from_slice(b"sig")
        }
    }

    #[test]
    fn a_success_is_verified_once_and_nothing_else_passes_for_it() {
        let inner: &'static Reversed = Box::leak(Box::new(Reversed(AtomicUsize::new(0))));
        let memo = wrap(&[inner]);
        let m = &memo[0];
        let calls = || inner.0.load(Ordering::Relaxed);
        assert!(m.verify_signature(b"k", b"abc", b"cba").is_ok());
        assert!(m.verify_signature(b"k", b"abc", b"cba").is_ok());
        assert_eq!(calls(), 1, "the second time from the memo");
        // Another signature, message or key is verified, and a failure is never kept.
        assert!(m.verify_signature(b"k", b"abc", b"abc").is_err());
        assert!(m.verify_signature(b"k", b"abc", b"abc").is_err());
        assert!(m.verify_signature(b"k", b"abd", b"cba").is_err());
        assert!(m.verify_signature(b"other", b"abc", b"cba").is_ok());
        assert_eq!(calls(), 5);
        // A signature and message that run together the same way are told apart.
        assert!(m.verify_signature(b"k", b"cbaabc", b"").is_err());
        assert_eq!(calls(), 6);
    }

    #[test]
    fn the_memo_is_bounded() {
        let inner: &'static Reversed = Box::leak(Box::new(Reversed(AtomicUsize::new(0))));
        let memo = wrap(&[inner]);
        for i in 0..(MAX_KEPT + 10) as u32 {
            let msg = i.to_be_bytes();
            let sig: Vec<u8> = msg.iter().rev().copied().collect();
            assert!(memo[0].verify_signature(b"k", &msg, &sig).is_ok());
        }
        assert!(memo[0].verified.0.lock().unwrap().len() <= MAX_KEPT);
    }
}
