//! cachet: a self-hosted Nix binary cache server with chunk-level deduplication.
//! ARCHITECTURE.md maps the modules and their invariants.
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod allocator;
pub mod app;
pub mod auth;
pub mod body;
pub mod budget;
pub mod caches;
pub mod clock;
pub mod config;
pub mod coord;
pub mod error;
pub mod gc;
pub mod grants;
pub mod http;
pub mod index;
pub mod ingest;
pub mod jobs;
pub mod keyfiles;
pub mod keyseal;
pub mod metrics;
pub mod migrate;
pub mod nix;
pub mod pins;
pub mod publish;
pub mod quota;
pub mod removal;
pub mod secret_file;
pub mod serve;
pub mod server;
pub mod signatures;
pub mod stall;
pub mod store;
pub mod testing;
pub mod verify;

/// The layering of ARCHITECTURE.md's code map holds: a module names (`crate::…`) only
/// modules of its own row or of rows before it. Test modules may reach anywhere.
#[cfg(test)]
mod layering {
    use std::collections::HashMap;
    use std::path::Path;

    /// Module name → its row in the code map.
    fn rows() -> HashMap<String, usize> {
        let map = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md"))
            .unwrap();
        let start = map.find("## Code map").unwrap();
        let mut rows = HashMap::new();
        let table = map[start..].lines().filter(|l| l.starts_with("| `"));
        for (row, line) in table.enumerate() {
            let first_cell = line.split(" | ").next().unwrap();
            for name in first_cell.split('`').skip(1).step_by(2) {
                let name = name.trim_end_matches(".rs").trim_end_matches('/');
                rows.insert(name.to_owned(), row);
            }
        }
        rows
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn modules_use_only_the_rows_before_theirs() {
        let rows = rows();
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
        let mut files = Vec::new();
        sources(root, &mut files);
        let mut wrong = Vec::new();
        for f in files {
            let rel = f.strip_prefix(root).unwrap();
            let top = rel
                .iter()
                .next()
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches(".rs");
            if top == "lib" {
                continue;
            }
            let own = *rows
                .get(top)
                .unwrap_or_else(|| panic!("{top} is not in the code map"));
            let text = std::fs::read_to_string(&f).unwrap();
            let code: String = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for (i, _) in code.match_indices("crate::") {
                let used: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if let Some(&row) = rows.get(&used) {
                    if row > own {
                        wrong.push(format!("{} uses crate::{used}", rel.display()));
                    }
                }
            }
        }
        wrong.sort();
        wrong.dedup();
        assert!(wrong.is_empty(), "uses of later rows: {wrong:#?}");
    }
}
