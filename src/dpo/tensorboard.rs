//! TensorBoard event files, so `tensorboard --logdir <train output>` shows a run as it shows
//! TRL's: every number of `metrics.jsonl` as a scalar under its TRL name (`train/loss`,
//! `eval/rewards/margins`, ...).
//!
//! The format is TensorFlow's: `Event` protocol buffers (encoded with prost's derive, from the
//! fields of tensorflow/core/util/event.proto and summary.proto) in TFRecord framing, each
//! record `len: u64 LE, masked_crc32c(len): u32, data, masked_crc32c(data): u32`.

use crate::error::Result;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

fn masked_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(b);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TRL's tag for a metrics.jsonl key: `eval_loss` -> `eval/loss`, `loss` -> `train/loss`.
fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(k) => format!("eval/{k}"),
        None => format!("train/{key}"),
    }
}

/// Write the whole log as one event file in `dir`, atomically; returns its path. Times are
/// `wall_time` (seconds since the epoch) spread over `seconds` so the relative-time axis shows
/// the run's length.
pub(crate) fn write_events(
    log: &[Value],
    dir: &Path,
    started_unix: f64,
    seconds: f64,
) -> Result<PathBuf> {
    use prost::Message;
    let mut buf = Vec::new();
    let head = Event {
        wall_time: started_unix,
        step: 0,
        file_version: Some("brain.Event:2".into()),
        summary: None,
    };
    record(&mut buf, &head.encode_to_vec());
    let last = log
        .iter()
        .filter_map(|m| m.get("step")?.as_f64())
        .fold(1.0f64, f64::max);
    for m in log {
        let Some(obj) = m.as_object() else { continue };
        let Some(step) = obj.get("step").and_then(Value::as_f64) else {
            continue;
        };
        let value = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| {
                Some(SummaryValue {
                    tag: tag(k),
                    simple_value: Some(v.as_f64()? as f32),
                })
            })
            .collect();
        let e = Event {
            wall_time: started_unix + seconds * step / last,
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        };
        record(&mut buf, &e.encode_to_vec());
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "localhost".into());
    let path = dir.join(format!(
        "events.out.tfevents.{}.{host}",
        started_unix as u64
    ));
    crate::fsutil::write_atomic(&path, &buf)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C's check value, and the masked CRC of "foo" as TensorBoard's own
        // tensorflow_stub.pywrap_tensorflow.masked_crc32c computes it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"foo"), 0xfebe_8a61);
    }

    #[test]
    fn tags_follow_trl() {
        assert_eq!(tag("eval_rewards/margins"), "eval/rewards/margins");
        assert_eq!(tag("loss"), "train/loss");
    }
}
