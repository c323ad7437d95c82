//! byte-relay UPSTREAM: an HTTP/1.1 reverse proxy on tokio alone, without hyper.
//!
//! One thread and one task per client connection, as the gateway has. The task reads a
//! request head (httparse) and its `Content-Length` body, sends the bytes unchanged on an idle
//! upstream connection, and copies the response back as it arrives: each read from the
//! upstream becomes one write to the client, chunk framing and all, so a token costs one
//! `recvfrom` and one `sendto`, as nginx's one read and one `writev`. The chunked framing is
//! only followed, to know where a response ends and its connection can be reused.
//!
//! It is a measuring stick, not a proxy to deploy: no HEAD, no header rewriting, no request
//! bodies other than `Content-Length`, no timeouts, no limits beyond a 64 KiB head.
//! fanout.sh (`RELAY=1`) and proxy-overhead.sh run it beside hyper-relay, to tell what hyper's
//! server costs from what tokio's scheduling costs; instructions.sh counts it beside them.

use std::cell::RefCell;
use std::error::Error;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Res<T> = Result<T, Box<dyn Error>>;
type Idle = Rc<RefCell<Vec<TcpStream>>>;

const MAX_HEAD: usize = 64 * 1024;

/// Where a response's body ends.
enum Framing {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Follows chunked framing byte by byte, only to find the end.
#[derive(Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    Data,
    DataEnd,
    TrailerStart,
    Trailer,
    Done,
}

impl Chunked {
    /// Consume `buf`; returns how many bytes belong to this body (all of them unless it ended).
    fn feed(&mut self, buf: &[u8]) -> Res<usize> {
        let mut i = 0;
        while i < buf.len() && self.state != ChunkState::Done {
            let b = buf[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(digit))
                            .ok_or("chunk size overflows")?;
                    }
                    b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                    b'\r' => {}
                    b'\n' => self.end_size_line(),
                    _ => return Err("bad chunk size".into()),
                },
                ChunkState::Extension => {
                    if b == b'\n' {
                        self.end_size_line();
                    }
                }
                ChunkState::Data => {
                    let take =
                        (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    continue;
                }
                ChunkState::DataEnd => {
                    if b == b'\n' {
                        self.state = ChunkState::Size;
                    }
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => {}
                    b'\n' => self.state = ChunkState::Done,
                    _ => self.state = ChunkState::Trailer,
                },
                ChunkState::Trailer => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::Done => unreachable!("the loop stops at Done"),
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }
}

