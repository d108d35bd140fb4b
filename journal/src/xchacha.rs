//! XChaCha20-Poly1305 for log payloads, built from HChaCha20 (the `chacha20` crate) and ring's
//! ChaCha20-Poly1305.
//!
//! The construction is the one of draft-irtf-cfrg-xchacha: the first 16 nonce bytes and the key
//! give a subkey through HChaCha20; ChaCha20-Poly1305 then runs under that subkey with the nonce
//! `0u32 ‖ last 8 nonce bytes`. The bytes are those of `chacha20poly1305::XChaCha20Poly1305`
//! (the tests check both ways and the draft's test vector); ring's assembly opens a short record
//! in about half the time.

use chacha20::cipher::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

/// Length of the nonce.
pub(crate) const NONCE_LEN: usize = 24;

fn key_and_nonce(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> Option<(LessSafeKey, Nonce)> {
    let (head, tail) = nonce.split_at(16);
    let subkey = chacha20::hchacha::<U10>(key.into(), head.into());
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice()).ok()?;
    let mut short = [0u8; 12];
    short[4..].copy_from_slice(tail);
    Some((
        LessSafeKey::new(unbound),
        Nonce::assume_unique_for_key(short),
    ))
}

/// Encrypts `buf[from..]` in place and appends the tag. `false` only if the cipher refused (a
/// message longer than ChaCha20 allows; records are capped far below that).
pub(crate) fn seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
    from: usize,
) -> bool {
    let Some((cipher, nonce)) = key_and_nonce(key, nonce) else {
        return false;
    };
    let Some(plain) = buf.get_mut(from..) else {
        return false;
    };
    match cipher.seal_in_place_separate_tag(nonce, Aad::from(aad), plain) {
        Ok(tag) => {
            buf.extend_from_slice(tag.as_ref());
            true
        }
        Err(_) => false,
    }
}

/// Opens `sealed` (ciphertext ‖ tag): the plaintext, or `None` if it does not authenticate.
pub(crate) fn open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Vec<u8>> {
    let (cipher, nonce) = key_and_nonce(key, nonce)?;
    let mut buf = sealed.to_vec();
    let len = cipher
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
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
        assert!(seal_in_place(key, nonce, aad, &mut buf, 0));
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
