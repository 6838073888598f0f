//! Request and response heads for the lean path: parsed once with
//! `httparse` into byte ranges of the connection's buffer, classified (is
//! this a request the lean path serves, or one for Pingora's proxy), and
//! written out again for the other side with the proxy's own headers.

use std::ops::Range;

use crate::sticky::Headers;

/// Headers a head may carry; more sends the request to Pingora's path.
pub const MAX_HEADERS: usize = 100;

/// Largest head the lean path reads; a longer one goes to Pingora's path,
/// which applies its own limits and error answers.
pub const MAX_HEAD: usize = 16 * 1024;

/// What a header means to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Passed on unchanged.
    Other,
    /// `Host`.
    Host,
    /// `Content-Length`.
    ContentLength,
    /// `Transfer-Encoding`.
    TransferEncoding,
    /// `Connection`.
    Connection,
    /// `Upgrade`.
    Upgrade,
    /// `Expect`.
    Expect,
    /// `X-Request-Id`.
    RequestId,
    /// `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`: replaced by the proxy's own.
    Forwarded,
    /// Other hop-by-hop headers (`Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`).
    Hop,
}

impl Kind {
    fn of(name: &[u8]) -> Kind {
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            2 if is("te") => Kind::Hop,
            4 if is("host") => Kind::Host,
            6 if is("expect") => Kind::Expect,
            7 if is("upgrade") => Kind::Upgrade,
            7 if is("trailer") => Kind::Hop,
            9 if is("x-real-ip") => Kind::Forwarded,
            10 if is("connection") => Kind::Connection,
            10 if is("keep-alive") => Kind::Hop,
            12 if is("x-request-id") => Kind::RequestId,
            14 if is("content-length") => Kind::ContentLength,
            15 if is("x-forwarded-for") => Kind::Forwarded,
            16 if is("proxy-connection") => Kind::Hop,
            17 if is("transfer-encoding") => Kind::TransferEncoding,
            17 if is("x-forwarded-proto") => Kind::Forwarded,
            _ => Kind::Other,
        }
    }
}

/// One header as ranges of the buffer it was parsed from.
#[derive(Debug, Clone)]
pub struct Field {
    /// The name's bytes.
    pub name: Range<usize>,
    /// The value's bytes.
    pub value: Range<usize>,
    /// What it means to the proxy.
    pub kind: Kind,
}

/// Methods the lean path serves; any other goes to Pingora's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// PUT
    Put,
    /// DELETE
    Delete,
    /// PATCH
    Patch,
    /// OPTIONS
    Options,
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            _ => return None,
        })
    }

    /// The method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
        }
    }

    /// Safe to send again after a pooled connection failed (RFC 9110 §9.2.2).
    pub fn idempotent(self) -> bool {
        !matches!(self, Method::Post | Method::Patch)
    }
}

/// A request head the lean path serves.
#[derive(Debug)]
pub struct Request {
    /// Bytes of the head, up to and including the empty line.
    pub len: usize,
    /// The method.
    pub method: Method,
    /// The origin-form target (path and query).
    pub target: Range<usize>,
    /// The headers, in order.
    pub fields: Vec<Field>,
    /// The body's length (0 without `Content-Length`).
    pub body: u64,
    /// The client asked to close after this request.
    pub close: bool,
    /// A valid WebSocket upgrade (RFC 6455 §4.2.1): tunnelled after a `101`.
    pub websocket: bool,
    /// The client sent an `Upgrade` it does not get: stripped, served as a plain request.
    pub upgrade_refused: bool,
}

/// What became of the bytes read so far.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A request the lean path serves.
    Request(Request),
    /// Anything else (malformed, unusual framing, other methods or versions):
    /// Pingora's proxy answers it, with the same bytes.
    Elsewhere,
}

