//! A streaming NAR (`nix-archive-1`) validator that also writes the `.ls` listing.
//!
//! It pulls from any `Read` and keeps only the current name, symlink target and one
//! flag per directory level in memory: file contents pass through in blocks, and the
//! listing's JSON is written out as the archive is read (entries come in order, so
//! the JSON can be written depth first). A NAR of any size or number of entries is
//! checked in constant memory.

use std::io::{self, Read, Write};

/// Current Nix's limits; older clients never produce more.
const MAX_NAME: usize = 255;
const MAX_TARGET: usize = 4095;
const MAX_DEPTH: usize = 64;
/// The longest token the grammar has (`nix-archive-1`, `executable`, ...).
const MAX_TOKEN: usize = 16;

/// Why bytes are not a valid NAR, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The input ended inside the archive.
    #[error("NAR is truncated")]
    Truncated,
    /// The input does not start with `nix-archive-1`.
    #[error("not a NAR: bad magic")]
    BadMagic,
    /// A token other than the grammar's.
    #[error("NAR: expected {expected:?} at byte {offset}")]
    Unexpected {
        /// What the grammar allows there.
        expected: &'static str,
        /// Where the string starts.
        offset: u64,
    },
    /// A name, target or token over its limit.
    #[error("NAR: string at byte {offset} is longer than {max} bytes")]
    TooLong {
        /// Where the string's length is.
        offset: u64,
        /// The limit for that string.
        max: usize,
    },
    /// Padding bytes that are not zero.
    #[error("NAR: non-zero padding at byte {0}")]
    Padding(u64),
    /// An entry name Nix refuses (empty, `.`, `..`, with `/` or NUL).
    #[error("NAR: invalid entry name {0:?}")]
    BadName(String),
    /// Directory entries not in strictly increasing byte order.
    #[error("NAR: entry {0:?} is out of order or repeated")]
    Unsorted(String),
    /// Directories nested deeper than Nix allows.
    #[error("NAR: nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// More files, directories and symlinks than the limit the caller set.
    #[error("NAR has more than {max} entries")]
    TooManyEntries {
        /// The limit.
        max: u64,
    },
    /// Bytes after the archive's end.
    #[error("NAR: data after the end of the archive")]
    TrailingData,
    /// An error of the underlying reader (a decompressor, the network), not of the NAR.
    #[error("{0}")]
    Read(#[source] io::Error),
    /// The listing could not be written.
    #[error("writing the listing: {0}")]
    Write(#[source] io::Error),
}

/// What a valid archive held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Files, directories and symlinks, the root included.
    pub entries: u64,
    /// The archive's size in bytes.
    pub size: u64,
}

struct Parser<R, W> {
    r: R,
    pos: u64,
    block: Vec<u8>,
    listing: W,
    entries: u64,
    max_entries: u64,
}

/// Reads one whole NAR from `r`, checks every rule, and writes its `.ls` listing (the
/// JSON Nix's binary cache format defines) to `listing`. At most `max_entries` files,
/// directories and symlinks are accepted. `r` must end exactly where the NAR does.
pub fn validate<R: Read, W: Write>(
    r: R,
    listing: W,
    max_entries: u64,
) -> Result<Summary, NarError> {
    let mut p = Parser {
        r,
        pos: 0,
        block: vec![0; 64 * 1024],
        listing,
        entries: 0,
        max_entries,
    };
    if p.bytes(MAX_TOKEN)? != b"nix-archive-1" {
        return Err(NarError::BadMagic);
    }
    p.out(b"{\"version\":1,\"root\":")?;
    p.node(0)?;
    p.out(b"}")?;
    p.listing.flush().map_err(NarError::Write)?;
    let mut extra = [0u8; 1];
    loop {
        match p.r.read(&mut extra) {
            Ok(0) => {
                return Ok(Summary {
                    entries: p.entries,
                    size: p.pos,
                })
            }
            Ok(_) => return Err(NarError::TrailingData),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NarError::Read(e)),
        }
    }
}

