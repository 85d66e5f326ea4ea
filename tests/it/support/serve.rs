//! `pipeline serve` as a child process on a free loopback port, for the tests that drive it.

use super::pipeline_cmd;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};

/// `pipeline serve` on a free port, for as long as this value lives.
pub struct Server {
    child: Child,
    pub url: String,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The API key the server asks for, if any (`R2_SERVE_KEY` in its environment).
    pub key: Option<String>,
}

impl Server {
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = pipeline_cmd(dir)
            .args(["serve", "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (mut err, log) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("serve did not start: {line:?}\n{}", stderr.lock().unwrap()))
            .to_string();
        let key = env
            .iter()
            .find(|(k, _)| *k == "R2_SERVE_KEY")
            .map(|(_, v)| v.to_string());
        Server {
            child,
            url,
            stderr,
            key,
        }
    }

    pub fn get(&self, path: &str) -> Value {
        let mut r = reqwest::blocking::Client::new().get(format!("{}{path}", self.url));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r.send().unwrap().json().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
