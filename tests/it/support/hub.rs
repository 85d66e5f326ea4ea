//! A Hub-like server for hf-hub on the fake HTTP server: `<REPO>/resolve/main/<file>` served
//! from a folder as the Hub serves hf-hub (a `Range: bytes=0-0` probe answered with the etag,
//! the commit and the size, then a ranged GET), with the faults a plan asks for.

use super::http::{FakeServer, Reply};
use reviewer2::fsutil::sha256_hex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The repo the server serves.
pub const REPO: &str = "tiny-org/tiny-llama";
/// The commit it says `main` is at (`X-Repo-Commit`).
pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the server does with one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    /// This status and an empty body.
    Status(u16),
    /// The full Content-Length announced, half the bytes sent, then the connection closed.
    Cut,
    /// The right length, one byte changed.
    Corrupt,
    /// Half the bytes, with a Content-Length and Content-Range that say so.
    Short,
}

/// `plan(file, probe, n)`: the fault for the n-th (from 0) probe or body request of `file`.
pub type Plan = Box<dyn Fn(&str, bool, usize) -> Fault + Send + Sync>;

/// No fault at all.
pub fn no_faults() -> Plan {
    Box::new(|_, _, _| Fault::None)
}

/// The Hub-like server; it serves for as long as this value lives.
pub struct Hub {
    pub server: FakeServer,
    log: Arc<Mutex<Vec<String>>>,
}

impl Hub {
    /// The endpoint, `http://127.0.0.1:<port>` (for `HF_ENDPOINT`).
    pub fn url(&self) -> String {
        self.server.url("")
    }

    /// One line per request of a file it serves: `probe|get <file> from <start>: <fault>`.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Serves the files in `dir` as [`REPO`] at [`SHA`], with the faults `plan` asks for; anything
/// else is a 404.
pub fn serve(dir: PathBuf, plan: Plan) -> Hub {
    let log: Arc<Mutex<Vec<String>>> = Default::default();
    let seen = log.clone();
    let count: Mutex<BTreeMap<(String, bool), usize>> = Default::default();
    let server = FakeServer::start(move |req, _| {
        let file = req.path.rsplit('/').next().unwrap_or("").to_string();
        let body = req
            .path
            .strip_prefix(&format!("/{REPO}/resolve/main/"))
            .and_then(|_| std::fs::read(dir.join(&file)).ok());
        let Some(body) = body else {
            return Reply::status(404);
        };
        let range = req.header("range");
        let probe = range == Some("bytes=0-0");
        let start: usize = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        let fault = {
            let mut count = count.lock().unwrap();
            let k = count.entry((file.clone(), probe)).or_default();
            let fault = plan(&file, probe, *k);
            *k += 1;
            fault
        };
        seen.lock().unwrap().push(format!(
            "{} {file} from {start}: {fault:?}",
            if probe { "probe" } else { "get" }
        ));
        if let Fault::Status(code) = fault {
            return Reply::status(code);
        }
        let mut part = if probe {
            body[..1].to_vec()
        } else {
            body[start..].to_vec()
        };
        let mut len = part.len();
        let mut total = body.len();
        let mut cut = None;
        match fault {
            Fault::Corrupt if !probe => {
                let i = part.len() / 2;
                part[i] ^= 0x55;
            }
            Fault::Cut if !probe => cut = Some(part.len() / 2),
            Fault::Short if !probe => {
                part.truncate(part.len() / 2);
                len = part.len();
                total = start + len;
            }
            _ => {}
        }
        let end = if probe { 0 } else { start + len - 1 };
        let reply = Reply::status(206)
            .header("Content-Range", format!("bytes {start}-{end}/{total}"))
            .header("ETag", format!("\"{}\"", sha256_hex(&body)))
            .header("X-Repo-Commit", SHA)
            .body(part);
        match cut {
            Some(n) => reply.cut_after(n),
            None => reply,
        }
    });
    Hub { server, log }
}
