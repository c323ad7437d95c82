//! HTTP/1.1 as the backend client speaks it: the request head it writes, the response head
//! it reads, and the response body's framing, decoded in place in the connection's read
//! buffer.
//!
//! The decoder hands out each piece of body data as a slice of that buffer (no copy), and
//! reads a chunk's size line with one search for its end rather than a byte at a time: a
//! streamed token is one chunk, so this is the work done per token.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Longest response head accepted, and the most trailer bytes skipped after a chunked body.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most response header lines accepted.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// A backend's response that cannot be read as HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    #[error("the connection closed before the end of the body")]
    Incomplete,
}

/// Write the request head, and `body` after it when it is small enough that one copy is
/// cheaper than a second write. Returns whether the body was written.
///
/// `Content-Length` and `Transfer-Encoding` come from `body`, never from `headers`; `host`
/// is sent unless `headers` has its own.
pub fn encode_request(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    host: &HeaderValue,
    body: &[u8],
    out: &mut BytesMut,
) -> bool {
    const INLINE_BODY: usize = 16 * 1024;
    out.reserve(256 + path.len() + body.len().min(INLINE_BODY));
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(header::HOST) {
        put_header(out, b"host", host.as_bytes());
    }
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let has_body_semantics = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    if !body.is_empty() || has_body_semantics {
        put_header(
            out,
            b"content-length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    let inline = body.len() <= INLINE_BODY;
    if inline {
        out.extend_from_slice(body);
    }
    inline
}

fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a `HEAD` request, or status 1xx, 204 or 304.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the backend closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this body has been read.
    pub keep_alive: bool,
}

/// How many headers the gateway may add to a backend's response before relaying it.
const ADDED_HEADERS: usize = 5;

/// Parse a response head at the start of `buf`. `Ok(None)` means more bytes are needed;
/// `Ok(Some((head, n)))` that the head took the first `n` bytes.
pub fn parse_response(buf: &[u8], method: &Method) -> Result<Option<(Head, usize)>, FramingError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(FramingError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(FramingError::Head("too many headers")),
        Err(_) => {
            return Err(FramingError::Head(
                "not an HTTP/1.x status line and headers",
            ))
        }
    };
    if len > MAX_HEAD {
        return Err(FramingError::HeadTooLarge);
    }
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(FramingError::Head("invalid status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Room for what the gateway adds on the way out (`X-Backend`, `X-Request-Id`, and for a
    // stream `Cache-Control` and `X-Accel-Buffering`): a map built to the exact size grows,
    // rehashing every entry, at the first of them.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + ADDED_HEADERS);
    let mut close = version == Version::HTTP_10;
    let mut chunked_last = None;
    let mut length: Option<u64> = None;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| FramingError::Head("invalid header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| FramingError::Head("invalid header value"))?;
        if name == header::CONNECTION {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            // Only the last coding decides how the message is delimited.
            if let Some(last) = tokens(h.value).last() {
                chunked_last = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name == header::CONTENT_LENGTH {
            for token in tokens(h.value) {
                let n = parse_decimal(token).ok_or(FramingError::Head("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(FramingError::Head("conflicting Content-Length values"));
                }
                length = Some(n);
            }
        }
        headers.append(name, value);
    }
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else {
        match (chunked_last, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    let keep_alive = !close && framing != Framing::UntilClose;
    Ok(Some((
        Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        },
        len,
    )))
}

/// The comma-separated, trimmed, non-empty items of a header value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body data, split off the front of the buffer.
    Data(Bytes),
    /// The body is complete.
    Done,
    /// More bytes must be read first.
    More,
}

/// Decodes one response body from the connection's read buffer as bytes arrive.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    /// Small pieces are split off the read buffer rather than copied (see [`take`]).
    split_small: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    /// After the last chunk: trailer lines up to an empty one; the count is bytes skipped.
    Trailers(usize),
    UntilClose,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder {
            state,
            split_small: true,
        }
    }

    /// Whether small pieces are still split off the read buffer rather than copied.
    pub fn splits_small_pieces(&self) -> bool {
        self.split_small
    }

    /// Copy small pieces out of the read buffer from now on: whoever takes them holds on
    /// to them past the next read.
    pub fn copy_small_pieces(&mut self) {
        self.split_small = false;
    }

    /// The body has been read to its end.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Take the next piece of body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, FramingError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Length(n) => {
                    let Some((data, rest)) = take_up_to(buf, n, self.split_small) else {
                        return Ok(Step::More);
                    };
                    self.state = if rest == 0 {
                        State::Done
                    } else {
                        State::Length(rest)
                    };
                    return Ok(Step::Data(data));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(take(buf, buf.len(), self.split_small)));
                }
                State::ChunkSize => {
                    let Some((content, whole)) = next_line(buf)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..content])?;
                    buf.advance(whole);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkData(n) => {
                    let Some((data, rest)) = take_up_to(buf, n, self.split_small) else {
                        return Ok(Step::More);
                    };
                    self.state = if rest == 0 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(rest)
                    };
                    return Ok(Step::Data(data));
                }
                State::ChunkDataEnd => match buf.first() {
                    None => return Ok(Step::More),
                    Some(b'\n') => {
                        buf.advance(1);
                        self.state = State::ChunkSize;
                    }
                    Some(b'\r') => match buf.get(1) {
                        None => return Ok(Step::More),
                        Some(b'\n') => {
                            buf.advance(2);
                            self.state = State::ChunkSize;
                        }
                        Some(_) => return Err(FramingError::Chunk("data not followed by CRLF")),
                    },
                    Some(_) => return Err(FramingError::Chunk("data longer than its size")),
                },
                State::Trailers(skipped) => {
                    let Some((content, whole)) = next_line(buf)? else {
                        return Ok(Step::More);
                    };
                    buf.advance(whole);
                    if content == 0 {
                        self.state = State::Done;
                        continue;
                    }
                    let skipped = skipped + content;
                    if skipped > MAX_HEAD {
                        return Err(FramingError::Chunk("trailers too large"));
                    }
                    self.state = State::Trailers(skipped);
                }
            }
        }
    }

    /// The connection reached its end of file: the end of the body if the framing says so.
    pub fn eof(&mut self) -> Result<Step, FramingError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(Step::Done)
            }
            _ => Err(FramingError::Incomplete),
        }
    }
}

