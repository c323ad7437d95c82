//! HTTP/1.1 on a client connection (TCP or TLS): the gateway's own server side.
//!
//! Why not hyper's: on one serving thread, hyper's HTTP/1 server spent more instructions
//! writing a relayed token to the client than the gateway spent on everything else about
//! it, and in a synchronized burst of a thousand tokens that cost is what the last stream
//! waits for (BENCHMARKS.md, "stream fan-out"). Here a relayed piece is framed into one
//! buffer with whatever other pieces are already waiting, and written with one call.
//! HTTP/2 (prior knowledge, or chosen by ALPN) is still served by hyper ([`server`] tells
//! the two apart from the first bytes).
//!
//! What it does, as hyper did before it:
//! - request heads within `limits.max_header_bytes` and [`MAX_HEADERS`] (431 beyond), and
//!   within `limits.header_read_timeout_secs`, counted from the end of the previous
//!   response: the same limit closes an idle keep-alive connection;
//! - `Content-Length` and chunked request bodies, fed to the handler as it reads them;
//!   `Expect: 100-continue` is answered when the body is first asked for;
//! - keep-alive (HTTP/1.0 only when asked for), pipelined requests answered in order;
//! - responses framed by their length, chunked, or (HTTP/1.0) by closing; no body for HEAD,
//!   1xx, 204 and 304;
//! - a client that leaves while its request waits in a queue or streams: the handler's
//!   future, or the response body, is dropped, which frees its slot at once;
//! - drain: a connection between requests closes; one with a request in progress finishes
//!   it, says `connection: close`, and closes.
//!
//! It refuses what it cannot frame safely: a request with both `Transfer-Encoding` and
//! `Content-Length`, a coding other than `chunked`, conflicting lengths. Each is a 400, and
//! the connection is closed, so a request hidden in a body can never be read as the next one.
//!
//! [`server`]: crate::server

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::body::{BoxError, RequestBody};
use crate::error::GatewayError;

/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Most headers one request may carry.
pub const MAX_HEADERS: usize = 128;

/// Relayed bytes gathered into one write at most; more waits for the next.
const MAX_WRITE: usize = 64 * 1024;

/// Longest line of a chunked request body's framing (size and extensions, or a trailer).
const MAX_CHUNK_LINE: usize = 4096;

/// The limits one connection is served under, from the configuration in force when it was
/// accepted.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head, in bytes.
    pub max_head: usize,
    /// Longest wait for a complete request head.
    pub header_read_timeout: Duration,
}

