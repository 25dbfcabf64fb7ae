//! Registry authentication: parsing `WWW-Authenticate` challenges, finding credentials in
//! podman/Docker auth files (`auths`, `credHelpers`, `credsStore`), and reading token
//! responses.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use docker_credential::{CredentialRetrievalError, DockerCredential};

/// What a registry asks for in a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP basic authentication.
    Basic,
    /// A bearer token from the token service at `realm`.
    Bearer {
        /// Token service URL.
        realm: String,
        /// The `service` parameter to pass back, if any.
        service: Option<String>,
    },
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    /// User name and password (or access token used as password).
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json).
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(***)"),
        }
    }
}

impl Credential {
    /// The `Authorization` header value for basic authentication, if this is a password.
    pub(crate) fn basic_header(&self) -> Option<String> {
        match self {
            Credential::Basic { user, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            Credential::IdentityToken(_) => None,
        }
    }
}

/// Parses the values of all `WWW-Authenticate` headers of a response and picks the
/// challenge to answer: Bearer over Basic; other schemes are ignored.
pub(crate) fn parse_challenges<'a>(
    headers: impl IntoIterator<Item = &'a str>,
) -> Option<Challenge> {
    let mut basic = false;
    for header in headers {
        for (scheme, params) in split_challenges(header) {
            if scheme.eq_ignore_ascii_case("bearer") {
                let get = |k: &str| {
                    params
                        .iter()
                        .find(|(name, _)| name.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.clone())
                };
                if let Some(realm) = get("realm").filter(|r| !r.is_empty()) {
                    return Some(Challenge::Bearer {
                        realm,
                        service: get("service"),
                    });
                }
            } else if scheme.eq_ignore_ascii_case("basic") {
                basic = true;
            }
        }
    }
    basic.then_some(Challenge::Basic)
}

/// Splits one header value into `(scheme, [(param, value)])` challenges (RFC 7235 syntax:
/// a scheme token followed by comma-separated `name=value` pairs, values token or quoted).
fn split_challenges(header: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut rest = header.trim_start();
    while !rest.is_empty() {
        let (word, after) = take_token(rest);
        let after = after.trim_start();
        if word.is_empty() {
            // Stray separator or garbage: skip one character.
            let mut chars = rest.chars();
            chars.next();
            rest = chars.as_str().trim_start();
            continue;
        }
        if let Some(value_part) = after.strip_prefix('=') {
            // A parameter of the current challenge.
            let (value, tail) = take_value(value_part.trim_start());
            if let Some((_, params)) = out.last_mut() {
                params.push((word.to_string(), value));
            }
            rest = tail.trim_start().trim_start_matches(',').trim_start();
        } else {
            // A new challenge scheme.
            out.push((word.to_string(), Vec::new()));
            rest = after.trim_start_matches(',').trim_start();
        }
    }
    out
}

/// Takes an RFC 7230 token from the front of `s`.
fn take_token(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~/".contains(c)))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Takes a token or a quoted string (with backslash escapes) from the front of `s`.
fn take_value(s: &str) -> (String, &str) {
    let Some(quoted) = s.strip_prefix('"') else {
        let (tok, rest) = take_token(s);
        return (tok.to_string(), rest);
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &quoted[i + 1..]),
            '\\' => {
                if let Some((_, e)) = chars.next() {
                    value.push(e);
                }
            }
            c => value.push(c),
        }
    }
    // Unterminated quote: take the rest.
    (value, "")
}

/// The auth files consulted when no override is given: `$REGISTRY_AUTH_FILE`, then
/// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub(crate) fn default_auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        files.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|p| !p.is_empty()) {
        files.push(Path::new(&dir).join("config.json"));
    } else if let Some(home) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        files.push(Path::new(&home).join(".docker/config.json"));
    }
    files
}

/// The keys a registry's credentials may be stored under. Docker Hub's are traditionally
/// stored under its v1 index URL.
fn server_keys(registry: &str) -> Vec<String> {
    if registry == super::reference::DEFAULT_REGISTRY {
        vec![
            "https://index.docker.io/v1/".to_string(),
            registry.to_string(),
        ]
    } else {
        vec![registry.to_string()]
    }
}

/// Looks up credentials for `registry` (a reference's registry name, e.g. `docker.io` or
/// `127.0.0.1:5000`) in the first of `files` that has some. Missing files are skipped;
/// unreadable ones and failing credential helpers are errors (the message names them).
pub(crate) fn lookup_credential(
    files: &[PathBuf],
    registry: &str,
) -> Result<Option<Credential>, String> {
    for file in files {
        let config = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        serde_json::from_slice::<serde::de::IgnoredAny>(&config)
            .map_err(|e| format!("cannot parse {}: {e}", file.display()))?;
        for key in server_keys(registry) {
            match docker_credential::get_credential_from_reader(config.as_slice(), &key) {
                Ok(DockerCredential::UsernamePassword(user, password)) => {
                    return Ok(Some(Credential::Basic { user, password }));
                }
                Ok(DockerCredential::IdentityToken(t)) => {
                    return Ok(Some(Credential::IdentityToken(t)));
                }
                Err(CredentialRetrievalError::NoCredentialConfigured) => {}
                // A helper that has nothing stored for this server says so on stdout.
                Err(CredentialRetrievalError::HelperFailure { stdout, .. })
                    if stdout.to_ascii_lowercase().contains("not found") => {}
                Err(CredentialRetrievalError::HelperFailure { helper, stderr, .. }) => {
                    return Err(format!(
                        "credential helper {helper} (configured in {}) failed: {}",
                        file.display(),
                        stderr.trim()
                    ));
                }
                Err(e) => return Err(format!("{} ({})", e, file.display())),
            }
        }
    }
    Ok(None)
}

