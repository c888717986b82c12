//! Who may do what. Tokens are random secrets; the server keeps only their SHA-256 and
//! compares in constant time. For now the admin token is the only token; scoped tokens
//! grow here without touching the handlers, which only ask `authorize`.

use std::path::Path;

use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::nix::Sha256;

/// A token as presented by a client. `Debug` never shows it.
pub struct Token(Zeroizing<String>);

impl Token {
    /// A token as received.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// A new random token: 32 bytes from the operating system, in hex.
    pub fn generate() -> Self {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut()).expect("the operating system's random source failed");
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self::new(hex)
    }

    /// The secret itself, to write it where its owner will find it.
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

/// What a request wants to do to a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read narinfos, NARs, listings, logs.
    Pull,
    /// Upload NARs and publish narinfos, logs, realisations.
    Push,
}

/// Decides who may do what.
pub struct Authorizer {
    admin: Sha256,
}

impl Authorizer {
    /// An authorizer that knows the admin token.
    pub fn new(admin: &Token) -> Self {
        Self {
            admin: admin.digest(),
        }
    }

    fn is_admin(&self, token: &Token) -> bool {
        !token.0.is_empty() && bool::from(token.digest().as_bytes().ct_eq(self.admin.as_bytes()))
    }

    /// Allows `permission` to the bearer of `token` (None when the request carried no
    /// credentials) on a cache that is `public` or not. Anyone may pull from a public
    /// cache.
    pub fn authorize(
        &self,
        token: Option<&Token>,
        public: bool,
        permission: Permission,
    ) -> Result<()> {
        if permission == Permission::Pull && public {
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
            crate::secret_file::write(&path, token.expose())?;
            Ok((token, true))
        }
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_caches_are_readable_and_everything_else_needs_the_token() {
        let admin = Token::generate();
        let auth = Authorizer::new(&admin);
        let same = Token::new(admin.expose().to_owned());
        let wrong = Token::new("wrong".into());
        let empty = Token::new(String::new());
        assert!(auth.authorize(None, true, Permission::Pull).is_ok());
        assert!(auth.authorize(Some(&wrong), true, Permission::Pull).is_ok());
        for (token, public) in [
            (None, true),
            (Some(&wrong), true),
            (Some(&empty), false),
            (None, false),
        ] {
            assert!(matches!(
                auth.authorize(token, public, Permission::Push),
                Err(Error::Unauthorized)
            ));
        }
        assert!(auth.authorize(None, false, Permission::Pull).is_err());
        assert!(auth.authorize(Some(&same), false, Permission::Pull).is_ok());
        assert!(auth.authorize(Some(&same), true, Permission::Push).is_ok());
        assert_eq!(format!("{same:?}"), "Token(<redacted>)");
    }
}