/// Up to `n` bytes taken off the front of `buf` (none if it is empty), and how many of
/// the `n` are still to come.
fn take_up_to(buf: &mut BytesMut, n: u64, split_small: bool) -> Option<(Bytes, u64)> {
    if buf.is_empty() {
        return None;
    }
    let len = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
    Some((take(buf, len, split_small), n - len as u64))
}

/// Pieces up to this size are copied out of the read buffer when `split_small` is off.
const COPY_MAX: usize = 4 * 1024;

/// The first `len` bytes of `buf`, taken off it.
///
/// A piece split off shares the buffer's memory. When its taker lets go of it before the
/// next read (the gateway's own HTTP/1 server copies each piece into its write buffer and
/// drops it), the next read reclaims the whole buffer, and a streamed token costs two
/// reference counts instead of an allocation, a copy and a free. A taker that holds
/// pieces past the next read (hyper's HTTP/2 queue) would make every read allocate a new
/// buffer instead; for it the body switches `split_small` off, and small pieces (a token,
/// most answers) are copied. A large piece is always split off.
fn take(buf: &mut BytesMut, len: usize, split_small: bool) -> Bytes {
    if split_small || len > COPY_MAX {
        buf.split_to(len).freeze()
    } else {
        let piece = Bytes::copy_from_slice(&buf[..len]);
        buf.advance(len);
        piece
    }
}

/// The next line in `buf`: the length of its content (without the line ending) and of
/// the whole line; `None` if no whole line is there yet. Nothing is taken off `buf`:
/// the caller reads `buf[..content]`, then advances past the line.
fn next_line(buf: &[u8]) -> Result<Option<(usize, usize)>, FramingError> {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > MAX_LINE {
            Err(FramingError::Chunk("line too long"))
        } else {
            Ok(None)
        };
    };
    if end > MAX_LINE {
        return Err(FramingError::Chunk("line too long"));
    }
    let content = if end > 0 && buf[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    Ok(Some((content, end + 1)))
}