impl<R: Read, W: Write> Parser<R, W> {
    fn out(&mut self, json: &[u8]) -> Result<(), NarError> {
        self.listing.write_all(json).map_err(NarError::Write)
    }

    /// A JSON string; names and targets that are not UTF-8 are shown lossily, as the
    /// listing is for people and tools that browse, not for restoring files.
    fn out_str(&mut self, s: &[u8]) -> Result<(), NarError> {
        let s = String::from_utf8_lossy(s);
        serde_json::to_writer(&mut self.listing, s.as_ref())
            .map_err(|e| NarError::Write(io::Error::other(e)))
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => NarError::Truncated,
            _ => NarError::Read(e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        self.fill(&mut b[..pad])?;
        if b.iter().any(|&x| x != 0) {
            return Err(NarError::Padding(self.pos - pad as u64));
        }
        Ok(())
    }

    /// A length-prefixed, zero-padded string of at most `max` bytes.
    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, NarError> {
        let offset = self.pos;
        let len = self.u64()?;
        if len > max as u64 {
            return Err(NarError::TooLong { offset, max });
        }
        let mut s = vec![0u8; len as usize];
        self.fill(&mut s)?;
        self.padding(len)?;
        Ok(s)
    }

    fn expect(&mut self, token: &'static str) -> Result<(), NarError> {
        let offset = self.pos;
        match self.bytes(MAX_TOKEN) {
            Ok(s) if s == token.as_bytes() => Ok(()),
            Ok(_) | Err(NarError::TooLong { .. }) => Err(NarError::Unexpected {
                expected: token,
                offset,
            }),
            Err(e) => Err(e),
        }
    }

    fn token(&mut self, expected: &'static str) -> Result<Vec<u8>, NarError> {
        let offset = self.pos;
        self.bytes(MAX_TOKEN).map_err(|e| match e {
            NarError::TooLong { .. } => NarError::Unexpected { expected, offset },
            e => e,
        })
    }

    fn node(&mut self, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(NarError::TooDeep);
        }
        self.entries += 1;
        if self.entries > self.max_entries {
            return Err(NarError::TooManyEntries {
                max: self.max_entries,
            });
        }
        self.expect("(")?;
        self.expect("type")?;
        let offset = self.pos;
        match self.token("regular, symlink or directory")?.as_slice() {
            b"regular" => self.regular(),
            b"symlink" => {
                self.expect("target")?;
                let offset = self.pos;
                let target = self.bytes(MAX_TARGET)?;
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::Unexpected {
                        expected: "a symlink target",
                        offset,
                    });
                }
                self.expect(")")?;
                self.out(b"{\"type\":\"symlink\",\"target\":")?;
                self.out_str(&target)?;
                self.out(b"}")
            }
            b"directory" => self.directory(depth),
            _ => Err(NarError::Unexpected {
                expected: "regular, symlink or directory",
                offset,
            }),
        }
    }

    fn regular(&mut self) -> Result<(), NarError> {
        let offset = self.pos;
        let executable = match self.token("executable or contents")?.as_slice() {
            b"executable" => {
                self.expect("")?;
                self.expect("contents")?;
                true
            }
            b"contents" => false,
            _ => {
                return Err(NarError::Unexpected {
                    expected: "executable or contents",
                    offset,
                });
            }
        };
        let size = self.u64()?;
        let nar_offset = self.pos;
        let executable = if executable {
            ",\"executable\":true"
        } else {
            ""
        };
        let entry = format!(
            "{{\"type\":\"regular\",\"size\":{size}{executable},\"narOffset\":{nar_offset}}}"
        );
        self.out(entry.as_bytes())?;
        let mut left = size;
        let mut block = std::mem::take(&mut self.block);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            self.fill(&mut block[..n])?;
            left -= n as u64;
        }
        self.block = block;
        self.padding(size)?;
        self.expect(")")
    }

    fn directory(&mut self, depth: usize) -> Result<(), NarError> {
        self.out(b"{\"type\":\"directory\",\"entries\":{")?;
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let offset = self.pos;
            match self.token("entry or )")?.as_slice() {
                b")" => return self.out(b"}}"),
                b"entry" => {}
                _ => {
                    return Err(NarError::Unexpected {
                        expected: "entry or )",
                        offset,
                    });
                }
            }
            self.expect("(")?;
            self.expect("name")?;
            let name = self.bytes(MAX_NAME)?;
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(NarError::BadName(String::from_utf8_lossy(&name).into()));
            }
            // Byte order, strictly increasing: this also rules out duplicates.
            if previous.as_ref().is_some_and(|p| *p >= name) {
                return Err(NarError::Unsorted(String::from_utf8_lossy(&name).into()));
            }
            if previous.is_some() {
                self.out(b",")?;
            }
            self.out_str(&name)?;
            self.out(b":")?;
            self.expect("node")?;
            self.node(depth + 1)?;
            self.expect(")")?;
            previous = Some(name);
        }
    }
}

