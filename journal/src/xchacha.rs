//! XChaCha20-Poly1305 for log payloads, built from HChaCha20 (the `chacha20` crate) and ring's
//! ChaCha20-Poly1305.
//!
//! The construction is the one of draft-irtf-cfrg-xchacha: the first 16 nonce bytes and the key
//! give a subkey through HChaCha20; ChaCha20-Poly1305 then runs under that subkey with the nonce
//! `0u32 ‖ last 8 nonce bytes`. The bytes are those of `chacha20poly1305::XChaCha20Poly1305`
//! (the tests check both ways and the draft's test vector); ring's assembly opens a short record
//! in about half the time.

use chacha20::cipher::consts::U10;
use rand::Rng;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use std::cell::RefCell;

/// Length of the nonce.
pub(crate) const NONCE_LEN: usize = 24;

/// Records a thread seals under one nonce head (so one HChaCha20 subkey) before it draws a new
/// head. Within a head the last 8 nonce bytes are random: 2^16 of them collide with probability
/// about 2^-33, and a new head is a new subkey.
const RECORDS_PER_HEAD: u32 = 1 << 16;

/// A ChaCha20-Poly1305 key derived for one (key, nonce head) pair, kept while records with the
/// same head follow (HChaCha20 was a tenth of the cost of sealing a short record).
struct Subkey {
    key: [u8; 32],
    head: [u8; 16],
    cipher: LessSafeKey,
}

impl Subkey {
    fn derive(key: &[u8; 32], head: &[u8; 16]) -> Option<Self> {
        let subkey = chacha20::hchacha::<U10>(key.into(), head.into());
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice()).ok()?;
        Some(Self {
            key: *key,
            head: *head,
            cipher: LessSafeKey::new(unbound),
        })
    }

    fn is_for(&self, key: &[u8; 32], head: &[u8; 16]) -> bool {
        self.key == *key && self.head == *head
    }
}

/// The sealing side's state on one thread: its current head, its subkey and how many records
/// used it.
struct SealState {
    subkey: Subkey,
    uses: u32,
}

thread_local! {
    static SEALING: RefCell<Option<SealState>> = const { RefCell::new(None) };
    static OPENING: RefCell<Option<Subkey>> = const { RefCell::new(None) };
}

fn short_nonce(nonce: &[u8; NONCE_LEN]) -> Nonce {
    let mut short = [0u8; 12];
    short[4..].copy_from_slice(&nonce[16..]);
    Nonce::assume_unique_for_key(short)
}

fn head_of(nonce: &[u8; NONCE_LEN]) -> [u8; 16] {
    let mut head = [0u8; 16];
    head.copy_from_slice(&nonce[..16]);
    head
}

/// Encrypts `buf[from..]` in place under `subkey` and `nonce` (whose head is the subkey's) and
/// appends the tag.
fn seal_with(
    subkey: &Subkey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
    from: usize,
) -> Option<()> {
    let plain = buf.get_mut(from..)?;
    let tag = subkey
        .cipher
        .seal_in_place_separate_tag(short_nonce(nonce), Aad::from(aad), plain)
        .ok()?;
    buf.extend_from_slice(tag.as_ref());
    Some(())
}

/// Encrypts `buf[from..]` in place under a fresh nonce, appends the tag and returns the nonce.
/// The nonce's first 16 bytes are this thread's current head (random, renewed every
/// [`RECORDS_PER_HEAD`] records and for every other key), the last 8 random (`rand::rng`,
/// which reseeds after a fork). `None` only if the cipher refused (a message longer than
/// ChaCha20 allows; records are capped far below that).
pub(crate) fn seal_in_place(
    key: &[u8; 32],
    aad: &[u8],
    buf: &mut Vec<u8>,
    from: usize,
) -> Option<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut nonce[16..]);
    SEALING.with(|state| {
        let mut state = state.borrow_mut();
        let fresh = match state.as_ref() {
            Some(s) => s.uses >= RECORDS_PER_HEAD || s.subkey.key != *key,
            None => true,
        };
        if fresh {
            let mut head = [0u8; 16];
            rng.fill_bytes(&mut head);
            *state = Some(SealState {
                subkey: Subkey::derive(key, &head)?,
                uses: 0,
            });
        }
        let state = state.as_mut()?;
        state.uses += 1;
        nonce[..16].copy_from_slice(&state.subkey.head);
        seal_with(&state.subkey, &nonce, aad, buf, from)?;
        Some(nonce)
    })
}

