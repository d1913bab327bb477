//! The bearer token that guards the admin API and the table WebSocket.
//!
//! Taken from `agent.token_file` or, when none is configured, generated once into
//! `state_dir/token` (mode 0600) so a local stack works with no setup and the CLI finds it.
//! Comparison is constant-time so response timing says nothing about how much of a guess matched.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    Empty(PathBuf),
    #[error("the token in {0} has bytes that cannot go in an HTTP header")]
    Unprintable(PathBuf),
    #[error("cannot create the token file {path}: {cause}")]
    Create {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl Token {
    pub fn read(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|cause| TokenError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let t = text.trim();
        if t.is_empty() {
            return Err(TokenError::Empty(path.to_path_buf()));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Unprintable(path.to_path_buf()));
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// The configured file, or the generated one in `state_dir` (created on first use).
    pub fn load_or_generate(
        configured: Option<&Path>,
        state_dir: &Path,
    ) -> Result<(Token, PathBuf), TokenError> {
        if let Some(p) = configured {
            return Token::read(p).map(|t| (t, p.to_path_buf()));
        }
        let path = state_dir.join("token");
        if path.exists() {
            return Token::read(&path).map(|t| (t, path));
        }
        let create = |cause| TokenError::Create {
            path: path.clone(),
            cause,
        };
        std::fs::create_dir_all(state_dir).map_err(create)?;
        let mut raw = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(create)?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("{hex}\n").as_bytes()))
            .map_err(create)?;
        Ok((Token(hex.into_bytes()), path))
    }

    /// Does an `Authorization` header value carry this token?
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(given) = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
        else {
            return false;
        };
        given.ct_eq(&self.0).into()
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let t = Token(b"s3cret".to_vec());
        assert!(t.admits(Some(b"Bearer s3cret")));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Basic s3cret",
            b"s3cret",
            b"Bearer ",
        ] {
            assert!(!t.admits(Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!t.admits(None));
    }

    #[test]
    fn a_generated_token_is_kept_and_private() {
        let dir = std::env::temp_dir().join(format!("rusty-agent-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, path) = Token::load_or_generate(None, &dir).unwrap();
        let (b, _) = Token::load_or_generate(None, &dir).unwrap();
        assert_eq!(a.as_str(), b.as_str());
        assert_eq!(a.as_str().len(), 48);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "token file is readable by others: {mode:o}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