/// The size from a chunk-size line: hex digits, then optional whitespace and extensions.
fn chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 {
        return Err(FramingError::Chunk("no chunk size"));
    }
    if digits > 15 {
        return Err(FramingError::Chunk("chunk size too large"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(FramingError::Chunk("invalid chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n * 16 + u64::from(v)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::XorShift;

    fn head(text: &str, method: Method) -> Head {
        let (head, n) = parse_response(text.as_bytes(), &method)
            .expect("valid")
            .expect("complete");
        assert_eq!(n, text.len());
        head
    }

    /// Feed `wire` to a decoder in pieces of the given sizes; the body and whether it ended.
    fn decode_in_pieces(framing: Framing, wire: &[u8], pieces: &[usize]) -> (Vec<u8>, bool) {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut at = 0;
        let mut sizes = pieces.iter().copied().cycle();
        loop {
            match d.decode(&mut buf).expect("valid framing") {
                Step::Data(b) => body.extend_from_slice(&b),
                Step::Done => return (body, true),
                Step::More if at == wire.len() => {
                    let ended = d.eof().is_ok();
                    return (body, ended);
                }
                Step::More => {
                    let n = sizes.next().unwrap_or(1).max(1).min(wire.len() - at);
                    buf.extend_from_slice(&wire[at..at + n]);
                    at += n;
                }
            }
        }
    }

    #[test]
    fn the_request_head_carries_our_host_and_the_body_length() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let mut out = BytesMut::new();
        let host = HeaderValue::from_static("10.0.0.1:8080");
        let inline = encode_request(
            &Method::POST,
            "/v1/chat/completions",
            &headers,
            &host,
            b"{}",
            &mut out,
        );
        assert!(inline);
        assert_eq!(
            &out[..],
            &b"POST /v1/chat/completions HTTP/1.1\r\nhost: 10.0.0.1:8080\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"[..]
        );
        out.clear();
        encode_request(
            &Method::GET,
            "/health",
            &HeaderMap::new(),
            &host,
            b"",
            &mut out,
        );
        assert_eq!(
            &out[..],
            &b"GET /health HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\r\n"[..]
        );
        out.clear();
        let big = vec![b'x'; 100_000];
        assert!(!encode_request(
            &Method::POST,
            "/",
            &HeaderMap::new(),
            &host,
            &big,
            &mut out
        ));
        assert!(out.ends_with(b"content-length: 100000\r\n\r\n"));
    }

    #[test]
    fn framing_follows_the_head() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 5\r\n\r\n",
            Method::POST,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            Method::GET,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD);
        assert_eq!(h.framing, Framing::Empty);
        let h = head("HTTP/1.1 204 No Content\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        );
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Method::GET);
        assert!(!h.keep_alive);
        let h = head(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
            Method::GET,
        );
        assert!(h.keep_alive);
        assert_eq!(h.headers.get("connection").unwrap(), "keep-alive");
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n",
            Method::GET,
        );
        assert_eq!(h.framing, Framing::Length(7));
    }

    #[test]
    fn bad_heads_are_refused_and_partial_ones_wait() {
        let get = |s: &[u8]| parse_response(s, &Method::GET);
        assert!(matches!(get(b"HTTP/1.1 200 OK\r\ncontent-le"), Ok(None)));
        assert!(matches!(get(b""), Ok(None)));
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(get(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut long = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(get(&long).unwrap_err(), FramingError::HeadTooLarge);
    }

    #[test]
    fn a_chunked_body_decodes_the_same_however_it_is_split() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nB \r\nworld, done\r\n0\r\nx-trailer: 1\r\n\r\n";
        let mut rng = XorShift::new(7);
        for _ in 0..500 {
            let pieces: Vec<usize> = (0..8).map(|_| 1 + rng.below(12)).collect();
            let (body, ended) = decode_in_pieces(Framing::Chunked, wire, &pieces);
            assert_eq!(String::from_utf8(body).unwrap(), "hello world, done");
            assert!(ended, "pieces {pieces:?}");
        }
        // Bare LF line endings are accepted, as most servers and clients do.
        let (body, ended) = decode_in_pieces(Framing::Chunked, b"3\nabc\n0\n\n", &[100]);
        assert_eq!((&body[..], ended), (&b"abc"[..], true));
    }

    #[test]
    fn a_body_cut_short_is_an_error_unless_it_ends_with_the_connection() {
        let (body, ended) = decode_in_pieces(Framing::Chunked, b"5\r\nhel", &[2]);
        assert_eq!((&body[..], ended), (&b"hel"[..], false));
        let (body, ended) = decode_in_pieces(Framing::Length(10), b"hello", &[3]);
        assert_eq!((&body[..], ended), (&b"hello"[..], false));
        let (body, ended) = decode_in_pieces(Framing::UntilClose, b"hello", &[3]);
        assert_eq!((&body[..], ended), (&b"hello"[..], true));
        let (body, ended) = decode_in_pieces(Framing::Length(5), b"hello", &[2]);
        assert_eq!((&body[..], ended), (&b"hello"[..], true));
    }

    #[test]
    fn a_length_body_leaves_what_follows_it_in_the_buffer() {
        let mut d = Decoder::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcHTTP/1.1"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Step::Data(Bytes::from_static(b"abc")))
        );
        assert_eq!(d.decode(&mut buf), Ok(Step::Done));
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    #[test]
    fn a_token_dropped_before_the_next_read_leaves_the_buffer_reclaimable() {
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let start = buf.as_ptr();
        for i in 0..3 {
            buf.extend_from_slice(format!("8\r\ntoken {i:02}\r\n").as_bytes());
            let token = d.decode(&mut buf).unwrap();
            assert_eq!(token, Step::Data(Bytes::from(format!("token {i:02}"))));
            assert_eq!(d.decode(&mut buf), Ok(Step::More));
            // Split off, not copied: the buffer is shared while the token is held...
            assert!(
                !buf.try_reclaim(16 * 1024),
                "the token must share the buffer"
            );
            drop(token);
            // ...and whole again once it is let go of, with no new allocation.
            assert!(buf.try_reclaim(16 * 1024));
            assert_eq!(buf.as_ptr(), start);
        }
    }

    #[test]
    fn a_token_held_past_the_next_read_is_copied_once_told() {
        let mut d = Decoder::new(Framing::Chunked);
        d.copy_small_pieces();
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut tokens = Vec::new();
        for i in 0..3 {
            buf.extend_from_slice(format!("8\r\ntoken {i:02}\r\n").as_bytes());
            // The token is still held (by a queued write to the client) when the next
            // read wants the buffer's memory back.
            tokens.push(d.decode(&mut buf).unwrap());
            assert_eq!(d.decode(&mut buf), Ok(Step::More));
            assert!(buf.is_empty());
            assert!(
                buf.try_reclaim(16 * 1024),
                "the buffer must not share its memory"
            );
        }
        assert_eq!(tokens[2], Step::Data(Bytes::from_static(b"token 02")));

        // A large piece is split off, not copied, and comes out whole all the same.
        let big = vec![b'x'; 3 * COPY_MAX];
        let mut d = Decoder::new(Framing::Length(big.len() as u64));
        d.copy_small_pieces();
        let mut buf = BytesMut::from(&big[..]);
        assert_eq!(d.decode(&mut buf), Ok(Step::Data(Bytes::from(big))));
        assert_eq!(d.decode(&mut buf), Ok(Step::Done));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5 x\r\nhello\r\n",
            b"3\r\nabcd\r\n",
            b"3\r\nabc\rX",
            b"10000000000000000\r\n",
        ] {
            let mut d = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(bad);
            let mut result = Ok(Step::More);
            for _ in 0..4 {
                result = d.decode(&mut buf);
                if !matches!(result, Ok(Step::Data(_))) {
                    break;
                }
            }
            assert!(
                result.is_err(),
                "{} gave {result:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&vec![b'1'; MAX_LINE + 1][..]);
        assert!(d.decode(&mut buf).is_err());
    }

    #[test]
    fn random_bytes_never_panic_the_parsers() {
        let mut rng = XorShift::new(11);
        for _ in 0..2_000 {
            let len = rng.below(200);
            let mut bytes = rng.bytes(b"0123456789abcdef\r\n: ;HTTP/1.", len, Some(4));
            let _ = parse_response(&bytes, &Method::GET);
            bytes.splice(0..0, b"HTTP/1.1 200 OK\r\n".iter().copied());
            let _ = parse_response(&bytes, &Method::GET);
            let mut d = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(&bytes[17..]);
            for _ in 0..64 {
                match d.decode(&mut buf) {
                    Ok(Step::Data(_)) => {}
                    _ => break,
                }
            }
        }
    }
}
