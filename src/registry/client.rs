//! The blocking OCI distribution client: manifests and blobs between a registry and
//! `Read`/`Write` handles, with scheme detection, basic and bearer-token authentication,
//! manual redirect handling (credentials never leave the registry's host) and bounded
//! retries with exponential backoff.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ureq::http::{self, Method, Response, Uri};
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::{Agent, SendBody};

use super::RegistryError;
use super::auth::{self, Challenge, Credential};
use super::document::manifest_media_type;
use super::reference::{Reference, is_loopback_host};
use crate::digest::{Digest, HashingWriter};

/// OCI image manifest media type.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest (schema 2) media type.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Attempts per request (or per upload) before giving up.
const MAX_ATTEMPTS: u32 = 5;
/// First backoff delay; doubled after each failed attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest `Retry-After` we honour.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
/// Redirects followed per request.
const MAX_REDIRECTS: u32 = 10;
/// Largest manifest accepted (the limit containerd uses).
const MANIFEST_LIMIT: u64 = 4 << 20;
/// Largest token-service answer accepted.
const TOKEN_LIMIT: u64 = 1 << 20;
/// How much of an error body is read for its message.
const ERROR_BODY_LIMIT: u64 = 16 << 10;
/// How long the https probe may take when plain http is the fallback (a plain-http
/// server may never answer a TLS handshake).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The API endpoint of the default registry (`docker.io` is only its name).
const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// How a [`Client`] connects and authenticates.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Verify TLS certificates. `false` also allows plain http to any registry: https is
    /// tried first (without verification) and http is the fallback, as skopeo does.
    pub tls_verify: bool,
    /// Credentials file to use instead of the defaults (`$REGISTRY_AUTH_FILE`, then
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
    pub auth_file: Option<PathBuf>,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            tls_verify: true,
            auth_file: None,
            user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// What [`Client::push_blob`] had to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The registry already had the blob in the repository.
    Exists,
    /// The blob was mounted from another repository of the same registry.
    Mounted,
    /// The blob was uploaded.
    Uploaded,
}

/// A blocking registry client. One client serves any number of registries and threads; it
/// remembers per registry host the scheme, the auth challenge, the credentials and the
/// bearer tokens (per scope).
pub struct Client {
    agent: Agent,
    opts: ClientOptions,
    hosts: Mutex<HashMap<String, HostState>>,
}

/// What the client learnt about one registry endpoint.
#[derive(Default)]
struct HostState {
    /// `https://host` or `http://host`, once probed.
    base: Option<String>,
    /// The last authentication challenge seen.
    challenge: Option<Challenge>,
    /// Credentials, once looked up (`Some(None)`: there are none).
    credential: Option<Option<Credential>>,
    /// Bearer tokens by scope.
    tokens: HashMap<String, String>,
}

/// One registry operation: the reference (for messages), the endpoint and the token scopes.
struct Op<'a> {
    r: &'a Reference,
    endpoint: String,
    scopes: Vec<String>,
}

impl Op<'_> {
    fn host(&self) -> String {
        self.r.registry.clone()
    }
    fn reference(&self) -> String {
        self.r.to_string()
    }
    fn scope_key(&self) -> String {
        self.scopes.join(" ")
    }
    fn transport(&self, detail: impl ToString) -> RegistryError {
        RegistryError::Transport {
            host: self.host(),
            reference: self.reference(),
            detail: detail.to_string(),
        }
    }
    fn auth(&self, detail: impl ToString) -> RegistryError {
        RegistryError::Auth {
            host: self.host(),
            reference: self.reference(),
            detail: detail.to_string(),
        }
    }
    fn protocol(&self, detail: impl ToString) -> RegistryError {
        RegistryError::Protocol {
            host: self.host(),
            reference: self.reference(),
            detail: detail.to_string(),
        }
    }
    fn not_found(&self, what: impl ToString) -> RegistryError {
        RegistryError::NotFound {
            host: self.host(),
            reference: self.reference(),
            what: what.to_string(),
        }
    }
    fn io(&self, source: io::Error) -> RegistryError {
        RegistryError::Io {
            host: self.host(),
            reference: self.reference(),
            source,
        }
    }
    fn mismatch(&self, expected: Digest, actual: Digest) -> RegistryError {
        RegistryError::DigestMismatch {
            host: self.host(),
            reference: self.reference(),
            expected,
            actual,
        }
    }
    /// An error for an unexpected status, with the registry's error message.
    fn status(&self, resp: &mut Response<ureq::Body>) -> RegistryError {
        RegistryError::Status {
            host: self.host(),
            reference: self.reference(),
            status: resp.status().as_u16(),
            detail: error_detail(resp),
        }
    }
}

