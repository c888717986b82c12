//! NAR URLs, `nar/<nix32 sha256>.nar[.ext]`: the one place their forms are parsed and
//! printed. Clients upload under `nar/<FileHash>.nar.<ext>` (the hash of the compressed
//! bytes they send); the server serves `nar/<NarHash>.nar.zst` (its stored frames) and
//! `nar/<NarHash>.nar` (the NAR itself).

use std::fmt;
use std::str::FromStr;

use super::compression::Compression;
use super::hash::Sha256;

/// A NAR file as named under a cache: a SHA-256 and the compression of the file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NarUrl {
    /// The hash in the name: of the compressed file for an upload, of the NAR for the
    /// URLs the server itself serves.
    pub hash: Sha256,
    /// What the extension after `.nar` says the file is compressed with.
    pub compression: Compression,
}

/// Why a string is not a NAR URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarUrlError {
    /// The URL is not under `nar/`.
    #[error("a NAR URL starts with nar/")]
    NotUnderNar,
    /// The file name does not end in `.nar` and a known extension.
    #[error("expected <hash>.nar[.xz|.zst|.bz2]")]
    BadExtension,
    /// The stem is not a nix32 SHA-256.
    #[error("hash is not 52 nix32 letters")]
    BadHash,
}

impl NarUrl {
    /// The URL the server serves a NAR at: its NarHash, as the stored zstd frames.
    pub fn served(nar_hash: Sha256) -> Self {
        Self {
            hash: nar_hash,
            compression: Compression::Zstd,
        }
    }

    /// Parses the file name alone (`<hash>.nar[.ext]`), as it appears after `nar/`.
    pub fn from_file_name(file: &str) -> Result<Self, NarUrlError> {
        let (stem, compression) =
            Compression::split_nar_file_name(file).ok_or(NarUrlError::BadExtension)?;
        let hash = Sha256::from_nix32(stem).ok_or(NarUrlError::BadHash)?;
        Ok(Self { hash, compression })
    }

    /// The file name, `<hash>.nar[.ext]`.
    pub fn file_name(&self) -> String {
        format!(
            "{}.nar{}",
            self.hash.to_nix32(),
            self.compression.extension()
        )
    }
}

/// Parses the URL relative to the cache, `nar/<hash>.nar[.ext]`, as narinfos write it.
impl FromStr for NarUrl {
    type Err = NarUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let file = s.strip_prefix("nar/").ok_or(NarUrlError::NotUnderNar)?;
        Self::from_file_name(file)
    }
}

/// The URL relative to the cache, `nar/<hash>.nar[.ext]`.
impl fmt::Display for NarUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nar/{}", self.file_name())
    }
}

impl fmt::Debug for NarUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        let h = Sha256::digest(b"x");
        for (ext, c) in [
            ("", Compression::None),
            (".zst", Compression::Zstd),
            (".xz", Compression::Xz),
            (".bz2", Compression::Bzip2),
        ] {
            let text = format!("nar/{}.nar{ext}", h.to_nix32());
            let url: NarUrl = text.parse().unwrap();
            assert_eq!(
                url,
                NarUrl {
                    hash: h,
                    compression: c
                }
            );
            assert_eq!(url.to_string(), text);
            assert_eq!(NarUrl::from_file_name(&url.file_name()), Ok(url));
        }
        assert_eq!(
            NarUrl::served(h).to_string(),
            format!("nar/{}.nar.zst", h.to_nix32())
        );
    }

    #[test]
    fn refuses_what_is_not_a_nar_url() {
        let h = Sha256::digest(b"x").to_nix32();
        assert_eq!(
            format!("{h}.nar").parse::<NarUrl>(),
            Err(NarUrlError::NotUnderNar)
        );
        assert_eq!(
            format!("nar/{h}.tar").parse::<NarUrl>(),
            Err(NarUrlError::BadExtension)
        );
        assert_eq!(
            "nar/abc.nar.zst".parse::<NarUrl>(),
            Err(NarUrlError::BadHash)
        );
        assert_eq!(
            format!("nar/../{h}.nar").parse::<NarUrl>(),
            Err(NarUrlError::BadHash)
        );
    }
}
