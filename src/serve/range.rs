//! The `Range` request header, for one byte range (what resuming downloads send).

use std::ops::Range;

/// A range outside the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The requested range of a body of `size` bytes: `Ok(None)` for the whole body (no
/// header, or one we do not serve partially such as multiple ranges), `Err` when the
/// range lies outside the body.
pub fn parse(header: Option<&str>, size: u64) -> Result<Option<Range<u64>>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b => a..(b.saturating_add(1)).min(size),
        (Ok(a), Err(_)) if last.is_empty() => a..size,
        (Err(_), Ok(n)) if first.is_empty() => {
            if n == 0 {
                return Err(Unsatisfiable);
            }
            size.saturating_sub(n)..size
        }
        _ => return Ok(None),
    };
    if range.start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_ranges() {
        assert_eq!(parse(None, 10), Ok(None));
        assert_eq!(parse(Some("bytes=0-4"), 10), Ok(Some(0..5)));
        assert_eq!(parse(Some("bytes=5-"), 10), Ok(Some(5..10)));
        assert_eq!(parse(Some("bytes=-3"), 10), Ok(Some(7..10)));
        assert_eq!(parse(Some("bytes=8-100"), 10), Ok(Some(8..10)));
        assert_eq!(parse(Some("bytes=-30"), 10), Ok(Some(0..10)));
        assert_eq!(parse(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse(Some("items=0-1"), 10), Ok(None));
        assert_eq!(parse(Some("bytes=5-2"), 10), Ok(None));
        assert_eq!(parse(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse(Some("bytes=-0"), 10), Err(Unsatisfiable));
    }
}