/// Writing NARs, for tests and tools that need real archives without a Nix store.
pub mod write {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }

    /// An in-memory tree to serialise.
    pub enum Entry<'a> {
        /// A regular file.
        File {
            /// Whether it is executable.
            executable: bool,
            /// Its bytes.
            contents: &'a [u8],
        },
        /// A symlink to the target.
        Symlink(&'a str),
        /// A directory of named entries, in the order to write them.
        Dir(Vec<(&'a str, Entry<'a>)>),
    }

    /// The NAR of the tree `root`.
    pub fn nar(root: &Entry) -> Vec<u8> {
        let mut out = Vec::new();
        string(&mut out, b"nix-archive-1");
        node(&mut out, root);
        out
    }

    fn node(out: &mut Vec<u8>, e: &Entry) {
        string(out, b"(");
        string(out, b"type");
        match e {
            Entry::File {
                executable,
                contents,
            } => {
                string(out, b"regular");
                if *executable {
                    string(out, b"executable");
                    string(out, b"");
                }
                string(out, b"contents");
                string(out, contents);
            }
            Entry::Symlink(t) => {
                string(out, b"symlink");
                string(out, b"target");
                string(out, t.as_bytes());
            }
            Entry::Dir(entries) => {
                string(out, b"directory");
                for (name, child) in entries {
                    string(out, b"entry");
                    string(out, b"(");
                    string(out, b"name");
                    string(out, name.as_bytes());
                    string(out, b"node");
                    node(out, child);
                    string(out, b")");
                }
            }
        }
        string(out, b")");
    }
}

#[cfg(test)]
mod tests {
    use super::write::{nar, Entry};
    use super::*;

    fn sample() -> Vec<u8> {
        nar(&Entry::Dir(vec![
            (
                "bin",
                Entry::Dir(vec![(
                    "hello",
                    Entry::File {
                        executable: true,
                        contents: b"#!/bin/sh\necho hi\n",
                    },
                )]),
            ),
            ("lib", Entry::Symlink("bin")),
            (
                "share",
                Entry::File {
                    executable: false,
                    contents: b"abc",
                },
            ),
        ]))
    }

    /// Validates `bytes` and returns the parsed listing.
    fn list(bytes: &[u8]) -> Result<serde_json::Value, NarError> {
        let mut listing = Vec::new();
        let summary = validate(bytes, &mut listing, u64::MAX)?;
        assert_eq!(summary.size, bytes.len() as u64);
        Ok(serde_json::from_slice(&listing).expect("the listing is JSON"))
    }

    #[test]
    fn accepts_a_valid_nar_and_lists_it() {
        let bytes = sample();
        let json = list(&bytes).unwrap();
        let hello = &json["root"]["entries"]["bin"]["entries"]["hello"];
        assert_eq!(hello["executable"], true);
        assert_eq!(hello["size"], 18);
        let off = hello["narOffset"].as_u64().unwrap() as usize;
        assert_eq!(&bytes[off..off + 18], b"#!/bin/sh\necho hi\n");
        assert!(json["root"]["entries"]["share"].get("executable").is_none());
        assert_eq!(json["root"]["entries"]["lib"]["target"], "bin");
    }

