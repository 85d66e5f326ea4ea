//! What `pipeline serve` answers: OpenAI's error shape for every refusal, and a generation's
//! tokens as text, whole (`chat.completion`, `text_completion`) or streamed as server-sent
//! events (`chat.completion.chunk`), in `crate::protocol`'s types. Text leaves a piece at a time,
//! never half a character, and is cut at the first stop string (the start of one is held back
//! until it is known not to be one).

use super::engine::Piece;
use super::App;
use crate::model::generate::Finish;
use crate::protocol::{AssistantMessage, Choice, Completion, ErrorBody, ErrorDetail, Usage};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Which endpoint a request came to, and so the shape of its answer.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Api {
    Chat,
    Completions,
}

/// A refusal in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) param: Option<String>,
    pub(super) code: &'static str,
}

impl ApiError {
    /// 400 for a parameter's value.
    pub(super) fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value",
        }
    }

    /// Any other status, about no one parameter.
    pub(super) fn status(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 | 421 => "permission_error",
            404 => "not_found_error",
            503 => "server_overloaded",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: kind.into(),
                param: self.param,
                code: Some(self.code.into()),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// The engine's tokens as text: a piece at a time, never half a character, cut at a stop string.
pub(super) struct Text {
    app: Arc<App>,
    rx: Option<mpsc::UnboundedReceiver<Piece>>,
    stop: Vec<String>,
    tokens: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    sent: usize,
    /// A stop string ended the text after the delta just returned.
    pending_end: Option<&'static str>,
}

/// One step of a [`Text`].
enum Chunk {
    Delta(String),
    End(&'static str),
    Failed(String),
}

impl Text {
    pub(super) fn new(
        app: Arc<App>,
        rx: mpsc::UnboundedReceiver<Piece>,
        stop: Vec<String>,
    ) -> Self {
        Text {
            app,
            rx: Some(rx),
            stop,
            tokens: Vec::new(),
            sent: 0,
            pending_end: None,
        }
    }

    async fn next(&mut self) -> Option<Chunk> {
        if let Some(e) = self.pending_end.take() {
            return Some(Chunk::End(e));
        }
        loop {
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Some(Piece::Token(t)) => {
                    if let Some(c) = self.token(t) {
                        return Some(c);
                    }
                }
                Some(Piece::Done(f)) => return Some(self.done(f)),
                Some(Piece::Error(e)) => return self.end(Chunk::Failed(e)),
                None => return self.end(Chunk::Failed("the engine stopped".into())),
            }
        }
    }

    /// A new token: the text it completes, if any can be handed out yet.
    fn token(&mut self, t: u32) -> Option<Chunk> {
        self.tokens.push(t);
        let full = match self.app.meta.tok.decode(&self.tokens, true) {
            Ok(s) => s,
            Err(e) => return self.end(Chunk::Failed(format!("{e:#}"))),
        };
        if let Some(cut) = self.stop_at(&full) {
            // Dropping the receiver cancels the row at the engine's next token.
            let delta = full.get(self.sent..cut).unwrap_or("").to_string();
            self.sent = cut;
            self.rx = None;
            return Some(if delta.is_empty() {
                Chunk::End("stop")
            } else {
                self.pending_end = Some("stop");
                Chunk::Delta(delta)
            });
        }
        if full.ends_with('\u{FFFD}') {
            return None; // half a character: wait for the rest
        }
        // Held back: a tail that may be the start of a stop string.
        let end = full.len() - held_back(&self.stop, &full);
        let delta = full
            .get(self.sent..end)
            .filter(|d| !d.is_empty())?
            .to_string();
        self.sent = end;
        Some(Chunk::Delta(delta))
    }

    /// The row finished: what was held back (a stop string's start that never completed, a last
    /// partial character) is part of the text after all.
    fn done(&mut self, f: Finish) -> Chunk {
        let reason = match f {
            Finish::Eos => "stop",
            Finish::Length => "length",
        };
        self.rx = None;
        let full = self
            .app
            .meta
            .tok
            .decode(&self.tokens, true)
            .unwrap_or_default();
        if let Some(rest) = full.get(self.sent..).filter(|r| !r.is_empty()) {
            let rest = rest.to_string();
            self.sent = full.len();
            self.pending_end = Some(reason);
            return Chunk::Delta(rest);
        }
        Chunk::End(reason)
    }

    fn end(&mut self, c: Chunk) -> Option<Chunk> {
        self.rx = None;
        Some(c)
    }

    /// Where the first stop string starts, if one has appeared.
    fn stop_at(&self, full: &str) -> Option<usize> {
        let from = self
            .sent
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let from = (0..=from)
            .rev()
            .find(|&i| full.is_char_boundary(i))
            .unwrap_or(0);
        self.stop
            .iter()
            .filter_map(|s| full[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }
}

/// What every chunk of one answer repeats.
pub(super) struct Meta {
    pub(super) id: String,
    pub(super) model: String,
    pub(super) created: u64,
    pub(super) api: Api,
    pub(super) prompt_tokens: usize,
}

impl Meta {
    fn usage(&self, completion: usize) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens as u64,
            completion_tokens: completion as u64,
            total_tokens: (self.prompt_tokens + completion) as u64,
        }
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.api, stream) {
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Chat, false) => "chat.completion",
            (Api::Completions, _) => "text_completion",
        }
    }

    /// One choice: the text as a chat message (or delta) or as completion text.
    fn choice(
        &self,
        text: Option<&str>,
        finish: Option<&str>,
        stream: bool,
        first: bool,
    ) -> Choice {
        let mut c = Choice {
            finish_reason: finish.map(String::from),
            ..Choice::default()
        };
        match self.api {
            Api::Chat if stream => {
                c.delta = Some(AssistantMessage {
                    role: first.then(|| "assistant".to_string()),
                    content: text.map(String::from),
                })
            }
            Api::Chat => {
                c.message = Some(AssistantMessage {
                    role: Some("assistant".into()),
                    content: Some(text.unwrap_or("").into()),
                })
            }
            Api::Completions => c.text = Some(text.unwrap_or("").into()),
        }
        c
    }

    fn body(&self, choices: Vec<Choice>, stream: bool, usage: Option<Usage>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: self.object(stream).into(),
            created: self.created,
            model: Some(self.model.clone()),
            system_fingerprint: None,
            choices,
            usage,
        }
    }
}

