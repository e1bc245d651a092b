//! A small blocking HTTP/1.1 client for the daemon's API: one keep-alive connection, JSON
//! bodies, Content-Length or chunked answers. The daemon is the only peer, so nothing more is
//! needed (no TLS: a remote daemon is reached through a TLS proxy or an SSH tunnel). It speaks
//! over TCP (`http://HOST:PORT`) or the daemon's local socket (`unix:///path`), where the
//! daemon knows the caller by the kernel and no token is needed.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where the daemon listens.
#[derive(Clone, Debug)]
enum Target {
    Tcp(String),
    Unix(PathBuf),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Where the daemon is and who we are.
pub struct Client {
    target: Target,
    token: Option<String>,
    conn: Option<BufReader<Stream>>,
}

/// An answer.
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the daemon answered {} with a body that is not JSON",
                self.status
            )
        })
    }

    /// The body as `T`, borrowing from it, if the status is 2xx; else an error with the
    /// daemon's message.
    pub fn read<'a, T: serde::Deserialize<'a>>(&'a self) -> Result<T> {
        if (200..300).contains(&self.status) {
            return serde_json::from_slice(&self.body).with_context(|| {
                format!(
                    "the daemon answered {} with an unexpected body",
                    self.status
                )
            });
        }
        let failed = Response {
            status: self.status,
            body: self.body.clone(),
        };
        failed
            .ok()
            .and_then(|_| anyhow::bail!("the daemon answered {}", self.status))
    }

    /// The body as JSON if the status is 2xx, else an error with the daemon's message.
    pub fn ok(self) -> Result<serde_json::Value> {
        if (200..300).contains(&self.status) {
            return if self.body.is_empty() {
                Ok(serde_json::Value::Null)
            } else {
                self.json()
            };
        }
        let msg = self
            .json()
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        bail!("the daemon answered {}: {msg}", self.status)
    }
}

impl Client {
    /// A client of the daemon at `url` (`http://host:port` or `unix:///path/to/fnx.sock`);
    /// `token` may be None only for a socket.
    pub fn new(url: &str, token: Option<&str>) -> Result<Client> {
        let target = if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                bail!("a socket URL names the socket's absolute path: unix:///path/to/fnx.sock (got {url:?})");
            }
            Target::Unix(PathBuf::from(path))
        } else {
            let rest = url.strip_prefix("http://").with_context(|| {
                format!("the daemon URL must start with http:// or unix:// (got {url:?})")
            })?;
            let host = rest.trim_end_matches('/').to_string();
            if host.is_empty() || host.contains('/') {
                bail!("the daemon URL must be http://HOST:PORT (got {url:?})");
            }
            if token.is_none() {
                bail!("no token for {url}: pass --token or set FNX_TOKEN");
            }
            Target::Tcp(host)
        };
        Ok(Client {
            target,
            token: token.map(str::to_string),
            conn: None,
        })
    }

    /// Send a request; retried once on a fresh connection if a kept-alive one was closed.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response> {
        let body = body.map(|b| b.to_string().into_bytes());
        let extra: &[(&str, &str)] = &[];
        self.raw(method, path, body.as_deref(), "application/json", extra)
    }

    /// Send a request with a body of any type and extra headers.
    pub fn raw(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        let reused = self.conn.is_some();
        match self.once(method, path, body, content_type, headers) {
            Ok(r) => Ok(r),
            Err(_) if reused => {
                self.conn = None;
                self.once(method, path, body, content_type, headers)
            }
            Err(e) => Err(e),
        }
    }

    fn once(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        if self.conn.is_none() {
            let read_timeout = Some(Duration::from_secs(120));
            let stream = match &self.target {
                Target::Tcp(host) => {
                    let s = TcpStream::connect(host).with_context(|| {
                        format!(
                            "cannot connect to the fnx daemon at http://{host} (is `fnx daemon` running?)"
                        )
                    })?;
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(read_timeout).ok();
                    Stream::Tcp(s)
                }
                Target::Unix(path) => {
                    let s = UnixStream::connect(path).with_context(|| {
                        format!(
                            "cannot connect to the fnx daemon's socket {} (is `fnx daemon` running?)",
                            path.display()
                        )
                    })?;
                    s.set_read_timeout(read_timeout).ok();
                    Stream::Unix(s)
                }
            };
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected");
        let host = match &self.target {
            Target::Tcp(h) => h.as_str(),
            Target::Unix(_) => "localhost",
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("Accept: application/json\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let stream = conn.get_mut();
        stream.write_all(head.as_bytes())?;
        if let Some(b) = body {
            stream.write_all(b)?;
        }
        let result = read_response(conn);
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

fn read_response(r: &mut BufReader<Stream>) -> Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("the daemon closed the connection");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .context("bad chunk size")?;
            if n == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Response { status, body })
}