    #[test]
    fn a_single_file_nar() {
        let bytes = nar(&Entry::File {
            executable: false,
            contents: b"",
        });
        let json = list(&bytes).unwrap();
        assert_eq!(json["root"]["type"], "regular");
        assert_eq!(json["root"]["size"], 0);
    }

    #[test]
    fn names_are_escaped_and_entries_counted() {
        let file = || Entry::File {
            executable: false,
            contents: b"x",
        };
        let bytes = nar(&Entry::Dir(vec![
            ("a\"q", file()),
            ("b", Entry::Dir(vec![("c", Entry::Symlink("\u{7f}<\n>"))])),
        ]));
        let json = list(&bytes).unwrap();
        assert_eq!(json["root"]["entries"]["a\"q"]["size"], 1);
        assert_eq!(
            json["root"]["entries"]["b"]["entries"]["c"]["target"],
            "\u{7f}<\n>"
        );
        // The root, a"q, b and c.
        let entries = validate(&bytes[..], std::io::sink(), 4).unwrap().entries;
        assert_eq!(entries, 4);
        let err = validate(&bytes[..], std::io::sink(), 3).unwrap_err();
        assert!(matches!(err, NarError::TooManyEntries { max: 3 }), "{err}");
    }

    fn rejects(bytes: &[u8], needle: &str) {
        let err = validate(bytes, std::io::sink(), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }

    #[test]
    fn rejects_every_broken_rule() {
        let good = sample();
        rejects(&good[..good.len() - 8], "truncated");
        rejects(&[good.as_slice(), &[0u8; 8]].concat(), "after the end");
        let mut magic = good.clone();
        magic[8] = b'N';
        rejects(&magic, "magic");

        let file = || Entry::File {
            executable: false,
            contents: b"x",
        };
        rejects(
            &nar(&Entry::Dir(vec![("b", file()), ("a", file())])),
            "out of order",
        );
        rejects(
            &nar(&Entry::Dir(vec![("a", file()), ("a", file())])),
            "out of order",
        );
        rejects(
            &nar(&Entry::Dir(vec![("..", file())])),
            "invalid entry name",
        );
        rejects(
            &nar(&Entry::Dir(vec![("a/b", file())])),
            "invalid entry name",
        );
        rejects(&nar(&Entry::Dir(vec![("", file())])), "invalid entry name");

        // Non-zero padding after the one-byte contents "x".
        let mut padded = nar(&file());
        let at = padded.len() - 16 - 7; // first padding byte after "x"
        padded[at] = 1;
        rejects(&padded, "padding");

        let mut deep = file();
        for _ in 0..70 {
            deep = Entry::Dir(vec![("d", deep)]);
        }
        rejects(&nar(&deep), "deeper");
    }
}

#[cfg(test)]
mod robustness {
    use super::write::{nar, Entry};
    use super::*;

    /// Mutated archives (bytes flipped, cut, repeated) are refused or accepted, never a
    /// panic, whatever the mutation; the parser's limits keep memory small too.
    #[test]
    fn mutated_nars_never_panic() {
        let file = |c: &'static [u8]| Entry::File {
            executable: true,
            contents: c,
        };
        let base = nar(&Entry::Dir(vec![
            ("a", file(b"hello")),
            (
                "b",
                Entry::Dir(vec![("c", Entry::Symlink("../a")), ("d", file(b""))]),
            ),
        ]));
        let mut rng = crate::testing::Xorshift(0x2545_f491_4f6c_dd1d);
        let mut next = || rng.next();
        for _ in 0..20_000 {
            let mut m = base.clone();
            match next() % 4 {
                0 => {
                    let i = next() as usize % m.len();
                    m[i] = next() as u8;
                }
                1 => m.truncate(next() as usize % m.len()),
                2 => {
                    // A length field set to something huge.
                    let i = (next() as usize % (m.len() / 8)) * 8;
                    m[i..i + 8].copy_from_slice(&(next() | 1 << 40).to_le_bytes());
                }
                _ => {
                    let i = next() as usize % m.len();
                    let tail = m[i..].to_vec();
                    m.extend_from_slice(&tail);
                }
            }
            let _ = validate(m.as_slice(), std::io::sink(), 1000);
        }
    }
}