/// Parses the request head at the start of `buf`.
pub fn parse_request(buf: &[u8], fields: Vec<Field>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Elsewhere,
    };
    if len > MAX_HEAD || req.version != Some(1) {
        return Parsed::Elsewhere;
    }
    let Some(method) = req.method.and_then(Method::parse) else { return Parsed::Elsewhere };
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else { return Parsed::Elsewhere };
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let mut out = Request {
        len,
        method,
        target: offset(path.as_bytes())..offset(path.as_bytes()) + path.len(),
        fields,
        body: 0,
        close: false,
        websocket: false,
        upgrade_refused: false,
    };
    out.fields.clear();
    let (mut hosts, mut lengths) = (0, 0);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let kind = Kind::of(name);
        let value = h.value;
        match kind {
            Kind::Host => {
                hosts += 1;
                if !valid_host(value) {
                    return Parsed::Elsewhere;
                }
            }
            Kind::ContentLength => {
                lengths += 1;
                match parse_length(value) {
                    Some(n) => out.body = n,
                    None => return Parsed::Elsewhere,
                }
            }
            Kind::TransferEncoding | Kind::Expect => return Parsed::Elsewhere,
            Kind::Connection => {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        out.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive")
                        && !token.eq_ignore_ascii_case(b"upgrade")
                        && !token.is_empty()
                    {
                        // A header named as hop-by-hop would have to be removed too.
                        return Parsed::Elsewhere;
                    }
                }
            }
            _ => {}
        }
        out.fields.push(Field {
            name: offset(name)..offset(name) + name.len(),
            value: offset(value)..offset(value) + value.len(),
            kind,
        });
    }
    if hosts != 1 || lengths > 1 {
        return Parsed::Elsewhere;
    }
    if out.fields.iter().any(|f| f.kind == Kind::Upgrade) {
        out.websocket =
            !out.close && is_websocket_upgrade(method == Method::Get, &RawHeaders { buf, fields: &out.fields });
        out.upgrade_refused = !out.websocket;
    }
    Parsed::Request(out)
}

/// Whether a request really is a WebSocket upgrade (RFC 6455 §4.2.1): a
/// GET with `Connection: upgrade`, `Upgrade: websocket`, version 13, a
/// valid key, and no body. Anything else carrying `Upgrade` is served as a
/// plain request, with the body limit and deadlines of one.
pub fn is_websocket_upgrade(get: bool, headers: &impl Headers) -> bool {
    let has_token = |name, token: &[u8]| headers.values(name).flat_map(tokens).any(|t| t.eq_ignore_ascii_case(token));
    get && has_token("connection", b"upgrade")
        && has_token("upgrade", b"websocket")
        && headers.first("sec-websocket-version").is_some_and(|v| trim(v) == b"13")
        && headers.first("sec-websocket-key").is_some_and(valid_ws_key)
        && headers.first("transfer-encoding").is_none()
        && headers.values("content-length").all(|v| trim(v) == b"0")
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(trim)
}

/// RFC 9110 §7.2: the Host value is an authority (an empty one is allowed).
fn valid_host(value: &[u8]) -> bool {
    value.is_empty() || std::str::from_utf8(value).is_ok_and(|h| h.parse::<http::uri::Authority>().is_ok())
}

/// Digits only, no sign, no list, within u64.
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = trim(value);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// RFC 6455 §4.1: a base64-encoded 16-byte nonce (24 characters, `==` padded).
fn valid_ws_key(value: &[u8]) -> bool {
    let v = trim(value);
    v.len() == 24 && v.ends_with(b"==") && v[..22].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &v[start..end]
}

/// A request's headers read straight from the buffer, for the sticky and
/// client-address rules.
pub struct RawHeaders<'a> {
    /// The buffer the head was parsed from.
    pub buf: &'a [u8],
    /// Its fields.
    pub fields: &'a [Field],
}

impl Headers for RawHeaders<'_> {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |f| self.buf[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| &self.buf[f.value.clone()])
    }
}

/// The proxy's own headers on the way to the backend.
pub struct Forwarding<'a> {
    /// `X-Forwarded-For`.
    pub forwarded_for: &'a [u8],
    /// `X-Real-IP`.
    pub real_ip: &'a [u8],
    /// `X-Forwarded-Proto`.
    pub proto: &'a [u8],
    /// `X-Request-Id`.
    pub request_id: &'a [u8],
}

