//! The server's engine: one thread that owns the model and decodes every request in flight,
//! continuously batched. A request joins its model's batch at the next step (prefilled in a
//! sub-batch and spliced into the KV cache); a finished, stopped or abandoned row leaves at once
//! and its slot takes the next waiting request.
//!
//! Model 0 is the base; model `i > 0` is the base with adapter `i` attached. One adapter stays
//! attached while its rows decode; base rows decode with the adapter switched off; a second
//! adapter is swapped in (a move, not a copy) for its own steps.

use crate::error::Result;
use crate::model::adapter::Adapter;
use crate::model::generate::{Decoder, Finish, Request, Sampling};
use crate::model::llama::Mode;
use crate::model::load::Model;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
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
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(model, adapters, batch, rx, &l))
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

fn run(
    mut model: Model,
    adapters: Vec<Adapter>,
    batch: usize,
    rx: mpsc::Receiver<Job>,
    load: &Load,
) {
    let mut adapters: Vec<Option<Adapter>> = adapters.into_iter().map(Some).collect();
    let mut attached: Option<usize> = None;
    let mut lanes: Vec<Lane> = (0..=adapters.len()).map(|_| Lane::default()).collect();
    let mut next_id = 0usize;
    loop {
        let idle = lanes
            .iter()
            .all(|l| l.dec.is_empty() && l.waiting.is_empty());
        if idle {
            // Nothing to decode: wait for work (or for the server to stop).
            match rx.recv() {
                Ok(j) => lanes[j.model].waiting.push_back(j),
                Err(_) => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            lanes[j.model].waiting.push_back(j);
        }
        for m in 0..lanes.len() {
            let lane = &mut lanes[m];
            if lane.dec.is_empty() && lane.waiting.is_empty() {
                continue;
            }
            if m > 0 && attached != Some(m) {
                if let Some(a) = attached {
                    adapters[a - 1] = model.llama.detach();
                }
                let a = adapters[m - 1]
                    .take()
                    .expect("an adapter is in its slot or attached");
                match model.llama.attach(a) {
                    Ok(()) => attached = Some(m),
                    Err(e) => {
                        // `serve::run` attached every adapter once at start, so this is not
                        // expected; the other lanes keep going either way.
                        fail(lane, load, &format!("attaching the adapter: {e:#}"));
                        continue;
                    }
                }
            }
            let mode = Mode::infer().with_lora(m > 0);
            if let Err(e) = step(&model, lane, batch, mode, &mut next_id, load) {
                fail(lane, load, &format!("{e:#}"));
            }
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
