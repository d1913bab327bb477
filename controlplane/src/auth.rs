//! The bearer token that guards the admin API and the table WebSocket.
//!
//! Taken from `agent.token_file` or, when none is configured, generated once into
//! `state_dir/token` (mode 0600) so a local stack works with no setup and the CLI finds it.
//! Reading and comparing are `rusty_shared::auth`'s, the same code the data plane runs.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rusty_shared::auth::{bearer_matches, read_token, TokenFileError};

#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    File(#[from] TokenFileError),
    #[error("cannot create the token file {path}: {cause}")]
    Create {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl Token {
    pub fn read(path: &Path) -> Result<Token, TokenError> {
        Ok(Token(read_token(path)?.into_bytes()))
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
        bearer_matches(authorization, &self.0)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