/// Writes the head for the backend into `out`: the request line, the
/// client's end-to-end headers, then the proxy's. Hop-by-hop headers are
/// dropped, except the upgrade pair of a WebSocket.
pub fn write_upstream_request(out: &mut Vec<u8>, buf: &[u8], req: &Request, fwd: &Forwarding<'_>) {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(&buf[req.target.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for f in &req.fields {
        let keep = match f.kind {
            Kind::Connection | Kind::Hop | Kind::Forwarded | Kind::RequestId => false,
            Kind::Upgrade => req.websocket,
            _ => true,
        };
        if keep {
            out.extend_from_slice(&buf[f.name.clone()]);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&buf[f.value.clone()]);
            out.extend_from_slice(b"\r\n");
        }
    }
    if req.websocket {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    }
    for (name, value) in [
        (&b"X-Forwarded-For: "[..], fwd.forwarded_for),
        (b"X-Real-IP: ", fwd.real_ip),
        (b"X-Forwarded-Proto: ", fwd.proto),
        (b"X-Request-Id: ", fwd.request_id),
    ] {
        out.extend_from_slice(name);
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked, passed through as sent.
    Chunked,
    /// Until the backend closes (the client connection closes too).
    Close,
}

/// A backend's response head.
#[derive(Debug)]
pub struct Response {
    /// Bytes of the head.
    pub len: usize,
    /// Status code.
    pub status: u16,
    /// How the body ends.
    pub framing: Framing,
    /// The backend will close its connection after this response.
    pub close: bool,
}

/// What became of the backend's bytes so far.
pub enum ParsedResponse {
    /// More bytes are needed.
    Partial,
    /// A complete head.
    Response(Response),
    /// Not a response the proxy can pass on.
    Invalid,
}

