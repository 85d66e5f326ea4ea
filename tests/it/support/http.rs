//! A small fake HTTP/1.1 server on 127.0.0.1 for the tests that put a fault between the
//! pipeline and a web page, the Hub or an OpenAI server. One request per connection, each
//! connection in its own thread, answered from a script (or by a handler) with a [`Reply`]:
//! a status, headers and a body, or a body cut short, or silence. It records every request it
//! read. Dropping the server stops it, and ends any silence it is keeping.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A port on 127.0.0.1 that nothing listens on (bound, then let go).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A request as the server read it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The request line, `POST /v1/completions HTTP/1.1`.
    pub line: String,
    pub method: String,
    pub path: String,
    /// In the order sent, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header of that name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Clone, Debug)]
enum Sending {
    Whole,
    /// Only this many bytes of the body, then the connection closed.
    Cut(usize),
    /// No answer: the connection closed.
    Nothing,
}

/// What the server answers one request with.
#[derive(Clone, Debug)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Waited before answering.
    delay: Duration,
    send: Sending,
}

impl Reply {
    /// This status, an empty body. `Content-Length` (of the whole body) and `Connection: close`
    /// are added unless set with [`Reply::header`].
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            send: Sending::Whole,
        }
    }

    /// 200 with this content type and body.
    pub fn ok(content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply::status(200)
            .header("Content-Type", content_type)
            .body(body)
    }

    /// This status and a JSON body.
    pub fn json(status: u16, body: &str) -> Reply {
        Reply::status(status)
            .header("Content-Type", "application/json")
            .body(body)
    }

    /// The request read, then nothing for `d` (or until the server is dropped), then the
    /// connection closed without an answer.
    pub fn silence(d: Duration) -> Reply {
        Reply {
            delay: d,
            send: Sending::Nothing,
            ..Reply::status(0)
        }
    }

    pub fn header(mut self, name: &str, value: impl ToString) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    /// The headers as for the whole body (its `Content-Length`), then only its first `n` bytes,
    /// then the connection closed.
    pub fn cut_after(mut self, n: usize) -> Reply {
        self.send = Sending::Cut(n);
        self
    }

    fn write(&self, s: &mut TcpStream, stop: &Stop) -> std::io::Result<()> {
        if !self.delay.is_zero() && stop.sleep(self.delay) {
            return Ok(());
        }
        let n = match self.send {
            Sending::Nothing => return Ok(()),
            Sending::Whole => self.body.len(),
            Sending::Cut(n) => n.min(self.body.len()),
        };
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if header(&self.headers, "content-length").is_none() {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if header(&self.headers, "connection").is_none() {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        s.write_all(&[head.as_bytes(), &self.body[..n]].concat())?;
        s.flush()?;
        if let Sending::Cut(_) = self.send {
            s.shutdown(Shutdown::Both)?;
        }
        Ok(())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Set when the server is dropped; wakes whoever waits in a delay.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock().unwrap() = true;
        self.wake.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap()
    }

    /// Waits `d`, or less if the server is dropped meanwhile: true then.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap();
        let (g, _) = self.wake.wait_timeout_while(g, d, |s| !*s).unwrap();
        *g
    }
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// The fake server; it serves for as long as this value lives.
pub struct FakeServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<Stop>,
    accept: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Answers the n-th connection (from 0, in the order accepted) with
    /// `script[min(n, script.len() - 1)]`.
    pub fn scripted(script: Vec<Reply>) -> FakeServer {
        assert!(!script.is_empty(), "an empty script");
        FakeServer::start(move |_, n| script[n.min(script.len() - 1)].clone())
    }

    /// Answers each request with `handler(request, n)`, `n` the connection's number (from 0,
    /// in the order accepted). The handler runs in the connection's own thread.
    pub fn start(handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> FakeServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let requests: Arc<Mutex<Vec<Request>>> = Default::default();
        let stop: Arc<Stop> = Default::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let (h, r, st) = (hits.clone(), requests.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for s in l.incoming() {
                if st.is_set() {
                    break;
                }
                let Ok(s) = s else { continue };
                let n = h.fetch_add(1, Ordering::SeqCst);
                let (handler, r, st) = (handler.clone(), r.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = answer(s, n, &*handler, &r, &st);
                });
            }
        });
        FakeServer {
            addr,
            hits,
            requests,
            stop,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The requests read so far, in the order read.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.set();
        // Wakes the accept loop, which then sees the stop.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn answer(
    mut s: TcpStream,
    n: usize,
    handler: &Handler,
    requests: &Mutex<Vec<Request>>,
    stop: &Stop,
) -> std::io::Result<()> {
    // A client that connects and never sends does not keep the thread for ever.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let (head, body) = read_message(&mut s, true)?;
    let (line, headers) = parse_head(&head);
    let mut words = line.split_whitespace();
    let req = Request {
        method: words.next().unwrap_or_default().to_string(),
        path: words.next().unwrap_or_default().to_string(),
        line: line.clone(),
        headers,
        body,
    };
    requests.lock().unwrap().push(req.clone());
    handler(&req, n).write(&mut s, stop)
}

/// A message's first line and its headers (values trimmed), from its head.
pub fn parse_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (first, headers)
}

/// Head (through the blank line, as text) and body (by Content-Length; else none for a request,
/// to EOF for a response) of one HTTP message.
pub fn read_message(s: &mut TcpStream, request: bool) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut body = buf[end..].to_vec();
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match len {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None if request => {}
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok((head, body))
}