/// The outcome of one failed attempt.
enum Failure {
    /// Worth another attempt (after the delay the server asked for, if any).
    Retry(Box<RegistryError>, Option<Duration>),
    /// Final.
    Fatal(Box<RegistryError>),
}

impl Failure {
    fn retry(e: RegistryError, after: Option<Duration>) -> Failure {
        Failure::Retry(Box::new(e), after)
    }
    fn fatal(e: RegistryError) -> Failure {
        Failure::Fatal(Box::new(e))
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        Failure::fatal(e)
    }
}

/// A request body.
enum Body<'a> {
    /// No body.
    Empty,
    /// These bytes, with this content type.
    Bytes(&'a [u8], &'a str),
    /// `size` bytes from a freshly opened reader for every attempt.
    Stream {
        open: &'a dyn Fn() -> io::Result<Box<dyn Read>>,
        size: u64,
    },
}

/// A reader that keeps the error of the local source, to tell it apart from network
/// errors after the HTTP stack has wrapped it.
struct TrackedReader<R> {
    inner: R,
    error: Option<io::Error>,
}

impl<R: Read> Read for TrackedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            self.error = Some(io::Error::new(e.kind(), e.to_string()));
        })
    }
}

impl Client {
    /// Creates a client. TLS roots come from the system (honouring `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR`), falling back to the bundled Mozilla roots when none are found.
    pub fn new(opts: ClientOptions) -> Client {
        let tls = if opts.tls_verify {
            let certs: Vec<Certificate<'static>> = rustls_native_certs::load_native_certs()
                .certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            let roots = if certs.is_empty() {
                RootCerts::WebPki
            } else {
                RootCerts::new_with_certs(&certs)
            };
            TlsConfig::builder().root_certs(roots).build()
        } else {
            TlsConfig::builder().disable_verification(true).build()
        };
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(opts.user_agent.as_str())
            .tls_config(tls)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .timeout_per_write(Some(Duration::from_secs(120)))
            .build();
        Client {
            agent: Agent::new_with_config(config),
            opts,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// GETs a manifest by tag or digest, accepting OCI manifests and indexes and Docker
    /// schema 2 manifests and lists. Returns the media type, the exact bytes and their
    /// digest; the digest is verified when the reference pins one (or the registry sends
    /// `Docker-Content-Digest`).
    pub fn get_manifest(&self, r: &Reference) -> Result<(String, Vec<u8>, Digest), RegistryError> {
        let op = self.op(r, "pull", None);
        let base = self.base(&op)?;
        let url = format!("{base}/v2/{}/manifests/{}", r.repository, manifest_ref(r));
        let accept = [
            MEDIA_OCI_MANIFEST,
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_MANIFEST,
            MEDIA_DOCKER_LIST,
        ]
        .join(", ");
        let (content_type, bytes, announced) = self.retrying(|| {
            let mut resp =
                self.send(&op, Method::GET, &url, &[("Accept", &accept)], &Body::Empty)?;
            match resp.status().as_u16() {
                200..=299 => {}
                404 => return Err(op.not_found("manifest").into()),
                _ => return Err(op.status(&mut resp).into()),
            }
            let content_type = header(&resp, "content-type");
            let announced = header(&resp, "docker-content-digest");
            let bytes = resp
                .body_mut()
                .with_config()
                .limit(MANIFEST_LIMIT)
                .read_to_vec()
                .map_err(|e| match e {
                    ureq::Error::BodyExceedsLimit(_) => Failure::fatal(
                        op.protocol(format!("manifest larger than {MANIFEST_LIMIT} bytes")),
                    ),
                    e => classify(&op, e),
                })?;
            Ok((content_type, bytes, announced))
        })?;
        let digest = Digest::of(&bytes);
        let expected = match &r.digest {
            Some(d) => Some(*d),
            None => announced.and_then(|h| h.parse::<Digest>().ok()),
        };
        if let Some(expected) = expected.filter(|e| *e != digest) {
            return Err(op.mismatch(expected, digest));
        }
        let media_type =
            manifest_media_type(content_type.as_deref(), &bytes).map_err(|detail| {
                RegistryError::AmbiguousManifest {
                    host: op.host(),
                    reference: op.reference(),
                    detail,
                }
            })?;
        Ok((media_type, bytes, digest))
    }

    /// GETs a blob into `out`, hashing while it streams; returns the byte count. A
    /// connection lost midway is resumed with a `Range` request (or by skipping what was
    /// already written). A digest mismatch is [`RegistryError::DigestMismatch`]: the caller
    /// must then discard what was written.
    pub fn get_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        out: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        self.fetch_blob(r, digest, None, out)
    }

    /// [`get_blob`](Self::get_blob) for a blob a descriptor says is `size` bytes: more bytes
    /// are refused as they arrive (a registry cannot fill the disk with an endless body), and
    /// fewer are an error too.
    pub fn get_blob_of_size(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        out: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        self.fetch_blob(r, digest, Some(size), out)
    }

    fn fetch_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        size: Option<u64>,
        out: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        let op = self.op(r, "pull", None);
        let base = self.base(&op)?;
        let url = format!("{base}/v2/{}/blobs/{digest}", r.repository);
        let mut sink = HashingWriter::new(out);
        let mut written: u64 = 0;
        self.retrying(|| {
            let range = format!("bytes={written}-");
            let headers: &[(&str, &str)] = if written > 0 {
                &[("Range", &range)]
            } else {
                &[]
            };
            let mut resp = self.send(&op, Method::GET, &url, headers, &Body::Empty)?;
            let mut skip = match resp.status().as_u16() {
                200 => written,
                206 if written > 0 => {
                    let want = format!("bytes {written}-");
                    if !header(&resp, "content-range").is_some_and(|v| v.starts_with(&want)) {
                        return Err(op
                            .protocol("partial content does not start where asked")
                            .into());
                    }
                    0
                }
                404 => return Err(op.not_found(format!("blob {digest}")).into()),
                _ => return Err(op.status(&mut resp).into()),
            };
            let mut reader = resp.body_mut().as_reader();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Failure::retry(op.transport(e), None)),
                };
                let dropped = skip.min(n as u64) as usize;
                skip -= dropped as u64;
                let chunk = &buf[dropped..n];
                if let Some(size) = size
                    && written + chunk.len() as u64 > size
                {
                    return Err(Failure::fatal(op.protocol(format!(
                        "blob {digest} is larger than the {size} bytes its descriptor says"
                    ))));
                }
                sink.write_all(chunk)
                    .map_err(|e| Failure::fatal(op.io(e)))?;
                written += chunk.len() as u64;
            }
        })?;
        let (_, actual, len) = sink.finish();
        if let Some(size) = size.filter(|s| *s != len) {
            return Err(op.protocol(format!(
                "blob {digest} has {len} bytes, its descriptor says {size}"
            )));
        }
        if actual != *digest {
            return Err(op.mismatch(*digest, actual));
        }
        Ok(len)
    }

    /// True when the repository has the blob (HEAD answers 200), false on 404.
    pub fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let op = self.op(r, "pull", None);
        let base = self.base(&op)?;
        self.head_blob(&op, &base, digest)
    }

    /// Uploads a blob streamed from `open()` (called again for every attempt). Skips the
    /// upload when HEAD finds the blob; tries a cross-repository mount first when
    /// `mount_from` names another repository (a path like `library/busybox`, optionally
    /// prefixed with this registry's name); else POSTs an upload session and PUTs the body
    /// in one streamed request with `Content-Length: size`.
    pub fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        open: &dyn Fn() -> io::Result<Box<dyn Read>>,
        mount_from: Option<&str>,
    ) -> Result<PushOutcome, RegistryError> {
        let prefix = format!("{}/", r.registry);
        let from = mount_from
            .map(|f| f.strip_prefix(&prefix).unwrap_or(f))
            .filter(|f| !f.is_empty() && *f != r.repository);
        let op = self.op(r, "pull,push", from);
        let base = self.base(&op)?;
        if self.head_blob(&op, &base, digest)? {
            return Ok(PushOutcome::Exists);
        }
        let uploads = format!("{base}/v2/{}/blobs/uploads/", r.repository);
        let mut session: Option<String> = None;
        if let Some(from) = from {
            let url = format!("{uploads}?mount={digest}&from={from}");
            let (mounted, location) = self.retrying(|| {
                let mut resp = self.send(&op, Method::POST, &url, &[], &Body::Empty)?;
                let location = header(&resp, "location");
                match resp.status().as_u16() {
                    201 => Ok((true, None)),
                    202 => Ok((false, location)),
                    _ => Err(op.status(&mut resp).into()),
                }
            })?;
            if mounted {
                return Ok(PushOutcome::Mounted);
            }
            session = location;
        }
        self.retrying(|| {
            let location = match session.take() {
                Some(l) => l,
                None => self.start_upload(&op, &uploads)?,
            };
            let target = resolve_location(&uploads, &location)
                .ok_or_else(|| op.protocol(format!("bad upload location {location:?}")))?;
            let sep = if target.contains('?') { '&' } else { '?' };
            let url = format!("{target}{sep}digest={digest}");
            let mut resp = self.send(
                &op,
                Method::PUT,
                &url,
                &[("Content-Type", "application/octet-stream")],
                &Body::Stream { open, size },
            )?;
            match resp.status().as_u16() {
                200..=299 => Ok(()),
                _ => Err(op.status(&mut resp).into()),
            }
        })?;
        Ok(PushOutcome::Uploaded)
    }

    /// PUTs exactly `bytes` as a manifest of `media_type` under the reference's tag (or its
    /// digest when it has no tag) and returns their digest.
    pub fn put_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let op = self.op(r, "pull,push", None);
        let digest = Digest::of(bytes);
        if let Some(want) = r.digest.filter(|d| *d != digest) {
            return Err(op.mismatch(want, digest));
        }
        let base = self.base(&op)?;
        let target = match &r.tag {
            Some(t) => t.clone(),
            None => digest.to_string(),
        };
        let url = format!("{base}/v2/{}/manifests/{target}", r.repository);
        let announced = self.retrying(|| {
            let mut resp =
                self.send(&op, Method::PUT, &url, &[], &Body::Bytes(bytes, media_type))?;
            match resp.status().as_u16() {
                200..=299 => Ok(header(&resp, "docker-content-digest")),
                404 => Err(op.not_found("repository").into()),
                400 => {
                    // Blobs just pushed can be briefly unknown: registries on eventually
                    // consistent storage, and the filesystem driver while another client
                    // rewrites the same blob's link (two runners exporting one cache).
                    let e = op.status(&mut resp);
                    let unknown_blob = matches!(&e, RegistryError::Status { detail, .. }
                        if detail.contains("MANIFEST_BLOB_UNKNOWN"));
                    match unknown_blob {
                        true => Err(Failure::retry(e, None)),
                        false => Err(e.into()),
                    }
                }
                _ => Err(op.status(&mut resp).into()),
            }
        })?;
        if let Some(got) = announced
            .and_then(|h| h.parse::<Digest>().ok())
            .filter(|h| *h != digest)
        {
            return Err(op.mismatch(digest, got));
        }
        Ok(digest)
    }

    /// The operation context for `r` with token scope `actions` on its repository, plus
    /// pull on `extra` (a mount source).
    fn op<'a>(&self, r: &'a Reference, actions: &str, extra: Option<&str>) -> Op<'a> {
        let endpoint = if r.registry == super::reference::DEFAULT_REGISTRY {
            DOCKER_HUB_ENDPOINT.to_string()
        } else {
            r.registry.clone()
        };
        let mut scopes = vec![format!("repository:{}:{actions}", r.repository)];
        if let Some(extra) = extra {
            scopes.push(format!("repository:{extra}:pull"));
        }
        Op {
            r,
            endpoint,
            scopes,
        }
    }

    /// Locks the per-host state of the operation's endpoint.
    fn with_host<T>(&self, op: &Op, f: impl FnOnce(&mut HostState) -> T) -> T {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        f(hosts.entry(op.endpoint.clone()).or_default())
    }

    /// Whether plain http may be used for `authority`.
    fn http_allowed(&self, authority: &str) -> bool {
        !self.opts.tls_verify || is_loopback_host(authority)
    }

    /// `scheme://host` of the registry, probing `/v2/` the first time: https, then (when
    /// policy allows plain http) http if https could not be spoken at all.
    fn base(&self, op: &Op) -> Result<String, RegistryError> {
        if let Some(b) = self.with_host(op, |h| h.base.clone()) {
            return Ok(b);
        }
        let https = format!("https://{}", op.endpoint);
        let fallback = self.http_allowed(&op.endpoint);
        let (base, challenge) = match self.probe(op, &https, fallback) {
            Ok((_, challenge)) => (https, challenge),
            Err(e) if fallback => {
                let http = format!("http://{}", op.endpoint);
                match self.probe(op, &http, false) {
                    // 400 is what an https server says to plain http.
                    Ok((status, challenge)) if status != 400 => (http, challenge),
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        self.with_host(op, |h| {
            h.base = Some(base.clone());
            if challenge.is_some() {
                h.challenge = challenge;
            }
        });
        Ok(base)
    }

    /// GETs `base/v2/` without credentials; returns the status and any auth challenge.
    /// With `quick`, one attempt bounded by [`PROBE_TIMEOUT`] (a fallback follows).
    fn probe(
        &self,
        op: &Op,
        base: &str,
        quick: bool,
    ) -> Result<(u16, Option<Challenge>), RegistryError> {
        let url = format!("{base}/v2/");
        self.retrying_n(if quick { 1 } else { MAX_ATTEMPTS }, || {
            let req = http::Request::builder()
                .method(Method::GET)
                .uri(&url)
                .body(SendBody::none())
                .map_err(|e| op.protocol(format!("cannot build request: {e}")))?;
            let mut config = self.agent.configure_request(req);
            if quick {
                config = config.timeout_global(Some(PROBE_TIMEOUT));
            }
            let mut resp = self
                .agent
                .run(config.build())
                .map_err(|e| classify(op, e))?;
            let challenge = auth::parse_challenges(
                resp.headers()
                    .get_all("www-authenticate")
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            drain(&mut resp);
            Ok((resp.status().as_u16(), challenge))
        })
    }

    /// HEAD on a blob: true on 200, false on 404.
    fn head_blob(&self, op: &Op, base: &str, digest: &Digest) -> Result<bool, RegistryError> {
        let url = format!("{base}/v2/{}/blobs/{digest}", op.r.repository);
        self.retrying(|| {
            let mut resp = self.send(op, Method::HEAD, &url, &[], &Body::Empty)?;
            match resp.status().as_u16() {
                200..=299 => Ok(true),
                404 => Ok(false),
                _ => Err(op.status(&mut resp).into()),
            }
        })
    }

    /// POSTs a new upload session and returns its `Location`.
    fn start_upload(&self, op: &Op, uploads: &str) -> Result<String, RegistryError> {
        self.retrying(|| {
            let mut resp = self.send(op, Method::POST, uploads, &[], &Body::Empty)?;
            match resp.status().as_u16() {
                200..=299 => header(&resp, "location")
                    .ok_or_else(|| op.protocol("upload session without Location").into()),
                _ => Err(op.status(&mut resp).into()),
            }
        })
    }

    /// Runs `f` up to [`MAX_ATTEMPTS`] times while it fails with [`Failure::Retry`].
    fn retrying<T>(&self, f: impl FnMut() -> Result<T, Failure>) -> Result<T, RegistryError> {
        self.retrying_n(MAX_ATTEMPTS, f)
    }

    /// Runs `f` up to `attempts` times, sleeping 100 ms · 2^n (or the server's
    /// `Retry-After`, capped) between attempts.
    fn retrying_n<T>(
        &self,
        attempts: u32,
        mut f: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, RegistryError> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(*e),
                Err(Failure::Retry(e, after)) => {
                    attempt += 1;
                    if attempt >= attempts {
                        return Err(*e);
                    }
                    let backoff = BACKOFF_BASE * 2u32.pow(attempt - 1);
                    std::thread::sleep(after.map_or(backoff, |a| a.min(RETRY_AFTER_CAP)));
                }
            }
        }
    }

    /// One logical request: answers auth challenges (once), follows redirects for GET and
    /// HEAD (dropping credentials when the host changes), and turns 429/5xx into retries.
    fn send(
        &self,
        op: &Op,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &Body,
    ) -> Result<Response<ureq::Body>, Failure> {
        let mut url = url.to_string();
        let mut reauthenticated = false;
        let mut redirects = 0;
        loop {
            let uri: Uri = url
                .parse()
                .map_err(|_| op.protocol(format!("bad URL {url:?}")))?;
            let authority = uri.authority().map_or("", |a| a.as_str());
            if uri.scheme_str() != Some("https") && !self.http_allowed(authority) {
                return Err(RegistryError::InsecureRefused {
                    host: op.host(),
                    reference: op.reference(),
                    url,
                }
                .into());
            }
            let same_host = authority.eq_ignore_ascii_case(&op.endpoint);
            let authorization = if same_host {
                self.authorization(op, false)?
            } else {
                None
            };
            let mut resp =
                self.send_raw(op, &method, &url, authorization.as_deref(), headers, body)?;
            let status = resp.status().as_u16();
            match status {
                401 if same_host && !reauthenticated => {
                    let challenge = auth::parse_challenges(
                        resp.headers()
                            .get_all("www-authenticate")
                            .iter()
                            .filter_map(|v| v.to_str().ok()),
                    );
                    drain(&mut resp);
                    let challenge = challenge.ok_or_else(|| {
                        op.auth("401 without a usable WWW-Authenticate challenge")
                    })?;
                    self.with_host(op, |h| h.challenge = Some(challenge));
                    if self.authorization(op, true)?.is_none() {
                        return Err(op
                            .auth("the registry requires credentials and none are configured")
                            .into());
                    }
                    reauthenticated = true;
                }
                401 | 403 => {
                    let detail = error_detail(&mut resp);
                    return Err(op.auth(format!("{status}: {detail}")).into());
                }
                301 | 302 | 303 | 307 | 308 if method == Method::GET || method == Method::HEAD => {
                    drain(&mut resp);
                    redirects += 1;
                    if redirects > MAX_REDIRECTS {
                        return Err(op.protocol("too many redirects").into());
                    }
                    url = header(&resp, "location")
                        .and_then(|l| resolve_location(&url, &l))
                        .ok_or_else(|| op.protocol("redirect without a usable Location"))?;
                }
                408 | 429 | 500 | 502 | 503 | 504 => {
                    let after = header(&resp, "retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    return Err(Failure::retry(op.status(&mut resp), after));
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Sends one HTTP request as given; transport errors become retries or final errors.
    fn send_raw(
        &self,
        op: &Op,
        method: &Method,
        url: &str,
        authorization: Option<&str>,
        headers: &[(&str, &str)],
        body: &Body,
    ) -> Result<Response<ureq::Body>, Failure> {
        let mut builder = http::Request::builder().method(method.clone()).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(a) = authorization {
            builder = builder.header("Authorization", a);
        }
        let bad_request =
            |e: http::Error| Failure::fatal(op.protocol(format!("cannot build request: {e}")));
        match body {
            Body::Empty => {
                if *method == Method::POST || *method == Method::PUT {
                    builder = builder.header("Content-Length", "0");
                }
                let req = builder.body(SendBody::none()).map_err(bad_request)?;
                self.agent.run(req).map_err(|e| classify(op, e))
            }
            Body::Bytes(bytes, content_type) => {
                let mut reader: &[u8] = bytes;
                let req = builder
                    .header("Content-Type", *content_type)
                    .header("Content-Length", bytes.len())
                    .body(SendBody::from_reader(&mut reader))
                    .map_err(bad_request)?;
                self.agent.run(req).map_err(|e| classify(op, e))
            }
            Body::Stream { open, size } => {
                let source = open().map_err(|e| Failure::fatal(op.io(e)))?;
                let mut tracked = TrackedReader {
                    inner: source.take(*size),
                    error: None,
                };
                let req = builder
                    .header("Content-Length", *size)
                    .body(SendBody::from_reader(&mut tracked))
                    .map_err(bad_request)?;
                let result = self.agent.run(req);
                match (result, tracked.error.take()) {
                    (Ok(resp), _) => Ok(resp),
                    (Err(_), Some(local)) => Err(Failure::fatal(op.io(local))),
                    (Err(e), None) => Err(classify(op, e)),
                }
            }
        }
    }

    /// The `Authorization` header for the operation, per the host's last challenge:
    /// basic credentials, or a bearer token for the operation's scopes (fetched when not
    /// cached or when `refresh`).
    fn authorization(&self, op: &Op, refresh: bool) -> Result<Option<String>, Failure> {
        let scope = op.scope_key();
        let (challenge, cached) =
            self.with_host(op, |h| (h.challenge.clone(), h.tokens.get(&scope).cloned()));
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => match self.credential(op)? {
                Some(c) => match c.basic_header() {
                    Some(h) => Ok(Some(h)),
                    None => Err(op
                        .auth("an identity token cannot answer a basic challenge")
                        .into()),
                },
                None => Ok(None),
            },
            Some(Challenge::Bearer { realm, service }) => {
                if let Some(token) = cached.filter(|_| !refresh) {
                    return Ok(Some(format!("Bearer {token}")));
                }
                let token = self.fetch_token(op, &realm, service.as_deref())?;
                self.with_host(op, |h| h.tokens.insert(scope, token.clone()));
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// The registry's credentials, looked up once.
    fn credential(&self, op: &Op) -> Result<Option<Credential>, Failure> {
        if let Some(c) = self.with_host(op, |h| h.credential.clone()) {
            return Ok(c);
        }
        let files = match &self.opts.auth_file {
            Some(f) => vec![f.clone()],
            None => auth::default_auth_files(),
        };
        let found = auth::lookup_credential(&files, &op.r.registry).map_err(|detail| {
            RegistryError::Credentials {
                host: op.host(),
                detail,
            }
        })?;
        self.with_host(op, |h| h.credential = Some(found.clone()));
        Ok(found)
    }

    /// Gets a bearer token for the operation's scopes from the token service at `realm`,
    /// with the registry's credentials when there are any (anonymous otherwise).
    fn fetch_token(&self, op: &Op, realm: &str, service: Option<&str>) -> Result<String, Failure> {
        let uri: Uri = realm
            .parse()
            .map_err(|_| op.auth(format!("bad token realm {realm:?}")))?;
        let realm_host = uri.authority().map_or("", |a| a.as_str()).to_string();
        if uri.scheme_str() != Some("https") && !self.http_allowed(&realm_host) {
            return Err(RegistryError::InsecureRefused {
                host: op.host(),
                reference: op.reference(),
                url: realm.to_string(),
            }
            .into());
        }
        let credential = self.credential(op)?;
        let mut resp = match &credential {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "kiln"),
                ];
                if let Some(s) = service {
                    form.push(("service", s));
                }
                let scope = op.scopes.join(" ");
                form.push(("scope", &scope));
                let body = encode_pairs(&form);
                self.send_raw(
                    op,
                    &Method::POST,
                    realm,
                    None,
                    &[],
                    &Body::Bytes(body.as_bytes(), "application/x-www-form-urlencoded"),
                )?
            }
            basic => {
                let mut query: Vec<(&str, &str)> = Vec::new();
                if let Some(s) = service {
                    query.push(("service", s));
                }
                for scope in &op.scopes {
                    query.push(("scope", scope));
                }
                let sep = if realm.contains('?') { '&' } else { '?' };
                let url = format!("{realm}{sep}{}", encode_pairs(&query));
                let header = basic.as_ref().and_then(Credential::basic_header);
                self.send_raw(op, &Method::GET, &url, header.as_deref(), &[], &Body::Empty)?
            }
        };
        match resp.status().as_u16() {
            200..=299 => {}
            408 | 429 | 500..=599 => {
                return Err(Failure::retry(
                    op.auth(format!(
                        "token service {realm_host} answered {}",
                        resp.status().as_u16()
                    )),
                    None,
                ));
            }
            status => {
                let detail = error_detail(&mut resp);
                return Err(op
                    .auth(format!(
                        "token service {realm_host} answered {status}: {detail}"
                    ))
                    .into());
            }
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(TOKEN_LIMIT)
            .read_to_vec()
            .map_err(|e| classify(op, e))?;
        auth::parse_token_response(&body).ok_or_else(|| {
            op.auth(format!("token service {realm_host} sent no token"))
                .into()
        })
    }
}

/// The tag or digest to put in a manifest URL (the digest wins when both are given).
fn manifest_ref(r: &Reference) -> String {
    match (&r.digest, &r.tag) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.clone(),
        (None, None) => super::reference::DEFAULT_TAG.to_string(),
    }
}

/// A response header as a string.
fn header(resp: &Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Reads (a bounded amount of) the rest of a response so the connection can be reused.
fn drain(resp: &mut Response<ureq::Body>) {
    let _ = resp
        .body_mut()
        .with_config()
        .limit(ERROR_BODY_LIMIT)
        .read_to_vec();
}

/// The registry's error message from an error response (`{"errors":[{code,message}]}`),
/// or the start of the body.
fn error_detail(resp: &mut Response<ureq::Body>) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(ERROR_BODY_LIMIT)
        .read_to_vec()
        .unwrap_or_default();
    if let Ok(e) = serde_json::from_slice::<Errors>(&body) {
        let parts: Vec<String> = e
            .errors
            .into_iter()
            .map(|e| match (e.code, e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(s), None) | (None, Some(s)) => s,
                (None, None) => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        "no details".to_string()
    } else {
        text.chars().take(200).collect()
    }
}

/// Sorts an HTTP stack error into a retry (connection trouble) or a final error.
fn classify(op: &Op, e: ureq::Error) -> Failure {
    let retry = match &e {
        ureq::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
                | io::ErrorKind::NotConnected
        ),
        ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::Protocol(_)
        | ureq::Error::BodyStalled => true,
        _ => false,
    };
    let err = op.transport(e);
    if retry {
        Failure::retry(err, None)
    } else {
        Failure::fatal(err)
    }
}

/// Resolves a `Location` header against the URL it answered.
fn resolve_location(current: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_string());
    }
    let uri: Uri = current.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?.as_str();
    if let Some(rest) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    let path = uri.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!("{scheme}://{authority}{dir}{location}"))
}

/// `application/x-www-form-urlencoded` encoding of name/value pairs.
fn encode_pairs(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Client>();
    }

    #[test]
    fn resolves_locations() {
        let cur = "http://127.0.0.1:5000/v2/a/blobs/uploads/";
        assert_eq!(
            resolve_location(cur, "/v2/a/blobs/uploads/u?_state=x").unwrap(),
            "http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(
            resolve_location(cur, "https://s3.example/b?sig=1").unwrap(),
            "https://s3.example/b?sig=1"
        );
        assert_eq!(
            resolve_location(cur, "//cdn.example/x").unwrap(),
            "http://cdn.example/x"
        );
        assert_eq!(
            resolve_location(cur, "u1").unwrap(),
            "http://127.0.0.1:5000/v2/a/blobs/uploads/u1"
        );
        assert_eq!(resolve_location("not a url", "x"), None);
    }

    #[test]
    fn encodes_form() {
        assert_eq!(
            encode_pairs(&[("scope", "repository:a/b:pull,push"), ("service", "x y")]),
            "scope=repository%3Aa%2Fb%3Apull%2Cpush&service=x%20y"
        );
    }
}
