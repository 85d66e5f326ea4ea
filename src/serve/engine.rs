//! The server's engine: one thread that owns the model and decodes every request in flight,
//! continuously batched. A request joins its model's batch at the next step (prefilled in a
//! sub-batch and spliced into the KV cache); a finished, stopped or abandoned row leaves at once
//! and its slot takes the next waiting request.
//!
//! Model 0 is the base; model `i > 0` is the base with adapter `i` attached. One adapter stays
//! attached while its rows decode; base rows decode with the adapter switched off; a second
//! adapter is swapped in (a move, not a copy) for its own steps.
//!
//! A panic inside a step (a bug, never a request's fault) does not take the server down with a
//! dead engine that still lists models: it is caught, every request in flight and waiting gets
//! an error (a 500), the batches start over empty on the same loaded weights, and `/health`
//! counts the restart. If the thread itself ends, `/health` says the engine is down.
//!
//! `REVIEWER2_FAILPOINT=engine-step:N` panics at the Nth decoding step, once: the tests' way to
//! show the recovery on the real engine.

use crate::error::Result;
use crate::model::adapter::Adapter;
use crate::model::generate::{Decoder, Finish, Request, Sampling};
use crate::model::llama::Mode;
use crate::model::load::Model;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;

/// What a request hears back, in order: tokens, then one `Done` (or an `Error`).
#[derive(Debug)]
pub(crate) enum Piece {
    Token(u32),
    Done(Finish),
    Error(String),
}

/// A request for the engine.
pub(crate) struct Job {
    pub(crate) model: usize,
    pub(crate) ids: Vec<u32>,
    pub(crate) sampling: Sampling,
    pub(crate) rng: ChaCha8Rng,
    /// Dropped by the HTTP side when the client leaves or a stop string ends the text: the
    /// row is then cancelled at its next token.
    pub(crate) out: UnboundedSender<Piece>,
}

/// Counts the page and the tests read (`GET /api/status`).
#[derive(Default)]
pub(crate) struct Load {
    /// Submitted, not yet in a batch.
    pub(crate) waiting: AtomicUsize,
    /// Rows being decoded.
    pub(crate) active: AtomicUsize,
    pub(crate) tokens: AtomicUsize,
    /// The engine thread is running.
    pub(crate) up: AtomicBool,
    /// Panics caught and recovered from.
    pub(crate) restarts: AtomicUsize,
}

/// The handle the HTTP side holds.
pub(crate) struct Engine {
    tx: mpsc::Sender<Job>,
    pub(crate) load: Arc<Load>,
    queue: usize,
}

/// Why a job was not taken.
pub(crate) enum Refused {
    Full(usize),
    Stopped,
}

impl Engine {
    /// Start the engine thread on `model` with `adapters` (model `i + 1` is `adapters[i]`):
    /// at most `batch` rows per model in a batch, at most `queue` requests waiting.
    pub(crate) fn start(
        model: Model,
        adapters: Vec<Adapter>,
        batch: usize,
        queue: usize,
    ) -> Engine {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let l = load.clone();
        load.up.store(true, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // Down however the thread ends, a panic that escapes included.
                struct Down<'a>(&'a Load);
                impl Drop for Down<'_> {
                    fn drop(&mut self) {
                        self.0.up.store(false, Ordering::SeqCst);
                    }
                }
                let _down = Down(&l);
                run(model, adapters, batch, rx, &l)
            })
            .expect("spawn the engine thread");
        Engine { tx, load, queue }
    }

    pub(crate) fn submit(&self, job: Job) -> std::result::Result<(), Refused> {
        let w = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if w >= self.queue {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full(self.queue));
        }
        self.tx.send(job).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            Refused::Stopped
        })
    }
}

/// One model's batch.
#[derive(Default)]
struct Lane {
    dec: Decoder,
    waiting: VecDeque<Job>,
    /// Row id -> where its tokens go.
    live: HashMap<usize, UnboundedSender<Piece>>,
}

/// Everything the engine thread owns.
struct State {
    model: Model,
    /// Adapter `i + 1` in slot `i`, except the one attached to the model.
    adapters: Vec<Option<Adapter>>,
    attached: Option<usize>,
    lanes: Vec<Lane>,
    next_id: usize,
    batch: usize,
    /// Decoding steps left before the failpoint panics, if one is set.
    failpoint: Option<usize>,
}

fn run(model: Model, adapters: Vec<Adapter>, batch: usize, rx: mpsc::Receiver<Job>, load: &Load) {
    let lanes = (0..=adapters.len()).map(|_| Lane::default()).collect();
    let mut st = State {
        model,
        adapters: adapters.into_iter().map(Some).collect(),
        attached: None,
        lanes,
        next_id: 0,
        batch,
        failpoint: failpoint(),
    };
    loop {
        match std::panic::catch_unwind(AssertUnwindSafe(|| st.turn(&rx, load))) {
            Ok(true) => {}
            Ok(false) => return,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                load.restarts.fetch_add(1, Ordering::SeqCst);
                st.recover(
                    load,
                    &format!("the engine panicked ({why}); it has restarted, try again"),
                );
            }
        }
    }
}

/// `REVIEWER2_FAILPOINT=engine-step:N`.
fn failpoint() -> Option<usize> {
    let v = std::env::var("REVIEWER2_FAILPOINT").ok()?;
    v.strip_prefix("engine-step:")?.parse().ok()
}