/// Extracts the token from a token service's JSON answer (`token` or `access_token`).
pub(crate) fn parse_token_response(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
    }
    let r: TokenResponse = serde_json::from_slice(body).ok()?;
    r.token
        .or(r.access_token)
        .filter(|t| !t.is_empty() && !t.contains(['\r', '\n']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer() {
        let h = r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#;
        assert_eq!(
            parse_challenges([h]),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
            })
        );
    }

    #[test]
    fn parses_basic_and_prefers_bearer() {
        assert_eq!(
            parse_challenges([r#"Basic realm="Registry Realm""#]),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenges(["Basic realm=x, Bearer realm=\"http://h/t\""]),
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: None
            })
        );
        assert_eq!(
            parse_challenges(["basic realm=a", "BEARER realm=\"http://h/t\", service=s"]),
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: Some("s".into())
            })
        );
    }

    #[test]
    fn handles_escapes_and_garbage() {
        assert_eq!(
            parse_challenges([r#"Bearer realm="http://h/t\"x",service="a\\b""#]),
            Some(Challenge::Bearer {
                realm: "http://h/t\"x".into(),
                service: Some("a\\b".into())
            })
        );
        for junk in [
            "",
            "   ",
            "=",
            ",,,",
            "Bearer",
            "Bearer realm=\"",
            "\"\"",
            "Negotiate abc==",
        ] {
            assert_eq!(parse_challenges([junk]), None, "{junk:?}");
        }
    }

    fn write_config(dir: &Path, name: &str, json: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn config_json_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        let cfg = write_config(
            dir.path(),
            "config.json",
            &format!(
                r#"{{"auths": {{
                    "127.0.0.1:5000": {{"auth": "{auth}"}},
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "quay.example": {{"username": "u", "password": "p"}},
                    "tok.example": {{"identitytoken": "refresh"}}
                }}}}"#
            ),
        );
        let files = [dir.path().join("missing.json"), cfg];
        let cred = Credential::Basic {
            user: "user".into(),
            password: "pa:ss".into(),
        };
        let basic = Some(cred.clone());
        assert_eq!(lookup_credential(&files, "127.0.0.1:5000").unwrap(), basic);
        assert_eq!(lookup_credential(&files, "docker.io").unwrap(), basic);
        assert_eq!(
            lookup_credential(&files, "quay.example").unwrap(),
            Some(Credential::Basic {
                user: "u".into(),
                password: "p".into()
            })
        );
        assert_eq!(
            lookup_credential(&files, "tok.example").unwrap(),
            Some(Credential::IdentityToken("refresh".into()))
        );
        assert_eq!(lookup_credential(&files, "other:1").unwrap(), None);
        assert_eq!(cred.basic_header().unwrap(), format!("Basic {auth}"));
    }

    #[test]
    fn first_file_with_credentials_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_config(
            dir.path(),
            "auth.json",
            r#"{"auths": {"h1": {"username": "a", "password": "1"}}}"#,
        );
        let b = write_config(
            dir.path(),
            "config.json",
            r#"{"auths": {"h1": {"username": "b", "password": "2"}, "h2": {"username": "b", "password": "2"}}}"#,
        );
        let files = [a, b];
        let user = |c: Option<Credential>| match c {
            Some(Credential::Basic { user, .. }) => user,
            other => panic!("{other:?}"),
        };
        assert_eq!(user(lookup_credential(&files, "h1").unwrap()), "a");
        assert_eq!(user(lookup_credential(&files, "h2").unwrap()), "b");
    }

    #[test]
    fn bad_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write_config(dir.path(), "broken.json", "{not json");
        let err = lookup_credential(&[bad], "h").unwrap_err();
        assert!(err.contains("broken.json"), "{err}");
        let helper = write_config(
            dir.path(),
            "helper.json",
            r#"{"credHelpers": {"h": "kiln-test-absent"}}"#,
        );
        assert!(lookup_credential(&[helper], "h").is_err());
    }

    #[test]
    fn token_response() {
        assert_eq!(
            parse_token_response(br#"{"token":"abc"}"#),
            Some("abc".into())
        );
        assert_eq!(
            parse_token_response(br#"{"access_token":"xyz","expires_in":60}"#),
            Some("xyz".into())
        );
        assert_eq!(parse_token_response(b"{}"), None);
        assert_eq!(parse_token_response(b"nope"), None);
        assert_eq!(parse_token_response(br#"{"token":"a\nb"}"#), None);
    }
}
