//! The names under which build logs and realisations are kept, from the URLs clients
//! use: `log/<drv>` (a derivation's basename), `realisations/<id>.doi` (Nix 2.8's
//! `sha256:<hash>!<output>`), and current Nix's `build-trace-v2/<drv>/<output>.doi`.
//! Each name is checked whole, so a key never holds a `/` the client chose or a path
//! of its own making.

use super::store_path::StorePath;

/// What a log is kept under: the derivation's basename, `<hash>-<name>.drv`.
pub fn log_key(drv: &str) -> Option<String> {
    let path = StorePath::from_basename(drv).ok()?;
    path.name().ends_with(".drv").then(|| path.to_string())
}

/// What a realisation of Nix 2.8 is kept under: its id `sha256:<hash>!<output>`,
/// given with its `.doi` suffix.
pub fn realisation_key(id: &str) -> Option<String> {
    let stem = id.strip_suffix(".doi")?;
    let (hash, output) = stem.split_once('!')?;
    let digits = hash.strip_prefix("sha256:")?;
    let ok = !digits.is_empty()
        && digits.bytes().all(|c| c.is_ascii_alphanumeric())
        && output_name_ok(output);
    ok.then(|| stem.to_owned())
}

/// What a build trace entry of current Nix is kept under: `<drv>/<output>`, from the
/// derivation's basename and `<output>.doi`.
pub fn trace_key(drv: &str, output: &str) -> Option<String> {
    let drv = log_key(drv)?;
    let output = output.strip_suffix(".doi").filter(|o| output_name_ok(o))?;
    Some(format!("{drv}/{output}"))
}

/// An output name: what Nix allows in one (no leading dot, so never `.` or `..`), and
/// short.
fn output_name_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_+.".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_whole() {
        let drv = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv";
        assert_eq!(log_key(drv).unwrap(), drv);
        assert!(log_key("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello").is_none());
        assert!(log_key("../etc/passwd").is_none());
        let id = format!("sha256:{}!out.doi", "a".repeat(64));
        assert_eq!(realisation_key(&id).unwrap(), &id[..id.len() - 4]);
        for bad in [
            "sha256:ab!out",
            "md5:ab!out.doi",
            "sha256:a/b!out.doi",
            "sha256:ab!o/t.doi",
            "sha256!out.doi",
        ] {
            assert!(realisation_key(bad).is_none(), "{bad}");
        }
        assert_eq!(trace_key(drv, "out.doi").unwrap(), format!("{drv}/out"));
        assert!(trace_key(drv, "..").is_none());
        assert!(trace_key(drv, "../x.doi").is_none());
        assert!(realisation_key("sha256:!out.doi").is_none());
    }

    /// Found by the `names` fuzz target: `<drv>/..doi` gave the key `<drv>/..`.
    #[test]
    fn an_output_named_dot_dot_is_refused() {
        let drv = "amhfscnw2qd9i5di3h12m34ryr5zf403-Ah.d0r5yzr43-Ah.drv";
        assert!(log_key(drv).is_some());
        assert!(trace_key(drv, "..doi").is_none());
        assert!(trace_key(drv, "...doi").is_none());
        assert!(trace_key(drv, ".out.doi").is_none());
        let id = format!("sha256:{}!...doi", "a".repeat(64));
        assert!(realisation_key(&id).is_none());
    }
}