/// Serve HTTP/1.1 on `io` until the client closes, a limit closes it, or `drain` fires.
///
/// `buf` holds bytes already read from the connection; `first_deadline` bounds the first
/// request head (when serving began, plus the header timeout). `handler` answers a
/// request; it is dropped unfinished if the client goes away.
pub async fn serve<IO, H, F, B>(
    mut io: IO,
    mut buf: BytesMut,
    limits: Limits,
    first_deadline: Instant,
    mut drain: watch::Receiver<()>,
    mut handler: H,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes, Error = BoxError>,
{
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut deadline = first_deadline;
    loop {
        // 1. The next request head, or the end of the connection.
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout_at(deadline, read_head(&mut io, &mut buf, limits.max_head)) => read,
            _ = drain.changed() => return Ok(()),
        };
        let head = match read {
            Ok(Ok(Some(head))) => head,
            // Closed between requests, or silent for too long: nothing to answer.
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(HeadError::Io(e))) => return Err(e),
            Ok(Err(HeadError::Refused(err))) => {
                let resp = err.into_response();
                let (parts, body) = resp.into_parts();
                let framing = write_head(&mut out, &parts, false, false, body.size_hint());
                write_body(&mut io, &mut buf, &mut out, pin!(body), framing, None).await?;
                let _ = io.shutdown().await;
                return Ok(());
            }
        };

        // 2. The answer, while the body is fed to the handler and the client watched.
        let Head {
            method,
            uri,
            version,
            headers,
            framing,
            mut keep_alive,
            expect_continue,
        } = head;
        let is_head = method == Method::HEAD;
        let (mut feed, body) = match framing {
            None => (None, RequestBody::Empty),
            // Already here in full: handed over as it is, with no channel, and no trip
            // through the scheduler's queue for each piece handed over.
            Some(Decoder::Length(n)) if buf.len() as u64 >= n => {
                let whole = buf.split_to(n as usize).freeze();
                (None, RequestBody::Whole(Some(whole)))
            }
            Some(decoder) => {
                let (tx, rx) = mpsc::channel(1);
                let feed = Feed {
                    tx: Some(tx),
                    decoder,
                    continue_owed: if expect_continue { CONTINUE } else { b"" },
                    broken: false,
                };
                (Some(feed), RequestBody::Read(rx))
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let mut answer = pin!(handler(req));
        let resp = loop {
            tokio::select! {
                biased;
                resp = answer.as_mut() => break resp,
                open = attend(&mut io, &mut buf, feed.as_mut(), limits.max_head) => {
                    if !open? {
                        // Dropping the handler's future takes the request out of its queue
                        // or frees its slot.
                        return Ok(());
                    }
                }
            }
        };

        // 3. The response. A `100 Continue` cut off part-way by the answer is finished
        // first, so that the answer's head does not land inside it.
        if let Some(owed) = feed.as_ref().map(|f| f.continue_owed) {
            if !owed.is_empty() && owed.len() < CONTINUE.len() {
                io.write_all(owed).await?;
            }
        }
        // A body the handler did not read to its end, or a drain begun, leaves nothing to
        // read the next request from: the connection closes after it.
        let unread = feed.as_ref().is_some_and(|f| !f.finished());
        if unread || drain.has_changed().unwrap_or(true) {
            keep_alive = false;
        }
        drop(feed);
        let (parts, body) = resp.into_parts();
        let framing = write_head(
            &mut out,
            &parts,
            keep_alive,
            version == Version::HTTP_10,
            body.size_hint(),
        );
        if framing == Framing::Close {
            keep_alive = false;
        }
        let framing = if is_head { Framing::Nothing } else { framing };
        let watch = Some(limits.max_head);
        let completed = write_body(&mut io, &mut buf, &mut out, pin!(body), framing, watch).await?;
        if !completed || !keep_alive {
            let _ = io.shutdown().await;
            return Ok(());
        }
        // One large answer must not leave every idle connection holding its size.
        if out.capacity() > 2 * MAX_WRITE {
            out = Vec::with_capacity(4096);
        }
        deadline = Instant::now() + limits.header_read_timeout;
    }
}

/// A request head, read and checked.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// How its body is framed; `None` when it has none.
    framing: Option<Decoder>,
    keep_alive: bool,
    expect_continue: bool,
}

/// Why no request head could be read.
#[derive(Debug)]
enum HeadError {
    /// The connection failed.
    Io(io::Error),
    /// The head was refused: answered with this error, then the connection is closed.
    Refused(GatewayError),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

/// Read the next request head into `buf` and parse it; `None` if the client closed
/// before sending a byte of one.
async fn read_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<Head>, HeadError> {
    loop {
        // Empty lines before a request line are allowed, and skipped (RFC 9112, 2.2).
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        buf.advance(blank);
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, max_head).map_err(HeadError::Refused)? {
                return Ok(Some(head));
            }
        }
        if buf.len() >= max_head {
            return Err(too_large(max_head));
        }
        room_to_read(buf);
        if io.read_buf(buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            };
        }
    }
}

fn too_large(max_head: usize) -> HeadError {
    HeadError::Refused(GatewayError::HeadTooLarge {
        limit: max_head,
        headers: MAX_HEADERS,
    })
}

fn malformed(why: &'static str) -> GatewayError {
    GatewayError::MalformedRequest(why)
}

