//! The compressions a narinfo's `Compression` field and a NAR URL's extension name.

use std::fmt;
use std::str::FromStr;

/// A compression Nix names in narinfos and NAR URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Compression {
    /// Uncompressed.
    None,
    /// xz (Nix's default for uploads).
    Xz,
    /// zstd.
    Zstd,
    /// bzip2 (what a narinfo without `Compression` means).
    Bzip2,
    /// brotli (not decoded by this server).
    Brotli,
    /// lz4 (not decoded by this server).
    Lz4,
}

/// A compression name Nix does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?}")]
pub struct UnknownCompression(pub String);

impl Compression {
    /// The file extension Nix appends after `.nar` (empty for none).
    pub fn extension(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Xz => ".xz",
            Self::Zstd => ".zst",
            Self::Bzip2 => ".bz2",
            Self::Brotli => ".br",
            Self::Lz4 => ".lz4",
        }
    }

    /// Which compression a NAR URL's file name (`<hash>.nar[.ext]`) uses, and its stem.
    pub fn split_nar_file_name(file: &str) -> Option<(&str, Self)> {
        [
            Self::None,
            Self::Xz,
            Self::Zstd,
            Self::Bzip2,
            Self::Brotli,
            Self::Lz4,
        ]
        .into_iter()
        .find_map(|c| {
            let stem = file.strip_suffix(c.extension())?.strip_suffix(".nar")?;
            Some((stem, c))
        })
    }
}

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" | "" => Self::None,
            "xz" => Self::Xz,
            "zstd" => Self::Zstd,
            "bzip2" => Self::Bzip2,
            "br" => Self::Brotli,
            "lz4" => Self::Lz4,
            other => return Err(UnknownCompression(other.to_owned())),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Brotli => "br",
            Self::Lz4 => "lz4",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_nar_file_names() {
        assert_eq!(
            Compression::split_nar_file_name("abc.nar.zst"),
            Some(("abc", Compression::Zstd))
        );
        assert_eq!(
            Compression::split_nar_file_name("abc.nar"),
            Some(("abc", Compression::None))
        );
        assert_eq!(
            Compression::split_nar_file_name("abc.nar.xz"),
            Some(("abc", Compression::Xz))
        );
        assert_eq!(Compression::split_nar_file_name("abc.tar.gz"), None);
    }
}