impl State {
    /// Wait for work if there is none, then one step of every lane that has rows. False when
    /// the server has stopped.
    fn turn(&mut self, rx: &mpsc::Receiver<Job>, load: &Load) -> bool {
        let idle = self
            .lanes
            .iter()
            .all(|l| l.dec.is_empty() && l.waiting.is_empty());
        if idle {
            match rx.recv() {
                Ok(j) => self.lanes[j.model].waiting.push_back(j),
                Err(_) => return false,
            }
        }
        while let Ok(j) = rx.try_recv() {
            self.lanes[j.model].waiting.push_back(j);
        }
        for m in 0..self.lanes.len() {
            if self.lanes[m].dec.is_empty() && self.lanes[m].waiting.is_empty() {
                continue;
            }
            if m > 0 && self.attached != Some(m) {
                if let Err(e) = self.attach(m) {
                    // `serve::run` attached every adapter once at start, so this is not
                    // expected; the other lanes keep going either way.
                    fail(
                        &mut self.lanes[m],
                        load,
                        &format!("attaching the adapter: {e:#}"),
                    );
                    continue;
                }
            }
            if let Some(n) = self.failpoint.as_mut() {
                if *n <= 1 {
                    self.failpoint = None;
                    panic!("REVIEWER2_FAILPOINT engine-step");
                }
                *n -= 1;
            }
            let mode = Mode::infer().with_lora(m > 0);
            let lane = &mut self.lanes[m];
            if let Err(e) = step(&self.model, lane, self.batch, mode, &mut self.next_id, load) {
                fail(lane, load, &format!("{e:#}"));
            }
        }
        true
    }

    /// Put the attached adapter back in its slot and attach adapter `m`.
    fn attach(&mut self, m: usize) -> Result<()> {
        if let Some(a) = self.attached.take() {
            self.adapters[a - 1] = self.model.llama.detach();
        }
        let Some(a) = self.adapters[m - 1].take() else {
            crate::error::bail!(
                "adapter {m} was lost when the engine restarted; restart the server"
            );
        };
        self.model.llama.attach(a)?;
        self.attached = Some(m);
        Ok(())
    }

    /// After a panic: every request gets `msg`, every batch starts over empty, and the adapter
    /// that was attached goes back to its slot (the weights were only read by the step).
    fn recover(&mut self, load: &Load, msg: &str) {
        for lane in &mut self.lanes {
            if !(lane.live.is_empty() && lane.waiting.is_empty()) {
                fail(lane, load, msg);
            }
            lane.dec = Decoder::default();
        }
        if let Some(a) = self.attached.take() {
            self.adapters[a - 1] = self.model.llama.detach();
        }
    }
}

/// Admit waiting jobs into free slots, take each row's token, decode one step.
fn step(
    model: &Model,
    lane: &mut Lane,
    batch: usize,
    mode: Mode,
    next_id: &mut usize,
    load: &Load,
) -> Result<()> {
    let free = batch.saturating_sub(lane.dec.len());
    if free > 0 && !lane.waiting.is_empty() {
        let mut take = Vec::new();
        while take.len() < free {
            let Some(j) = lane.waiting.pop_front() else {
                break;
            };
            load.waiting.fetch_sub(1, Ordering::SeqCst);
            if j.out.is_closed() {
                continue; // the client left while it waited
            }
            let id = *next_id;
            *next_id += 1;
            // Counted with its entry in `live`, so `fail` never takes back more than was added.
            lane.live.insert(id, j.out);
            load.active.fetch_add(1, Ordering::SeqCst);
            take.push((Request { id, ids: j.ids }, j.sampling, j.rng));
        }
        if !take.is_empty() {
            lane.dec.trim()?;
            lane.dec.admit(model, take, mode)?;
        }
    }
    if lane.dec.is_empty() {
        return Ok(());
    }
    let mut gone = Vec::new();
    let done = lane.dec.consume(model, |id, t| {
        load.tokens.fetch_add(1, Ordering::Relaxed);
        if lane.live[&id].send(Piece::Token(t)).is_err() {
            gone.push(id);
        }
    })?;
    for o in done {
        if let Some(tx) = lane.live.remove(&o.id) {
            let _ = tx.send(Piece::Done(o.finish));
        }
        load.active.fetch_sub(1, Ordering::SeqCst);
    }
    // Rows whose client left (or whose text hit a stop string) give their slots back now.
    gone.retain(|id| lane.live.contains_key(id));
    if !gone.is_empty() {
        lane.dec.cancel(&gone)?;
        for id in &gone {
            lane.live.remove(id);
        }
        load.active.fetch_sub(gone.len(), Ordering::SeqCst);
    }
    if !lane.dec.is_empty() {
        lane.dec.decode(model, mode)?;
    }
    Ok(())
}

/// An engine error ends every request of the lane with it; the lane starts over empty.
fn fail(lane: &mut Lane, load: &Load, msg: &str) {
    tracing::error!("engine: {msg}");
    for (_, tx) in lane.live.drain() {
        let _ = tx.send(Piece::Error(msg.to_string()));
        load.active.fetch_sub(1, Ordering::SeqCst);
    }
    for j in lane.waiting.drain(..) {
        let _ = j.out.send(Piece::Error(msg.to_string()));
        load.waiting.fetch_sub(1, Ordering::SeqCst);
    }
    lane.dec = Decoder::default();
}
