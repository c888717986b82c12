//! A streaming NAR (`nix-archive-1`) validator that also builds the `.ls` listing.
//!
//! It pulls from any `Read` and keeps only names and symlink targets in memory: file
//! contents pass through in blocks, so a NAR of any size is checked in constant memory
//! (plus the listing, which grows with the number of entries, not their size).

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::Serialize;

/// Current Nix's limits; older clients never produce more.
const MAX_NAME: usize = 255;
const MAX_TARGET: usize = 4095;
const MAX_DEPTH: usize = 64;
/// The longest token the grammar has (`nix-archive-1`, `executable`, ...).
const MAX_TOKEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("NAR is truncated")]
    Truncated,
    #[error("not a NAR: bad magic")]
    BadMagic,
    #[error("NAR: expected {expected:?} at byte {offset}")]
    Unexpected { expected: &'static str, offset: u64 },
    #[error("NAR: string at byte {offset} is longer than {max} bytes")]
    TooLong { offset: u64, max: usize },
    #[error("NAR: non-zero padding at byte {0}")]
    Padding(u64),
    #[error("NAR: invalid entry name {0:?}")]
    BadName(String),
    #[error("NAR: entry {0:?} is out of order or repeated")]
    Unsorted(String),
    #[error("NAR: nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("NAR: data after the end of the archive")]
    TrailingData,
    /// An error of the underlying reader (a decompressor, the network), not of the NAR.
    #[error("{0}")]
    Read(#[source] io::Error),
}

/// The `.ls` listing Nix's binary cache format defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Node {
    Regular {
        size: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        executable: bool,
        #[serde(rename = "narOffset")]
        nar_offset: u64,
    },
    Symlink {
        target: String,
    },
    Directory {
        entries: BTreeMap<String, Node>,
    },
}

#[derive(Serialize)]
struct Listing<'a> {
    version: u32,
    root: &'a Node,
}

impl Node {
    /// The JSON body of `<hash>.ls`.
    pub fn to_listing_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Listing {
            version: 1,
            root: self,
        })
        .expect("a listing always serialises")
    }
}

struct Parser<R> {
    r: R,
    pos: u64,
    block: Vec<u8>,
}

/// Reads one whole NAR from `r`, checks every rule, and returns its listing.
/// `r` must end exactly where the NAR does.
pub fn validate<R: Read>(r: R) -> Result<Node, NarError> {
    let mut p = Parser {
        r,
        pos: 0,
        block: vec![0; 64 * 1024],
    };
    if p.bytes(MAX_TOKEN)? != b"nix-archive-1" {
        return Err(NarError::BadMagic);
    }
    let root = p.node(0)?;
    let mut extra = [0u8; 1];
    loop {
        match p.r.read(&mut extra) {
            Ok(0) => return Ok(root),
            Ok(_) => return Err(NarError::TrailingData),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NarError::Read(e)),
        }
    }
}

impl<R: Read> Parser<R> {
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

    fn node(&mut self, depth: usize) -> Result<Node, NarError> {
        if depth > MAX_DEPTH {
            return Err(NarError::TooDeep);
        }
        self.expect("(")?;
        self.expect("type")?;
        let offset = self.pos;
        let node = match self.token("regular, symlink or directory")?.as_slice() {
            b"regular" => self.regular()?,
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
                Node::Symlink {
                    target: String::from_utf8_lossy(&target).into_owned(),
                }
            }
            b"directory" => self.directory(depth)?,
            _ => {
                return Err(NarError::Unexpected {
                    expected: "regular, symlink or directory",
                    offset,
                });
            }
        };
        Ok(node)
    }

    fn regular(&mut self) -> Result<Node, NarError> {
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
        let mut left = size;
        let mut block = std::mem::take(&mut self.block);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            self.fill(&mut block[..n])?;
            left -= n as u64;
        }
        self.block = block;
        self.padding(size)?;
        self.expect(")")?;
        Ok(Node::Regular {
            size,
            executable,
            nar_offset,
        })
    }

    fn directory(&mut self, depth: usize) -> Result<Node, NarError> {
        let mut entries = BTreeMap::new();
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let offset = self.pos;
            match self.token("entry or )")?.as_slice() {
                b")" => return Ok(Node::Directory { entries }),
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
            let shown = String::from_utf8_lossy(&name).into_owned();
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(NarError::BadName(shown));
            }
            // Byte order, strictly increasing: this also rules out duplicates.
            if previous.as_ref().is_some_and(|p| *p >= name) {
                return Err(NarError::Unsorted(shown));
            }
            self.expect("node")?;
            let child = self.node(depth + 1)?;
            self.expect(")")?;
            entries.insert(shown, child);
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
        File {
            executable: bool,
            contents: &'a [u8],
        },
        Symlink(&'a str),
        Dir(Vec<(&'a str, Entry<'a>)>),
    }

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

    #[test]
    fn accepts_a_valid_nar_and_lists_it() {
        let bytes = sample();
        let root = validate(bytes.as_slice()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&root.to_listing_json()).unwrap();
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
        assert!(matches!(
            validate(bytes.as_slice()).unwrap(),
            Node::Regular { size: 0, .. }
        ));
    }

    fn rejects(bytes: &[u8], needle: &str) {
        let err = validate(bytes).unwrap_err().to_string();
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
            let _ = validate(m.as_slice());
        }
    }
}
