//! A small HTTP/1.1 client for tests of serving mode: one request per connection, the
//! response read whole (content-length or chunked), and a connection the server aborted
//! reported as such rather than as a response.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A response, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lowercase) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunks if it came in chunks.
    pub body: String,
}

impl HttpResponse {
    /// Panics unless this is how serving mode answers a request a limit ended: `status`,
    /// the header `bulwark-limit: kind`, and a body that starts with `reason`.
    pub fn assert_limit(&self, status: u16, kind: &str, reason: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("bulwark-limit"), Some(kind), "{self:?}");
        assert!(self.body.starts_with(reason), "{self:?}");
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// `GET path` from `address`, within `timeout`. A connection closed before a complete
/// response is an error whose message says so.
pub fn get(address: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("GET {path}: reading the response"))?;
    parse(&raw).with_context(|| format!("GET {path} from {address}"))
}

/// Waits until something accepts connections at `address` (a readiness probe's check).
pub fn wait_listening(address: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {address} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn parse(raw: &[u8]) -> Result<HttpResponse> {
    let end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .context("the connection closed before a complete response head")?;
    let head = std::str::from_utf8(&raw[..end])?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        let length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse::<usize>().ok())
            .unwrap_or(rest.len());
        if rest.len() < length {
            bail!(
                "the connection closed after {} of {length} body bytes",
                rest.len()
            );
        }
        rest[..length].to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .context("the connection closed inside a chunked body")?;
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end])?.trim(), 16)?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            bail!("the connection closed inside a chunk");
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// The value of one series (`name{labels}` as written) in Prometheus text, or 0 when the
/// text does not have it.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The value of `key` in a `key=value` log line (a usage record), if it has one.
pub fn logfmt_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_and_chunked_bodies_and_sees_aborts() {
        let fixed = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc").unwrap();
        assert_eq!((fixed.status, fixed.body.as_str()), (200, "abc"));
        assert_eq!(fixed.header("x-a"), Some("b"));
        let chunked = parse(
            b"HTTP/1.1 504 X\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((chunked.status, chunked.body.as_str()), (504, "abcd"));
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab").is_err());
        assert!(parse(b"").is_err());
    }
}