/// The `nix-nar` crate as a second, independent implementation: archives it makes of
/// real directory trees validate here, and the listing written here says what its
/// decoder reads.
#[cfg(test)]
pub(crate) mod second_implementation {
    use std::collections::BTreeMap;
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// What one entry of an archive is: (type, size, executable, offset, target).
    pub(crate) type Seen = BTreeMap<String, (String, u64, bool, u64, String)>;

    /// What a listing says of every entry.
    pub(crate) fn listed(listing: &[u8]) -> Seen {
        let json: serde_json::Value = serde_json::from_slice(listing).unwrap();
        let mut out = Seen::new();
        flatten("", &json["root"], &mut out);
        out
    }

    /// What the `nix-nar` crate's decoder reads of every entry of `archive`.
    pub(crate) fn decoded(archive: &[u8]) -> Seen {
        let decoder = nix_nar::Decoder::new(archive).unwrap();
        let mut theirs = Seen::new();
        for entry in decoder.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path.map(|p| p.to_string()).unwrap_or_default();
            let seen = match entry.content {
                nix_nar::Content::Directory => ("directory".into(), 0, false, 0, String::new()),
                nix_nar::Content::Symlink { target } => {
                    ("symlink".into(), 0, false, 0, target.to_string())
                }
                nix_nar::Content::File {
                    executable,
                    size,
                    offset,
                    ..
                } => ("regular".into(), size, executable, offset, String::new()),
            };
            theirs.insert(path, seen);
        }
        theirs
    }

    fn flatten(path: &str, node: &serde_json::Value, out: &mut Seen) {
        let kind = node["type"].as_str().unwrap().to_owned();
        let size = node["size"].as_u64().unwrap_or(0);
        let executable = node["executable"].as_bool().unwrap_or(false);
        let offset = node["narOffset"].as_u64().unwrap_or(0);
        let target = node["target"].as_str().unwrap_or("").to_owned();
        out.insert(path.to_owned(), (kind, size, executable, offset, target));
        if let Some(entries) = node["entries"].as_object() {
            for (name, child) in entries {
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                };
                flatten(&p, child, out);
            }
        }
    }

    fn build_tree(root: &std::path::Path) {
        let mut rng = crate::testing::Xorshift(11);
        let write = |p: &str, data: &[u8], mode: u32| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, data).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("bin/hello", b"#!/bin/sh\necho hello\n", 0o755);
        write("lib/libbig.so", &rng.bytes(300_000), 0o644);
        write("share/doc/README", b"read me\n", 0o644);
        write("share/empty-file", b"", 0o644);
        write("share/na\u{ef}ve \u{2603}", b"unicode name\n", 0o644);
        write("a/b/c/d/e/f/g/h/deep", b"deep\n", 0o644);
        std::fs::create_dir_all(root.join("share/empty-dir")).unwrap();
        std::os::unix::fs::symlink("bin/hello", root.join("hello")).unwrap();
        std::os::unix::fs::symlink("../lib", root.join("share/lib")).unwrap();
    }

    #[test]
    fn archives_of_the_nix_nar_crate_validate_and_the_listings_agree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        build_tree(&root);
        let mut archive = Vec::new();
        nix_nar::Encoder::new(&root)
            .unwrap()
            .read_to_end(&mut archive)
            .unwrap();

        let mut listing = Vec::new();
        let summary = validate(&archive[..], &mut listing, u64::MAX).unwrap();
        assert_eq!(summary.size, archive.len() as u64);
        let ours = listed(&listing);
        let theirs = decoded(&archive);
        assert_eq!(ours, theirs);
        assert_eq!(summary.entries, theirs.len() as u64);
        assert!(theirs.len() > 15, "the tree has every kind of entry");
        // The offsets point at the contents.
        let (_, size, _, offset, _) = &ours["bin/hello"];
        assert_eq!(
            &archive[*offset as usize..(*offset + *size) as usize],
            b"#!/bin/sh\necho hello\n"
        );
    }
}