/// Parse a complete head at the start of `buf` and take it off; `None` if it is not
/// complete yet. The request's target and header values share the head's bytes.
// Out of line, so that a profile of the whole-program-optimised release build names
// it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
#[inline(never)]
fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, GatewayError> {
    // Left uninitialised: zeroing room for the most headers a
    // request may have, on every request, cost more than parsing the few it has.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(GatewayError::HeadTooLarge {
                limit: max_head,
                headers: MAX_HEADERS,
            })
        }
        Err(_) => return Err(malformed("the request head is not valid HTTP/1.1")),
    };
    if len > max_head {
        return Err(GatewayError::HeadTooLarge {
            limit: max_head,
            headers: MAX_HEADERS,
        });
    }
    // httparse fills all three once the head is complete.
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(malformed("the request line is incomplete"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| malformed("bad method"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where the target and each header sit in the head, so that they can be sliced out of
    // it once it is taken off the buffer, rather than each copied into an allocation of
    // its own.
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let at = s.as_ptr() as usize - base;
        (at, at + s.len())
    };
    let target = span(target.as_bytes());
    let spans: Vec<_> = parsed
        .headers
        .iter()
        .map(|h| (span(h.name.as_bytes()), span(h.value)))
        .collect();
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1))
        .map_err(|_| malformed("bad request target"))?;
    // Room for the `X-Request-Id` the gateway sets on every request: a map built to the
    // exact size would grow, rehashing every entry, for that one insert.
    let mut headers = HeaderMap::with_capacity(spans.len() + 1);
    for &(name, value) in &spans {
        let name = HeaderName::from_bytes(&head[name.0..name.1])
            .map_err(|_| malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value.0..value.1))
            .map_err(|_| malformed("bad header value"))?;
        headers.append(name, value);
    }
    let framing = body_framing(&headers, version)?;
    let keep_alive = wants_keep_alive(&headers, version);
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// How a request's body is framed (RFC 9112, 6.3), refusing every ambiguous case.
fn body_framing(headers: &HeaderMap, version: Version) -> Result<Option<Decoder>, GatewayError> {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(coding) = codings.next() {
        if version == Version::HTTP_10 {
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        if codings.next().is_some()
            || !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return Err(malformed("the only transfer coding accepted is chunked"));
        }
        return Ok(Some(Decoder::Chunked(Chunked::Size)));
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        // Digits only: no sign, no spaces inside, no list.
        let digits = value.as_bytes().trim_ascii();
        let n = std::str::from_utf8(digits)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(malformed("bad Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(malformed("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    Ok(match length {
        None | Some(0) => None,
        Some(n) => Some(Decoder::Length(n)),
    })
}

/// Whether the client asks to keep the connection open after this request.
fn wants_keep_alive(headers: &HeaderMap, version: Version) -> bool {
    let mut close = false;
    let mut keep = false;
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (version == Version::HTTP_11 || keep)
}

/// A request body on its way from the socket to the handler.
struct Feed {
    /// Dropped once the body has ended, which ends the handler's body.
    tx: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
    decoder: Decoder,
    /// What is still to be written of a `100 Continue` the client asked for before it
    /// sends the body: all of it until the handler first asks for the body.
    continue_owed: &'static [u8],
    /// The body was cut or malformed; the handler was told, nothing more is read.
    broken: bool,
}

impl Feed {
    /// Whether more of the body should be read for the handler.
    fn wants_more(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed()) && !self.broken
    }

    /// Whether the body was read to its end, leaving the next request in the buffer.
    fn finished(&self) -> bool {
        self.tx.is_none() && !self.broken
    }
}

/// While a request is being answered: feed its body to the handler, and once the body is
/// done (or unwanted) watch the client. `false` if the client has gone.
async fn attend<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    feed: Option<&mut Feed>,
    max_head: usize,
) -> io::Result<bool> {
    match feed {
        Some(feed) if feed.wants_more() => feed_step(io, buf, feed).await.map(|()| true),
        _ => Ok(client_open(io, buf, max_head).await),
    }
}

/// Hand the handler the next piece of its body, once it has room for one: from `buf`, or
/// read from `io`. Cancel-safe: nothing is taken off `buf` until it can be sent, and the
/// `100 Continue` written so far is recorded write by write.
async fn feed_step<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    feed: &mut Feed,
) -> io::Result<()> {
    let Some(tx) = feed.tx.as_ref() else {
        return Ok(());
    };
    let Ok(permit) = tx.reserve().await else {
        // The handler dropped the body unread.
        return Ok(());
    };
    // A write at a time, each one kept track of, so that an answer arriving meanwhile
    // (which cancels this) knows how much of it went out.
    while !feed.continue_owed.is_empty() {
        let n = io.write(feed.continue_owed).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        feed.continue_owed = &feed.continue_owed[n..];
    }
    loop {
        match feed.decoder.next(buf) {
            Ok(Piece::Data(data)) => {
                permit.send(Ok(data));
                return Ok(());
            }
            Ok(Piece::End) => {
                drop(permit);
                feed.tx = None;
                return Ok(());
            }
            Ok(Piece::More) => {}
            Err(why) => {
                permit.send(Err(why.into()));
                feed.broken = true;
                return Ok(());
            }
        }
        room_to_read(buf);
        if io.read_buf(buf).await? == 0 {
            permit.send(Err(
                "the client closed the connection before the body ended".into(),
            ));
            feed.broken = true;
            return Ok(());
        }
    }
}