/// Parses the response head at the start of `buf` and writes the client's
/// head into `out` (hop-by-hop headers dropped, `X-Request-Id` set, and
/// `Connection: close` when `closing`).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    request_id: &[u8],
    closing: bool,
    out: &mut Vec<u8>,
) -> ParsedResponse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD * 4 => return ParsedResponse::Partial,
        _ => return ParsedResponse::Invalid,
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else { return ParsedResponse::Invalid };
    let mut framing = None;
    let mut close = version == 0;
    let mut chunked = false;
    for h in resp.headers.iter() {
        match Kind::of(h.name.as_bytes()) {
            Kind::ContentLength => match (parse_length(h.value), framing) {
                (Some(n), None) => framing = Some(Framing::Length(n)),
                (Some(n), Some(Framing::Length(m))) if n == m => {}
                _ => return ParsedResponse::Invalid,
            },
            Kind::TransferEncoding => {
                chunked = tokens(h.value).next_back().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
            }
            Kind::Connection => {
                for token in tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
            _ => {}
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        framing.unwrap_or(Framing::Close)
    };

    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse takes exactly three digits.
    out.extend_from_slice(&[b'0' + (status / 100) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8]);
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let kind = Kind::of(h.name.as_bytes());
        let keep = match kind {
            Kind::Connection | Kind::Hop | Kind::RequestId => false,
            // A 101's Upgrade names the protocol switched to.
            Kind::Upgrade => status == 101,
            _ => true,
        };
        if keep {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"X-Request-Id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\n");
    if status == 101 {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if closing || framing == Framing::Close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    ParsedResponse::Response(Response { len, status, framing, close })
}

/// Where a chunked body stands; bytes are passed on unchanged, this only
/// finds the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunks {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, after the last chunk.
    Trailer,
    /// The body is complete.
    Done,
}

impl Chunks {
    /// Walks `buf` and returns how many bytes belong to the body, stopping
    /// at the end of the body or where a line is incomplete; `Err` when the
    /// framing is broken.
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, ()> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match *self {
                Chunks::Done => return Ok(pos),
                Chunks::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, 0))) => {
                        pos += n;
                        *self = Chunks::Trailer;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        pos += n;
                        *self = Chunks::Data(size);
                    }
                    Ok(httparse::Status::Partial) if rest.len() < 1024 => return Ok(pos),
                    _ => return Err(()),
                },
                Chunks::Data(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let take = left.min(rest.len() as u64);
                    pos += take as usize;
                    *self = if take == left { Chunks::DataEnd } else { Chunks::Data(left - take) };
                }
                Chunks::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(());
                    }
                    pos += 2;
                    *self = Chunks::Size;
                }
                Chunks::Trailer => match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        pos += 2;
                        *self = Chunks::Done;
                    }
                    Some(line) => pos += line + 2,
                    None if rest.len() < 8192 => return Ok(pos),
                    None => return Err(()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Parsed {
        parse_request(text.as_bytes(), Vec::new())
    }

    #[test]
    fn plain_requests_are_served_here_and_unusual_ones_elsewhere() {
        let Parsed::Request(r) = parse("POST /echo?a=1 HTTP/1.1\r\nHost: x:1\r\nContent-Length: 4\r\n\r\nbody") else {
            panic!("not served")
        };
        assert_eq!((r.method, r.body, r.close, r.websocket, r.len), (Method::Post, 4, false, false, 57));
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial));
        for elsewhere in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "BREW / HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
        ] {
            assert!(matches!(parse(elsewhere), Parsed::Elsewhere), "{elsewhere:?}");
        }
    }

    #[test]
    fn only_a_real_websocket_upgrade_is_one() {
        let ws = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
        let Parsed::Request(r) = parse(&format!("{ws}\r\n")) else { panic!() };
        assert!(r.websocket && !r.upgrade_refused);
        for not_one in [
            ws.replace("GET", "POST"),
            ws.replace("Version: 13", "Version: 12"),
            ws.replace("Connection: Upgrade", "Connection: keep-alive"),
            ws.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            ws.replace("websocket", "x"),
            format!("{ws}Content-Length: 5\r\n"),
        ] {
            let Parsed::Request(r) = parse(&format!("{not_one}\r\n")) else { panic!("{not_one:?}") };
            assert!(!r.websocket && r.upgrade_refused, "{not_one:?}");
        }
    }

    #[test]
    fn the_backend_gets_end_to_end_headers_and_ours() {
        let text = "GET /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\n\
                    Upgrade: h2c\r\nX-Request-Id: theirs\r\nAccept: */*\r\n\r\n";
        let Parsed::Request(r) = parse(text) else { panic!() };
        let mut out = Vec::new();
        let fwd = Forwarding { forwarded_for: b"1.2.3.4", real_ip: b"1.2.3.4", proto: b"http", request_id: b"id-1" };
        write_upstream_request(&mut out, text.as_bytes(), &r, &fwd);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\n\
             X-Forwarded-Proto: http\r\nX-Request-Id: id-1\r\n\r\n"
        );
    }

    #[test]
    fn response_framing_and_the_clients_head() {
        let mut out = Vec::new();
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nX-Request-Id: b\r\n\r\nok";
        let ParsedResponse::Response(r) = parse_response(text, false, b"id", true, &mut out) else { panic!() };
        assert_eq!((r.status, r.framing, r.close, r.len), (200, Framing::Length(2), false, text.len() - 2));
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Request-Id: id\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let ParsedResponse::Response(r) = parse_response(text, false, b"id", false, &mut out) else { panic!() };
        assert_eq!(r.framing, Framing::Chunked);
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n";
        assert!(matches!(parse_response(text, false, b"id", false, &mut out), ParsedResponse::Invalid));
        let text = b"HTTP/1.0 200 OK\r\n\r\n";
        let ParsedResponse::Response(r) = parse_response(text, false, b"id", false, &mut out) else { panic!() };
        assert_eq!((r.framing, r.close), (Framing::Close, true));
        let text = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n";
        let ParsedResponse::Response(r) = parse_response(text, false, b"id", false, &mut out) else { panic!() };
        assert_eq!(r.framing, Framing::Empty);
    }

    #[test]
    fn chunked_bodies_end_where_the_framing_says_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for split in 0..body.len() - 4 {
            let mut c = Chunks::Size;
            let mut buf = body[..split].to_vec();
            let first = c.advance(&buf).unwrap();
            buf.drain(..first);
            buf.extend_from_slice(&body[split..]);
            let second = c.advance(&buf).unwrap();
            assert_eq!(c, Chunks::Done, "split at {split}");
            assert_eq!(first + second, body.len() - 4, "split at {split}");
        }
        assert!(Chunks::Size.advance(b"zz\r\n").is_err());
        assert!(Chunks::DataEnd.advance(b"xx").is_err());
    }
}
