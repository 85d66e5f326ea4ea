//! llama.cpp's real server (PyPI `xllamacpp`, through `tests/fixtures/llama_server.py`) on a free
//! loopback port, for as long as a [`LlamaServer`] lives, and plain JSON requests to it.

use super::http::{free_port, read_message};
use super::{fixture, python_with, smollm2};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct LlamaServer {
    child: Child,
    pub port: u16,
    /// The server's log (llama.cpp writes plenty), shown when it fails to start; kept while
    /// the server writes to it.
    _log: tempfile::NamedTempFile,
}

impl LlamaServer {
    /// The SmolLM2 GGUF as `smollm2`, `parallel` slots.
    pub fn start(parallel: usize) -> LlamaServer {
        Self::start_named(parallel, "smollm2")
    }

    /// Serving the SmolLM2 GGUF under `names` (comma-separated aliases).
    pub fn start_named(parallel: usize, names: &str) -> LlamaServer {
        Self::serve(
            &smollm2(),
            &["--parallel", &parallel.to_string(), "--alias", names],
        )
    }

    /// Serving the GGUF `model`, with more of the fixture's flags (`--lora FILE`, `--ctx N`).
    /// One thread: the tests run beside each other on few cores.
    pub fn serve(model: &Path, args: &[&str]) -> LlamaServer {
        let py = python_with(&[("xllamacpp", "xllamacpp")]);
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(py)
            .arg(fixture("llama_server.py"))
            .arg(model)
            .arg(port.to_string())
            .args(args)
            .args(["--threads", "1", "--watch-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start tests/fixtures/llama_server.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != format!("ready {port}") {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let tail: String = text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "llama.cpp's server did not start on {} {args:?}:\n{tail}",
                model.display()
            );
        }
        LlamaServer {
            child,
            port,
            _log: log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// `POST path` with a JSON body; the status and the parsed answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
        let (head, bytes) = read_message(&mut s, false).unwrap();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, v)
    }

    /// `POST path`, asserting 200.
    pub fn post_ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post(path, body);
        assert_eq!(status, 200, "{path} {body}: {v}");
        v
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