/// Wait until the client closes its side (`false`) or sends more (`true`, kept in `buf`
/// for the next request). A client that sends a whole head's worth ahead is no longer
/// read until this request is answered.
async fn client_open<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    max_head: usize,
) -> bool {
    if buf.len() >= max_head {
        return std::future::pending().await;
    }
    room_to_read(buf);
    matches!(io.read_buf(buf).await, Ok(n) if n > 0)
}

/// Make room in `buf` for a read, when little is left. Each request's head and body are
/// pieces of the buffer they were read into, so while one is in progress its buffer cannot
/// be reused; this keeps reading into what is left of it instead of allocating anew for
/// every read.
fn room_to_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8192);
    }
}

/// How a request body is delimited, and how far through it the reading is.
#[derive(Debug)]
enum Decoder {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
}

/// Where in a chunked body the reading is.
#[derive(Debug)]
enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes left.
    Data(u64),
    /// At the CRLF that ends a chunk.
    DataEnd,
    /// In the trailer section, after the last chunk.
    Trailers,
    Done,
}

/// What a decoder found in the buffer.
enum Piece {
    Data(Bytes),
    /// Nothing yet: read more.
    More,
    End,
}

impl Decoder {
    /// The next piece of body in `buf`, taken off it.
    fn next(&mut self, buf: &mut BytesMut) -> Result<Piece, &'static str> {
        match self {
            Decoder::Length(0) => Ok(Piece::End),
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(Piece::More);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok(Piece::Data(buf.split_to(n).freeze()))
            }
            Decoder::Chunked(state) => loop {
                match state {
                    Chunked::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Piece::More);
                        };
                        let size = chunk_size(&line)?;
                        *state = if size == 0 {
                            Chunked::Trailers
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Chunked::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Piece::More);
                        }
                        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                        *left -= n as u64;
                        let data = buf.split_to(n).freeze();
                        if *left == 0 {
                            *state = Chunked::DataEnd;
                        }
                        return Ok(Piece::Data(data));
                    }
                    Chunked::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Piece::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err("a chunk is longer than its size says");
                        }
                        buf.advance(2);
                        *state = Chunked::Size;
                    }
                    Chunked::Trailers => {
                        // Trailers are read past and dropped: nothing forwards them.
                        let Some(line) = take_line(buf)? else {
                            return Ok(Piece::More);
                        };
                        if line.is_empty() {
                            *state = Chunked::Done;
                        }
                    }
                    Chunked::Done => return Ok(Piece::End),
                }
            },
        }
    }
}

/// A CRLF-ended line taken off `buf`, without its CRLF; `None` until one is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, &'static str> {
    match memchr::memchr(b'\n', buf) {
        Some(end) if end > 0 && buf[end - 1] == b'\r' => {
            let line = buf.split_to(end + 1).freeze();
            Ok(Some(line.slice(..end - 1)))
        }
        Some(_) => Err("a chunk line does not end with CRLF"),
        None if buf.len() > MAX_CHUNK_LINE => Err("a chunk line is too long"),
        None => Ok(None),
    }
}

/// The size on a chunk-size line (hex digits; extensions after `;` are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err("bad chunk size");
    }
    let mut size = 0u64;
    for &b in digits {
        let d = (b as char).to_digit(16).ok_or("bad chunk size")?;
        size = size * 16 + u64::from(d);
    }
    Ok(size)
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body is sent (HEAD, 1xx, 204, 304).
    Nothing,
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// Headers that belong to one connection, which the server writes itself.
fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION || name == header::TRANSFER_ENCODING || name.as_str() == "keep-alive"
}

