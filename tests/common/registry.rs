//! Real registries and a fault-injecting proxy for tests: `docker-registry` processes
//! (plain, or with htpasswd auth and a self-signed TLS certificate) on free 127.0.0.1
//! ports, a raw HTTP/1.1 proxy that injects errors, and small skopeo / docker config helpers.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// A real registry
// ---------------------------------------------------------------------------------------

/// A `docker-registry serve` process on a free 127.0.0.1 port, killed on drop.
pub struct Registry {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    dir: tempfile::TempDir,
}

/// Optional auth and TLS for a test registry.
#[derive(Default)]
pub struct RegistrySetup {
    /// A user and password that the registry requires (htpasswd auth).
    pub htpasswd: Option<(&'static str, &'static str)>,
    /// Serve https with a certificate from a throw-away CA.
    pub tls: bool,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// A plain-http registry.
    pub fn start() -> Registry {
        Registry::start_with(RegistrySetup::default())
    }

    /// A registry with the given auth and TLS.
    pub fn start_with(setup: RegistrySetup) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            d.join("data").display()
        );
        if setup.tls {
            // A throw-away CA and a server certificate for 127.0.0.1 signed by it.
            let ext = d.join("ext.cnf");
            std::fs::write(
                &ext,
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            )
            .unwrap();
            let p = |name: &str| d.join(name).display().to_string();
            let steps: [Vec<String>; 3] = [
                vec![
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=kiln test CA",
                    "-keyout",
                    &p("ca.key"),
                    "-out",
                    &p("ca.pem"),
                ]
                .into_iter()
                .map(String::from)
                .collect(),
                vec![
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-keyout",
                    &p("key.pem"),
                    "-out",
                    &p("leaf.csr"),
                ]
                .into_iter()
                .map(String::from)
                .collect(),
                vec![
                    "x509",
                    "-req",
                    "-days",
                    "2",
                    "-in",
                    &p("leaf.csr"),
                    "-CA",
                    &p("ca.pem"),
                    "-CAkey",
                    &p("ca.key"),
                    "-CAcreateserial",
                    "-extfile",
                    &p("ext.cnf"),
                    "-out",
                    &p("cert.pem"),
                ]
                .into_iter()
                .map(String::from)
                .collect(),
            ];
            for args in steps {
                let out = Command::new("openssl").args(&args).output().unwrap();
                assert!(
                    out.status.success(),
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("cert.pem").display(),
                d.join("key.pem").display()
            );
        }
        if let Some((user, pass)) = setup.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(d.join("htpasswd"), out.stdout).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                d.join("htpasswd").display()
            );
        }
        std::fs::write(d.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(d.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed");
        let mut reg = Registry { child, port, dir };
        reg.wait_ready();
        reg
    }

    /// Waits (bounded) until the registry accepts connections on its port.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("registry exited with {status}: {}", self.log());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("registry did not start: {}", self.log());
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA that signed the TLS registry's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs skopeo; panics unless it succeeds; returns its stdout.
pub fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("skopeo is installed");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A docker `config.json` in `dir` holding basic credentials for `host`.
pub fn docker_config(dir: &Path, host: &str, user: &str, pass: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let path = dir.join(format!("config-{user}-{pass}.json"));
    let json = serde_json::json!({"auths": {host: {"auth": auth}}});
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// Fault-injecting proxy
// ---------------------------------------------------------------------------------------

/// What the proxy does with one request.
#[derive(Clone, Debug)]
pub enum Action {
    /// Forward to the upstream registry.
    Forward,
    /// Forward, and flip the last byte of the response body.
    Corrupt,
    /// Answer with this status and close.
    Status(u16),
    /// Close the connection without answering.
    Drop,
    /// Answer 307 to `http://<authority><path>`.
    Redirect(String),
    /// Forward with this `Authorization` header instead of the client's.
    ForwardAs(String),
    /// Forward, but close after half of the response body.
    Truncate,
    /// Answer with this status, extra header lines and body.
    Respond(u16, String, String),
}

/// One request as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request line.
    pub line: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Range` header.
    pub range: Option<String>,
}

/// Decides what happens to the n-th request (counted from 1).
pub type Policy = dyn Fn(usize, &Seen) -> Action + Send + Sync;

/// A policy that flips a byte in every blob body the registry sends and forwards the rest.
pub fn corrupt_blob_gets() -> Box<Policy> {
    Box::new(|_, req| {
        if req.line.starts_with("GET ") && req.line.contains("/blobs/sha256:") {
            Action::Corrupt
        } else {
            Action::Forward
        }
    })
}

/// A raw HTTP/1.1 proxy on a free 127.0.0.1 port that forwards each request (one per
/// connection) to `upstream` or injects a fault as `policy(request number, request)`
/// says. Stops on drop.
pub struct Proxy {
    /// The port it listens on.
    pub port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy in front of `127.0.0.1:upstream`.
    pub fn start(upstream: u16, policy: Box<Policy>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let policy: Arc<Policy> = Arc::from(policy);
        let counter = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut workers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (policy, seen, counter) =
                                (policy.clone(), seen.clone(), counter.clone());
                            workers.push(std::thread::spawn(move || {
                                let _ = handle(conn, upstream, &*policy, &seen, &counter);
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for w in workers {
                    let _ = w.join();
                }
            })
        };
        Proxy {
            port,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(
    conn: TcpStream,
    upstream: u16,
    policy: &Policy,
    seen: &Mutex<Vec<Seen>>,
    counter: &AtomicUsize,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut first = [0u8; 1];
    if conn.peek(&mut first)? == 0 || first[0] == 0x16 {
        // Closed, or a TLS handshake: this proxy speaks plain http only.
        return Ok(());
    }
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut headers = Vec::new();
    let mut content_length = 0u64;
    let mut authorization = None;
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            authorization = Some(h["authorization:".len()..].trim().to_string());
            continue;
        }
        if let Some(v) = lower.strip_prefix("range:") {
            range = Some(v.trim().to_string());
        }
        if lower.starts_with("connection:") {
            continue;
        }
        headers.push(h);
    }
    let line = line.trim_end().to_string();
    let request = Seen {
        line: line.clone(),
        authorization: authorization.clone(),
        range,
    };
    seen.lock().unwrap().push(request.clone());
    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let mut client = conn;
    let action = policy(n, &request);
    let (authorization, truncate) = match action {
        Action::Drop => return client.shutdown(Shutdown::Both),
        Action::Status(code) => {
            write!(
                client,
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return client.shutdown(Shutdown::Both);
        }
        Action::Respond(code, headers, body) => {
            write!(
                client,
                "HTTP/1.1 {code} Injected\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return client.shutdown(Shutdown::Both);
        }
        Action::Redirect(authority) => {
            let path = line.split(' ').nth(1).unwrap_or("/");
            write!(
                client,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{authority}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return client.shutdown(Shutdown::Both);
        }
        Action::Forward => (authorization, None),
        Action::Corrupt => (authorization, Some(false)),
        Action::Truncate => (authorization, Some(true)),
        Action::ForwardAs(a) => (Some(a), None),
    };
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut head = format!("{line}\r\n");
    for h in &headers {
        head += h;
    }
    if let Some(a) = authorization {
        head += &format!("Authorization: {a}\r\n");
    }
    head += "Connection: close\r\n\r\n";
    up.write_all(head.as_bytes())?;
    io::copy(&mut (&mut reader).take(content_length), &mut up)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let body_start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 4);
    match truncate {
        Some(true) => response.truncate(body_start + (response.len() - body_start) / 2),
        Some(false) if response.len() > body_start => {
            if let Some(last) = response.last_mut() {
                *last ^= 0xff;
            }
        }
        _ => {}
    }
    client.write_all(&response)?;
    client.shutdown(Shutdown::Both)
}
