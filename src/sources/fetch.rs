//! Downloading `ADD <url>` sources: an HTTP(S) GET streamed into a scratch file, hashed as it
//! arrives, checked against `--checksum`, with the file name from the URL path and the mtime
//! from `Last-Modified`, as Docker does.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::Agent;

use crate::digest::{Digest, HashingWriter};

/// A downloaded file.
#[derive(Debug)]
pub struct Fetched {
    /// Where it was written.
    pub path: PathBuf,
    /// Its name: the last segment of the URL path (`index.html` when empty).
    pub file_name: String,
    /// The sha256 of its content.
    pub digest: Digest,
    /// `Last-Modified`, in unix seconds.
    pub mtime: Option<i64>,
}

/// A failed download; names the URL.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request failed.
    #[error("downloading {url}: {message}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The content does not match `--checksum`.
    #[error("downloading {url}: checksum mismatch: expected {expected}, got {actual}")]
    Checksum {
        /// The URL.
        url: String,
        /// What `--checksum` said.
        expected: String,
        /// What arrived.
        actual: Digest,
    },
    /// Writing the scratch file failed.
    #[error("downloading {url} to {path}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// The scratch file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Downloads `url` into `dir`; with `checksum` (`sha256:<hex>`) the content must match it.
pub fn fetch(url: &str, dir: &Path, checksum: Option<&str>) -> Result<Fetched, FetchError> {
    let http = |message: String| FetchError::Http {
        url: url.to_string(),
        message,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(http("only http:// and https:// URLs are supported".into()));
    }
    let agent: Agent = Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .max_redirects(10)
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| http(e.to_string()))?;
    let mtime = response
        .headers()
        .get("last-modified")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date);
    let file_name = file_name_of(url);
    let path = dir.join(&file_name);
    let io = |source| FetchError::Io {
        url: url.to_string(),
        path: path.clone(),
        source,
    };
    let file = std::fs::File::create(&path).map_err(io)?;
    let mut writer = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    std::io::copy(&mut response.body_mut().as_reader(), &mut writer)
        .map_err(|e| http(e.to_string()))?;
    let (buffered, digest, _) = writer.finish();
    buffered
        .into_inner()
        .map_err(|e| io(e.into_error()))?
        .flush()
        .map_err(io)?;
    if let Some(expected) = checksum
        && expected != digest.to_string()
    {
        return Err(FetchError::Checksum {
            url: url.to_string(),
            expected: expected.to_string(),
            actual: digest,
        });
    }
    Ok(Fetched {
        path,
        file_name,
        digest,
        mtime,
    })
}

/// The file name an ADD of `url` creates: the last path segment, without query or fragment.
pub fn file_name_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme.split(['?', '#']).next().unwrap_or("");
    let path = path.split_once('/').map_or("", |(_, p)| p);
    match path.rsplit('/').next() {
        Some(name) if !name.is_empty() && name != "." && name != ".." => name.to_string(),
        _ => "index.html".to_string(),
    }
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) into unix seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace().skip(1);
    let day: i64 = parts.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? as i64 + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Sun, 22 Nov 2026 12:00:00 GMT"),
            Some(1_795_348_800)
        );
        assert_eq!(parse_http_date("garbage"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
    }

    #[test]
    fn file_names() {
        assert_eq!(
            file_name_of("https://example.test/a/b/tool.tar.gz?x=1#f"),
            "tool.tar.gz"
        );
        assert_eq!(file_name_of("http://example.test/"), "index.html");
        assert_eq!(file_name_of("http://example.test"), "index.html");
        assert_eq!(file_name_of("http://example.test/dir/.."), "index.html");
    }
}
