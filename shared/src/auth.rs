//! The bearer token both planes use: the agent checks it on its API and table stream, the data
//! plane sends it to the agent and checks it on its own admin listener. One way to read it from a
//! file and one constant-time comparison, so the two sides cannot disagree on what a token is.

use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    Empty(PathBuf),
    #[error("the token in {0} has bytes that cannot go in an HTTP header")]
    Unprintable(PathBuf),
}

/// The token in `path`: surrounding whitespace trimmed, not empty, visible ASCII only (it goes
/// into an `Authorization` header).
pub fn read_token(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|cause| TokenFileError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty(path.to_path_buf()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenFileError::Unprintable(path.to_path_buf()));
    }
    Ok(token.to_owned())
}

/// Does an `Authorization` header value carry `token`? The scheme is case-insensitive
/// (RFC 9110 §11.1); the token is compared in constant time, so response timing says nothing
/// about how much of a guess matched.
pub fn bearer_matches(authorization: Option<&[u8]>, token: &[u8]) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    value[7..].ct_eq(token).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let t = b"s3cret";
        assert!(bearer_matches(Some(b"Bearer s3cret"), t));
        assert!(bearer_matches(Some(b"bearer s3cret"), t));
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Basic s3cret",
            b"s3cret",
            b"Bearer ",
        ] {
            assert!(
                !bearer_matches(Some(bad), t),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(!bearer_matches(None, t));
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("rusty-shared-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  abc123\n").unwrap();
        assert_eq!(read_token(&file).unwrap(), "abc123");
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(read_token(&file), Err(TokenFileError::Empty(_))));
        std::fs::write(&file, "a b").unwrap();
        assert!(matches!(
            read_token(&file),
            Err(TokenFileError::Unprintable(_))
        ));
        assert!(matches!(
            read_token(&dir.join("none")),
            Err(TokenFileError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