/// The whole answer at once.
pub(super) async fn whole(mut text: Text, meta: Meta) -> Response {
    let mut out = String::new();
    let finish = loop {
        match text.next().await {
            Some(Chunk::Delta(d)) => out.push_str(&d),
            Some(Chunk::End(f)) => break f,
            other => return generation_failed(other).into_response(),
        }
    };
    let choice = meta.choice(Some(&out), Some(finish), false, true);
    let usage = meta.usage(text.tokens.len());
    Json(meta.body(vec![choice], false, Some(usage))).into_response()
}

fn generation_failed(c: Option<Chunk>) -> ApiError {
    let e = match c {
        Some(Chunk::Failed(e)) => e,
        _ => "the answer ended early".to_string(),
    };
    ApiError::status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "generation_failed",
        format!("generation failed: {e}"),
    )
}

/// The answer as server-sent events in OpenAI's chunk format, ending with `[DONE]`. When the
/// client leaves, the stream is dropped, and with it the engine's channel: the row stops.
pub(super) fn stream(
    text: Text,
    meta: Meta,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<Event, Infallible>>> {
    struct St {
        text: Text,
        meta: Meta,
        first: bool,
        done: bool,
        tail: Vec<Event>,
        include_usage: bool,
    }
    let st = St {
        text,
        meta,
        first: true,
        done: false,
        tail: Vec::new(),
        include_usage,
    };
    let json = |c: &Completion| serde_json::to_string(c).unwrap_or_default();
    let s = futures_util::stream::unfold(st, move |mut st| async move {
        if let Some(e) = st.tail.pop() {
            return Some((Ok(e), st));
        }
        if st.done {
            return None;
        }
        let ev = match st.text.next().await {
            Some(Chunk::Delta(d)) => {
                let c = st.meta.choice(Some(&d), None, true, st.first);
                st.first = false;
                Event::default().data(json(&st.meta.body(vec![c], true, None)))
            }
            Some(Chunk::End(f)) => {
                st.done = true;
                let c = st.meta.choice(None, Some(f), true, st.first);
                // Popped from the back: usage (when asked for), then [DONE].
                st.tail.push(Event::default().data("[DONE]"));
                if st.include_usage {
                    let usage = st.meta.usage(st.text.tokens.len());
                    let u = st.meta.body(Vec::new(), true, Some(usage));
                    st.tail.push(Event::default().data(json(&u)));
                }
                Event::default().data(json(&st.meta.body(vec![c], true, None)))
            }
            other => {
                st.done = true;
                st.tail.push(Event::default().data("[DONE]"));
                let e = generation_failed(other);
                let body = ErrorBody {
                    error: ErrorDetail {
                        message: e.message,
                        kind: "server_error".into(),
                        param: None,
                        code: Some(e.code.into()),
                    },
                };
                Event::default().data(serde_json::to_string(&body).unwrap_or_default())
            }
        };
        Some((Ok(ev), st))
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// The length of the longest tail of `full` that is the start of a stop string (and so may still
/// become one): text the client must not see yet.
fn held_back(stop: &[String], full: &str) -> usize {
    stop.iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&k| s.is_char_boundary(k) && full.ends_with(&s[..k]))
                .take(1)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_of_a_stop_string_is_held_back() {
        let stops = vec!["\n\nUser".to_string(), "é!".to_string()];
        assert_eq!(held_back(&stops, "a review\n\n"), 2);
        assert_eq!(held_back(&stops, "a review\n\nUs"), 4);
        assert_eq!(held_back(&stops, "a review\n"), 1);
        assert_eq!(held_back(&stops, "a review."), 0);
        assert_eq!(held_back(&stops, "café"), "é".len());
        assert_eq!(held_back(&[], "anything"), 0);
    }
}