/// Write the response head into `out`, and say how its body is framed.
// Out of line, so that a profile of the whole-program-optimised release build names
// it (loadtest/bench/instructions.sh breaks the gateway's work down by function).
#[inline(never)]
fn write_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    keep_alive: bool,
    http10_client: bool,
    hint: http_body::SizeHint,
) -> Framing {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let framing = if bodiless {
        Framing::Nothing
    } else if let Some(n) = declared.or(hint.exact()) {
        Framing::Length(n)
    } else if http10_client {
        Framing::Close
    } else {
        Framing::Chunked
    };
    for (name, value) in &parts.headers {
        if hop_by_hop(name) || (name == header::CONTENT_LENGTH && declared.is_none()) {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Length(n) if declared.is_none() => {
            let mut digits = itoa::Buffer::new();
            put_header(out, b"content-length", digits.format(n).as_bytes());
        }
        Framing::Chunked => put_header(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !parts.headers.contains_key(header::DATE) {
        DATE.with(|d| d.put(out));
    }
    if !keep_alive || framing == Framing::Close {
        put_header(out, b"connection", b"close");
    } else if http10_client {
        put_header(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Send the head in `out` and the body after it: each time, every piece the body has
/// ready, in one write. While it waits for the body, the client is watched (when
/// `watch_client` gives the most it may send ahead), so that one that leaves mid-stream
/// frees the backend at once.
///
/// Returns whether the response went out whole; `false` ends the connection.
async fn write_body<IO: AsyncRead + AsyncWrite + Unpin, B: Body<Data = Bytes, Error = BoxError>>(
    io: &mut IO,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    mut body: std::pin::Pin<&mut B>,
    framing: Framing,
    watch_client: Option<usize>,
) -> io::Result<bool> {
    let mut sent = 0u64;
    let mut state = if framing == Framing::Nothing {
        Step::End
    } else {
        Step::Going
    };
    loop {
        while state == Step::Going && out.len() < MAX_WRITE {
            match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Pending => break,
                Poll::Ready(frame) => state = frame_out(out, frame, framing, &mut sent),
            }
        }
        if !out.is_empty() {
            let written = io.write_all(out).await;
            out.clear();
            written?;
        }
        match state {
            Step::Going => {}
            Step::End => return Ok(true),
            Step::Cut => return Ok(false),
        }
        tokio::select! {
            biased;
            frame = poll_fn(|cx| body.as_mut().poll_frame(cx)) => {
                state = frame_out(out, frame, framing, &mut sent);
            }
            open = client_open(io, buf, watch_client.unwrap_or(0)), if watch_client.is_some() => {
                if !open {
                    return Ok(false);
                }
            }
        }
    }
}

/// Where a response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Going,
    End,
    /// It failed, or broke its declared length: the client sees the connection close.
    Cut,
}

/// Frame one of the body's pieces (or its end) into `out`.
fn frame_out(
    out: &mut Vec<u8>,
    frame: Option<Result<Frame<Bytes>, BoxError>>,
    framing: Framing,
    sent: &mut u64,
) -> Step {
    let data = match frame {
        None => {
            return match framing {
                Framing::Chunked => {
                    out.extend_from_slice(b"0\r\n\r\n");
                    Step::End
                }
                Framing::Length(n) if *sent != n => Step::Cut,
                _ => Step::End,
            };
        }
        Some(Err(err)) => {
            tracing::debug!(error = %err, "response body failed; closing the connection");
            return Step::Cut;
        }
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => data,
            Err(_) => return Step::Going, // trailers: not sent
        },
    };
    if data.is_empty() {
        return Step::Going;
    }
    *sent += data.len() as u64;
    match framing {
        Framing::Chunked => {
            let mut size = [0u8; 16];
            let hex = hex_len(&mut size, data.len());
            out.extend_from_slice(hex);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(n) if *sent > n => return Step::Cut,
        _ => out.extend_from_slice(&data),
    }
    Step::Going
}

/// `n` in lower-case hex, written at the end of `scratch`.
fn hex_len(scratch: &mut [u8; 16], mut n: usize) -> &[u8] {
    let mut at = scratch.len();
    loop {
        at -= 1;
        scratch[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &scratch[at..];
        }
    }
}

thread_local! {
    /// The `date` header's value, formatted once a second per thread.
    static DATE: CachedDate = CachedDate::default();
}

#[derive(Default)]
struct CachedDate(std::cell::RefCell<(u64, String)>);

impl CachedDate {
    /// Write the `date` header into `out`.
    fn put(&self, out: &mut Vec<u8>) {
        let now = std::time::SystemTime::now();
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut cached = self.0.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        put_header(out, b"date", cached.1.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use tokio::io::DuplexStream;

    use super::*;

    type Reply = Response<http_body_util::combinators::BoxBody<Bytes, BoxError>>;

    fn full(status: u16, body: impl Into<Bytes>) -> Reply {
        let body = Full::new(body.into())
            .map_err(|never| match never {})
            .boxed();
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        resp
    }

    const LIMITS: Limits = Limits {
        max_head: 8192,
        header_read_timeout: Duration::from_secs(5),
    };

    /// A connection served by `handler`: the client's end, the server's task and its drain.
    fn connect<H, F>(
        handler: H,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<io::Result<()>>,
        watch::Sender<()>,
    )
    where
        H: FnMut(Request<RequestBody>) -> F + Send + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (drain_tx, drain) = watch::channel(());
        let deadline = Instant::now() + LIMITS.header_read_timeout;
        let task = tokio::spawn(serve(
            server,
            BytesMut::new(),
            LIMITS,
            deadline,
            drain,
            handler,
        ));
        (client, task, drain_tx)
    }

    /// Answers with the method, target and body it was sent.
    async fn echo(req: Request<RequestBody>) -> Reply {
        let (parts, body) = req.into_parts();
        let got = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return full(400, e.to_string()),
        };
        let got = String::from_utf8_lossy(&got);
        full(200, format!("{} {} {got}", parts.method, parts.uri))
    }

    /// Everything the server sends until it closes, or until `within`.
    async fn read_all(client: &mut DuplexStream, within: Duration) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(within, client.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Read until `pattern` has been seen `times` times.
    async fn read_until(client: &mut DuplexStream, pattern: &str, times: usize) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(5), async {
            while String::from_utf8_lossy(&got).matches(pattern).count() < times {
                let n = client.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out: {}", String::from_utf8_lossy(&got)));
        String::from_utf8_lossy(&got).into_owned()
    }

    /// How many responses `answer` holds.
    fn status_lines(answer: &str) -> usize {
        answer
            .split("\r\n")
            .filter(|l| l.starts_with("HTTP/1.1 "))
            .count()
    }

    fn body_of(answer: &str) -> &str {
        answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut c, _task, _drain) = connect(echo);
        c.write_all(
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
        let got = read_until(&mut c, "HTTP/1.1 200 OK", 2).await;
        let got = read_until_complete(&mut c, got, "GET /b ").await;
        let first = got.find("POST /a hello").expect(&got);
        let second = got.find("GET /b ").expect(&got);
        assert!(first < second, "{got}");
        assert!(got.contains("content-length: 13\r\n"), "{got}");
        assert!(!got.contains("connection: close"), "{got}");
    }

    async fn read_until_complete(c: &mut DuplexStream, mut got: String, tail: &str) -> String {
        if !got.contains(tail) {
            got.push_str(&read_until(c, tail, 1).await);
        }
        got
    }

    #[tokio::test]
    async fn a_chunked_request_body_is_decoded_across_any_split() {
        let wire = b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ntrailer: t\r\n\r\n";
        for split in [1usize, 2, 3, 7, 64] {
            let (mut c, _task, _drain) = connect(echo);
            for piece in wire.chunks(split) {
                c.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            let got = read_until(&mut c, "hello world", 1).await;
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
            assert_eq!(body_of(&got), "POST /c hello world", "split {split}");
        }
    }

    #[tokio::test]
    async fn expect_continue_is_answered_before_the_body_is_read() {
        let (mut c, _task, _drain) = connect(echo);
        c.write_all(
            b"POST /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
        )
        .await
        .unwrap();
        let got = read_until(&mut c, "100 Continue\r\n\r\n", 1).await;
        assert_eq!(got, "HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"ok").await.unwrap();
        let got = read_until(&mut c, "POST /e ok", 1).await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    }

    #[tokio::test]
    async fn no_continue_is_sent_for_a_body_the_handler_never_reads() {
        let (mut c, task, _drain) = connect(|_req| async { full(401, "no key") });
        c.write_all(b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 9\r\n\r\n")
            .await
            .unwrap();
        let got = read_all(&mut c, Duration::from_secs(5)).await;
        assert!(got.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{got}");
        assert!(!got.contains("100 Continue"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn ambiguous_or_malformed_heads_get_a_400_and_the_connection_closes() {
        let heads: [&[u8]; 8] = [
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: +3\r\n\r\n",
            b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ];
        for head in heads {
            let (mut c, task, _drain) = connect(echo);
            c.write_all(head).await.unwrap();
            // Anything after the refused head is never read as a request.
            c.write_all(b"GET /smuggled HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let got = read_all(&mut c, Duration::from_secs(5)).await;
            let shown = String::from_utf8_lossy(head);
            assert!(
                got.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{shown}: {got}"
            );
            assert!(
                got.contains("\"code\":\"malformed_request\""),
                "{shown}: {got}"
            );
            assert!(got.contains("connection: close\r\n"), "{shown}: {got}");
            assert_eq!(status_lines(&got), 1, "{shown}: {got}");
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limits_gets_a_431() {
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        let long = format!("x-long: {}\r\n", "v".repeat(LIMITS.max_head));
        for extra in [many, long] {
            let (mut c, _task, _drain) = connect(echo);
            let head = format!("GET / HTTP/1.1\r\n{extra}\r\n");
            let _ = c.write_all(head.as_bytes()).await;
            let got = read_all(&mut c, Duration::from_secs(5)).await;
            assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
            assert!(got.contains("request_header_fields_too_large"), "{got}");
        }
    }

    #[tokio::test]
    async fn http10_closes_unless_asked_and_head_has_no_body() {
        let (mut c, task, _drain) = connect(echo);
        c.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
        let got = read_all(&mut c, Duration::from_secs(5)).await;
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert_eq!(body_of(&got), "GET /old ");
        task.await.unwrap().unwrap();

        let (mut c, _task, _drain) = connect(echo);
        c.write_all(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\nHEAD /b HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut c, "HTTP/1.1 200 OK", 2).await;
        let got = read_until_complete(&mut c, got, "content-length: 8\r\n").await;
        assert!(got.contains("connection: keep-alive\r\n"), "{got}");
        // The HEAD answer says how long the body would be, and sends none.
        assert!(got.ends_with("\r\n\r\n"), "{got}");
    }

    /// A handler that streams whatever the test sends into `pieces`.
    fn streaming(
        pieces: Arc<std::sync::Mutex<Option<http_body_util::channel::Sender<Bytes, BoxError>>>>,
    ) -> impl FnMut(Request<RequestBody>) -> std::future::Ready<Reply> {
        move |_req| {
            let (tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
            *pieces.lock().unwrap() = Some(tx);
            std::future::ready(Response::new(body.boxed()))
        }
    }

    #[tokio::test]
    async fn a_stream_is_chunked_piece_by_piece_and_ended() {
        let pieces = Arc::new(std::sync::Mutex::new(None));
        let (mut c, _task, _drain) = connect(streaming(pieces.clone()));
        c.write_all(b"POST /s HTTP/1.1\r\n\r\n").await.unwrap();
        // The head goes out before any of the body exists.
        let got = read_until(&mut c, "\r\n\r\n", 1).await;
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        let mut tx = pieces.lock().unwrap().take().unwrap();
        tx.send_data(Bytes::from_static(b"data: 1\n\n"))
            .await
            .unwrap();
        assert_eq!(read_until(&mut c, "\r\n", 2).await, "9\r\ndata: 1\n\n\r\n");
        let big = Bytes::from(vec![b'x'; 300]);
        tx.send_data(big).await.unwrap();
        let got = read_until(&mut c, "x\r\n", 1).await;
        assert!(got.starts_with("12c\r\nxxx"), "{got}");
        drop(tx);
        assert_eq!(read_until(&mut c, "0\r\n\r\n", 1).await, "0\r\n\r\n");
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_stream_drops_the_body() {
        let pieces = Arc::new(std::sync::Mutex::new(None));
        let (mut c, task, _drain) = connect(streaming(pieces.clone()));
        c.write_all(b"POST /s HTTP/1.1\r\n\r\n").await.unwrap();
        read_until(&mut c, "\r\n\r\n", 1).await;
        let mut tx = pieces.lock().unwrap().take().unwrap();
        drop(c);
        task.await.unwrap().unwrap();
        // The body's receiving end is gone: the relay behind it would stop.
        assert!(tx.send_data(Bytes::from_static(b"late")).await.is_err());
    }

    #[tokio::test]
    async fn a_client_that_leaves_while_waiting_drops_the_handler() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let d = dropped.clone();
        let (mut c, task, _drain) = connect(move |_req| {
            let flag = Flag(d.clone());
            async move {
                let _flag = flag;
                std::future::pending::<()>().await;
                full(200, "never")
            }
        });
        c.write_all(b"GET /wait HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_drain_closes_an_idle_connection_and_ends_a_busy_one_after_its_answer() {
        let (mut c, task, drain) = connect(echo);
        drain.send(()).unwrap();
        assert_eq!(read_all(&mut c, Duration::from_secs(5)).await, "");
        task.await.unwrap().unwrap();

        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let mut release = Some(release_rx);
        let (mut c, task, drain) = connect(move |_req| {
            let wait = release.take();
            async move {
                if let Some(wait) = wait {
                    let _ = wait.await;
                }
                full(200, "done")
            }
        });
        c.write_all(b"GET /busy HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain.send(()).unwrap();
        release_tx.send(()).unwrap();
        let got = read_all(&mut c, Duration::from_secs(5)).await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert_eq!(body_of(&got), "done");
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_or_slow_head_is_closed_at_the_header_timeout() {
        for sent in [&b""[..], b"GET / HTTP/1.1\r\nhost:"] {
            let (mut c, task, _drain) = connect(echo);
            c.write_all(sent).await.unwrap();
            let t = Instant::now();
            task.await.unwrap().unwrap();
            assert!(t.elapsed() >= LIMITS.header_read_timeout);
            assert_eq!(read_all(&mut c, Duration::from_secs(1)).await, "");
        }
    }

    #[tokio::test]
    async fn an_unread_body_closes_the_connection_after_the_answer() {
        let (mut c, task, _drain) = connect(|_req| async { full(401, "no") });
        c.write_all(b"POST / HTTP/1.1\r\ncontent-length: 100\r\n\r\nGET /hidden HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let got = read_all(&mut c, Duration::from_secs(5)).await;
        assert!(got.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert_eq!(status_lines(&got), 1, "{got}");
        task.await.unwrap().unwrap();
    }

    #[test]
    fn random_heads_never_panic_and_any_accepted_one_is_consistent() {
        let mut rng = crate::fuzz::XorShift::new(0x3c6e_f372_fe94_f82b);
        let pieces: [&[u8]; 12] = [
            b"GET / HTTP/1.1\r\n",
            b"POST /v1/chat/completions HTTP/1.0\r\n",
            b"content-length: 12\r\n",
            b"content-length: -1\r\n",
            b"transfer-encoding: chunked\r\n",
            b"connection: close, keep-alive\r\n",
            b"expect: 100-continue\r\n",
            b"\r\n",
            b"x: \xff\xfe\r\n",
            b": novalue\r\n",
            b"\n",
            b" ",
        ];
        for _ in 0..20_000 {
            let mut wire = Vec::new();
            for _ in 0..rng.below(8) {
                wire.extend_from_slice(pieces[rng.below(pieces.len())]);
            }
            let tail = rng.below(12);
            wire.extend(rng.bytes(b"GET :/\r\n0123456789abcdef;", tail, Some(8)));
            let mut buf = BytesMut::from(&wire[..]);
            if let Ok(Some(head)) = parse_head(&mut buf, 8192) {
                let has_te = head.headers.contains_key(header::TRANSFER_ENCODING);
                let has_cl = head.headers.contains_key(header::CONTENT_LENGTH);
                assert!(!(has_te && has_cl), "{:?}", String::from_utf8_lossy(&wire));
                assert!(buf.len() < wire.len());
            }
            let mut decoder = Decoder::Chunked(Chunked::Size);
            let mut body = BytesMut::from(&wire[..]);
            while let Ok(Piece::Data(_)) = decoder.next(&mut body) {}
        }
    }

    #[test]
    fn chunk_sizes_are_hex_and_bounded() {
        assert_eq!(chunk_size(b"1a"), Ok(26));
        assert_eq!(chunk_size(b"A;name=value"), Ok(10));
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"g").is_err());
        assert!(chunk_size(b"1000000000000000").is_err());
        let mut s = [0u8; 16];
        assert_eq!(hex_len(&mut s, 0), b"0");
        assert_eq!(hex_len(&mut s, 300), b"12c");
    }
}
