//! Who may do what. Tokens are random secrets; the server keeps only their SHA-256 and
//! compares in constant time. For now the admin token is the only token; scoped tokens
//! grow here without touching the handlers, which only ask `authorize`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::caches::Cache;
use crate::error::{Error, Result};
use crate::nix::Sha256;

/// A token as presented by a client. `Debug` never shows it.
pub struct Token(Zeroizing<String>);

impl Token {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    pub fn generate() -> Self {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut()).expect("the operating system's random source failed");
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(hex)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn digest(&self) -> Sha256 {
        Sha256::digest(self.0.as_bytes())
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Pull,
    Push,
}

pub struct Authorizer {
    admin: Sha256,
}

impl Authorizer {
    pub fn new(admin: &Token) -> Self {
        Self {
            admin: admin.digest(),
        }
    }

    fn is_admin(&self, token: &Token) -> bool {
        !token.0.is_empty() && bool::from(token.digest().as_bytes().ct_eq(self.admin.as_bytes()))
    }

    /// Allows `permission` on `cache` to the bearer of `token` (None when the request
    /// carried no credentials). Anyone may pull from a public cache.
    pub fn authorize(
        &self,
        token: Option<&Token>,
        cache: Option<&Cache>,
        permission: Permission,
    ) -> Result<()> {
        if permission == Permission::Pull && cache.is_some_and(|c| c.public) {
            return Ok(());
        }
        match token {
            Some(t) if self.is_admin(t) => Ok(()),
            // No token, or one we do not know: the client must send (another) one.
            _ => Err(Error::Unauthorized),
        }
    }
}

/// Reads the admin token from `<data_dir>/admin-token`, creating it (mode 0600) on
/// first start. Returns the token and whether it was created now.
pub fn load_or_create_admin_token(data_dir: &Path) -> anyhow::Result<(Token, bool)> {
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
            Ok((Token::new(token), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = Token::generate();
            write_secret_file(&path, token.expose())?;
            Ok((token, true))
        }
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

/// Writes a file readable by its owner only, whole or not at all: written to a
/// temporary name, synced, then renamed, so a crash never leaves a partial secret.
pub fn write_secret_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