/// Read into `buf` until `parse` finds a whole head in it; returns what `parse` made of it,
/// or `None` if the peer closed the connection before sending a byte.
async fn read_head<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: fn(&[u8]) -> Res<Option<T>>,
) -> Res<Option<T>> {
    loop {
        if let Some(head) = parse(buf)? {
            return Ok(Some(head));
        }
        if buf.len() >= MAX_HEAD {
            return Err("head too large".into());
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("closed mid-head".into())
            };
        }
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn content_length(headers: &[httparse::Header<'_>]) -> Res<Option<u64>> {
    header(headers, "content-length")
        .map(|v| Ok(std::str::from_utf8(v)?.trim().parse::<u64>()?))
        .transpose()
}

/// A whole request head at the start of `buf`: its length and its body's.
fn request_head(buf: &[u8]) -> Res<Option<(usize, u64)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(buf)? else {
        return Ok(None);
    };
    if header(req.headers, "transfer-encoding").is_some() {
        return Err("chunked request bodies are not relayed".into());
    }
    Ok(Some((len, content_length(req.headers)?.unwrap_or(0))))
}

/// What a response head says about the bytes after it.
struct ResponseHead {
    len: usize,
    framing: Framing,
    /// Whether the connection can carry another request after this response.
    reusable: bool,
}

/// A whole response head at the start of `buf`.
fn response_head(buf: &[u8]) -> Res<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = resp.parse(buf)? else {
        return Ok(None);
    };
    let chunked = header(resp.headers, "transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
    let close =
        header(resp.headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    let framing = match (chunked, content_length(resp.headers)?) {
        (true, _) => Framing::Chunked(Chunked::default()),
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::UntilClose,
    };
    let reusable = !close && !matches!(framing, Framing::UntilClose);
    Ok(Some(ResponseHead {
        len,
        framing,
        reusable,
    }))
}

/// Whether an idle connection is still open: the backend has neither closed it nor sent
/// anything on it. Reads only if the runtime has seen it become readable.
fn is_open(up: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(up.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn connect(upstream: SocketAddr) -> Res<TcpStream> {
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    Ok(up)
}

/// Send `request` on `up` and read the response head into `ubuf`, or `None` if the backend
/// closed the connection without a byte.
async fn exchange(
    up: &mut TcpStream,
    request: &[u8],
    ubuf: &mut Vec<u8>,
) -> Res<Option<ResponseHead>> {
    up.write_all(request).await?;
    read_head(up, ubuf, response_head).await
}

async fn serve(mut client: TcpStream, idle: Idle, upstream: SocketAddr) -> Res<()> {
    let mut cbuf = Vec::with_capacity(16 * 1024);
    let mut ubuf = Vec::with_capacity(16 * 1024);
    loop {
        // The request: head, then a Content-Length body.
        let Some((head_len, body_len)) = read_head(&mut client, &mut cbuf, request_head).await?
        else {
            return Ok(());
        };
        let total = head_len + usize::try_from(body_len)?;
        while cbuf.len() < total {
            if client.read_buf(&mut cbuf).await? == 0 {
                return Err("closed mid-body".into());
            }
        }

        // An idle upstream connection the backend has not closed, or a new one. Backends
        // close connections that idle too long (llama-sim, as hyper's server does, after
        // 30 s); one closed just as this request goes out, before any byte of an answer, is
        // replaced once by a new connection.
        let mut pooled = loop {
            let popped = idle.borrow_mut().pop();
            match popped {
                Some(up) if is_open(&up) => break Some(up),
                Some(_) => continue,
                None => break None,
            }
        };
        let (head, mut up) = loop {
            let (mut conn, fresh) = match pooled.take() {
                Some(conn) => (conn, false),
                None => (connect(upstream).await?, true),
            };
            ubuf.clear();
            match exchange(&mut conn, &cbuf[..total], &mut ubuf).await {
                Ok(Some(head)) => break (head, conn),
                Ok(None) | Err(_) if !fresh && ubuf.is_empty() => continue,
                Ok(None) => return Err("upstream closed before answering".into()),
                Err(err) => return Err(err),
            }
        };
        cbuf.drain(..total);
        let ResponseHead {
            len: mut from,
            mut framing,
            reusable,
        } = head;
        let mut done = false;
        loop {
            let body = &ubuf[from..];
            let used = match &mut framing {
                Framing::Length(left) => {
                    let take = body.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    done = *left == 0;
                    take
                }
                Framing::Chunked(c) => {
                    let n = c.feed(body)?;
                    done = c.state == ChunkState::Done;
                    n
                }
                Framing::UntilClose => body.len(),
            };
            if from + used != ubuf.len() {
                return Err("upstream sent more than its response".into());
            }
            client.write_all(&ubuf).await?;
            if done {
                break;
            }
            ubuf.clear();
            from = 0;
            if up.read_buf(&mut ubuf).await? == 0 {
                if matches!(framing, Framing::UntilClose) {
                    return Ok(());
                }
                return Err("upstream closed mid-body".into());
            }
        }
        if reusable {
            idle.borrow_mut().push(up);
        }
    }
}

fn main() -> Res<()> {
    let idle: Idle = Rc::default();
    hyper_relay::run("byte-relay", move |stream, upstream| {
        let idle = idle.clone();
        async move {
            if let Err(err) = serve(stream, idle, upstream).await {
                eprintln!("connection ended: {err}");
            }
        }
    })
}