/// Opens `sealed` (ciphertext ‖ tag): the plaintext, or `None` if it does not authenticate.
/// The subkey of the last head opened on this thread is kept: records sealed together share it.
pub(crate) fn open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Vec<u8>> {
    let head = head_of(nonce);
    OPENING.with(|cached| {
        let mut cached = cached.borrow_mut();
        if !cached.as_ref().is_some_and(|c| c.is_for(key, &head)) {
            *cached = Some(Subkey::derive(key, &head)?);
        }
        let cipher = &cached.as_ref()?.cipher;
        let mut buf = sealed.to_vec();
        let len = cipher
            .open_in_place(short_nonce(nonce), Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};
    use proptest::prelude::*;

    fn reference_seal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        XChaCha20Poly1305::new(key.into())
            .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
            .expect("reference seals")
    }

    fn seal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut buf = msg.to_vec();
        let subkey = Subkey::derive(key, &head_of(nonce)).expect("derives");
        assert!(seal_with(&subkey, nonce, aad, &mut buf, 0).is_some());
        buf
    }

    #[test]
    fn matches_the_draft_test_vector() {
        // draft-irtf-cfrg-xchacha-03, A.3.1.
        let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").expect("hex");
        let key: [u8; 32] =
            hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
                .expect("hex")
                .try_into()
                .expect("32 bytes");
        let nonce: [u8; 24] = hex::decode("404142434445464748494a4b4c4d4e4f5051525354555657")
            .expect("hex")
            .try_into()
            .expect("24 bytes");
        let expected = hex::decode(concat!(
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb",
            "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452",
            "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9",
            "21f9664c97637da9768812f615c68b13b52e",
            "c0875924c1c7987947deafd8780acf49"
        ))
        .expect("hex");
        assert_eq!(seal(&key, &nonce, &aad, plaintext), expected);
        assert_eq!(
            open(&key, &nonce, &aad, &expected).as_deref(),
            Some(&plaintext[..])
        );
    }

    #[test]
    fn a_flipped_bit_a_wrong_aad_or_a_short_input_does_not_open() {
        let (key, nonce) = ([3u8; 32], [5u8; 24]);
        let sealed = seal(&key, &nonce, b"ad", b"payload");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert_eq!(open(&key, &nonce, b"ad", &bad), None, "bit flip at {i}");
        }
        assert_eq!(open(&key, &nonce, b"other", &sealed), None);
        assert_eq!(
            open(
                &key,
                &nonce,
                b"ad",
                &sealed[..crate::seal::SEAL_TAG_LEN - 1]
            ),
            None
        );
        assert_eq!(open(&key, &nonce, b"ad", &[]), None);
    }

    /// Seals `msg` with a fresh nonce on this thread: (nonce, sealed).
    fn seal_fresh(key: &[u8; 32], msg: &[u8]) -> ([u8; 24], Vec<u8>) {
        let mut buf = msg.to_vec();
        let nonce = seal_in_place(key, b"ad", &mut buf, 0).expect("seals");
        (nonce, buf)
    }

    #[test]
    fn a_thread_reuses_its_head_for_a_while_with_random_tails_then_draws_a_new_one() {
        let key = [9u8; 32];
        let (first, _) = seal_fresh(&key, b"x");
        let mut tails = std::collections::HashSet::new();
        let mut heads = std::collections::HashSet::new();
        for i in 0..RECORDS_PER_HEAD + 2 {
            let (nonce, sealed) = seal_fresh(&key, format!("record {i}").as_bytes());
            heads.insert(head_of(&nonce));
            tails.insert(nonce[16..].to_vec());
            if i % 4096 == 0 {
                assert_eq!(
                    open(&key, &nonce, b"ad", &sealed).as_deref(),
                    Some(format!("record {i}").as_bytes())
                );
            }
        }
        assert!(heads.contains(&head_of(&first)));
        assert_eq!(
            heads.len(),
            2,
            "one new head after {RECORDS_PER_HEAD} records"
        );
        assert_eq!(tails.len() as u32, RECORDS_PER_HEAD + 2, "tails repeat");
        // Another key gets its own head at once; another thread has its own.
        let (other_key, _) = seal_fresh(&[1u8; 32], b"y");
        assert!(!heads.contains(&head_of(&other_key)));
        let (here, _) = seal_fresh(&key, b"z");
        let there = std::thread::spawn(move || seal_fresh(&key, b"z").0)
            .join()
            .expect("joins");
        assert_ne!(head_of(&here), head_of(&there));
    }

    #[test]
    fn the_kept_subkey_never_opens_a_record_of_another_key_or_head() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (na, sa) = seal_fresh(&a, b"under a");
        let (nb, sb) = seal_fresh(&b, b"under b");
        // Interleaved opens switch the kept subkey back and forth.
        for _ in 0..3 {
            assert_eq!(open(&a, &na, b"ad", &sa).as_deref(), Some(&b"under a"[..]));
            assert_eq!(open(&b, &nb, b"ad", &sb).as_deref(), Some(&b"under b"[..]));
        }
        // Same head, wrong key; right key, another head.
        assert_eq!(open(&b, &na, b"ad", &sa), None);
        let mut moved = na;
        moved[0] ^= 1;
        assert_eq!(open(&a, &moved, b"ad", &sa), None);
        assert_eq!(open(&a, &na, b"ad", &sa).as_deref(), Some(&b"under a"[..]));
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_implementation_both_ways(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 24]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
            msg in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let ours = seal(&key, &nonce, &aad, &msg);
            prop_assert_eq!(&ours, &reference_seal(&key, &nonce, &aad, &msg));
            let back = XChaCha20Poly1305::new((&key).into())
                .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ours, aad: &aad })
                .ok();
            prop_assert_eq!(back.as_deref(), Some(&msg[..]));
            prop_assert_eq!(open(&key, &nonce, &aad, &ours), Some(msg));
        }
    }
}
