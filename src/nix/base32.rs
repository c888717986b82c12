//! Nix's own base-32 ("nix32"): a 32-letter alphabet without e, o, u and t, written
//! least-significant digit last, so it is not RFC 4648 base32.

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the nix32 text for `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Nix's base32 of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&x| u16::from(x) << (8 - j));
        out.push(ALPHABET[usize::from((low | high) & 0x1f)] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes exactly `N` bytes; the text must have the matching length and no bits
/// beyond the `N` bytes may be set (so every byte string has one spelling).
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != encoded_len(N) {
        return None;
    }
    let mut out = [0u8; N];
    for (n, &c) in text.iter().rev().enumerate() {
        let d = u16::from(digit(c)?);
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (d << j) as u8;
        let carry = (d << j) >> 8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry as u8,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_from_nix() {
        // `nix hash to-base32 sha256:<hex>` for the SHA-256 of the empty string.
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let text = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert_eq!(encode(&bytes), text);
        assert_eq!(decode::<32>(text).unwrap().as_slice(), bytes.as_slice());
    }

    #[test]
    fn round_trips_every_length() {
        for n in 0..40usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&bytes);
            assert_eq!(text.len(), encoded_len(n));
            if n == 20 {
                assert_eq!(decode::<20>(&text).unwrap().as_slice(), bytes.as_slice());
            }
        }
    }

    #[test]
    fn rejects_bad_text() {
        assert!(decode::<20>("e").is_none());
        assert!(
            decode::<20>(&"e".repeat(32)).is_none(),
            "e is not in the alphabet"
        );
        // 32 letters carry 160 bits exactly; 52 letters carry 260 bits for 256, so a
        // leading digit above 0x0f sets bits past the end.
        assert!(decode::<32>(&format!("z{}", "0".repeat(51))).is_none());
    }
}
