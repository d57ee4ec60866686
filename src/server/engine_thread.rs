//! The engine runs on its own OS thread; the async server talks to it over channels. A request
//! whose receiver is gone (the client disconnected) is aborted before the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::metrics as m;
use crate::engine::{Engine, EngineStats, FinishReason, RequestId, RetentionPlan, SampledToken, SamplingParams};

/// What a request hears from the engine.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// `ends` marks the stop token that ended the sequence: counted, but not part of the text.
    Token { token: SampledToken, cached_tokens: usize, ends: bool },
    Finished(FinishReason),
    Rejected(String),
}

/// Why the server let go of a sequence before the engine finished it. A receiver dropped
/// without one is a client that went away: an abort (`braid_aborted_requests_total`); the
/// others are the server's own decisions, counted where they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Release {
    ClientGone = 0,
    /// The choice finished on the server's side: its text reached a stop string.
    Finished = 1,
    /// The server gave up on it: its deadline passed, or another choice of its request failed.
    Cancelled = 2,
}

/// One sequence's events as the server receives them. Dropping it stops the sequence (before
/// the engine's next step); `release` says why first.
pub struct SeqReceiver {
    events: UnboundedReceiver<SeqEvent>,
    why: Arc<AtomicU8>,
}

impl SeqReceiver {
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<SeqEvent>> {
        self.events.poll_recv(cx)
    }

    /// Lets go of the sequence for a reason other than the client leaving.
    pub fn release(self, why: Release) {
        self.why.store(why as u8, Ordering::SeqCst);
    }
}

enum Command {
    Submit { prompt: Vec<u32>, params: SamplingParams, retention: RetentionPlan, events: UnboundedSender<SeqEvent>, why: Arc<AtomicU8> },
    /// Stop stepping and drop the engine (which finishes its disk-cache writes).
    Shutdown,
}

/// The server's side of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl EngineHandle {
    pub fn spawn(mut engine: Engine) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(engine.stats()));
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("braid-engine".into())
            .spawn(move || run(&mut engine, rx, &shared))
            .expect("the engine thread starts");
        Self { commands: tx, stats, thread: Arc::new(Mutex::new(Some(thread))) }
    }

    /// Stops the engine thread once it has nothing left to do and waits for it, so queued
    /// disk-cache writes reach the disk before the process exits.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.lock().expect("thread lock").take() {
            let _ = thread.join();
        }
    }

    /// Queues one sequence; its events arrive on the returned receiver. Dropping the receiver
    /// aborts the sequence.
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams, retention: RetentionPlan) -> SeqReceiver {
        let (events, rx) = unbounded_channel();
        let why = Arc::new(AtomicU8::new(Release::ClientGone as u8));
        let command = Command::Submit { prompt, params, retention, events, why: why.clone() };
        if let Err(mpsc::SendError(Command::Submit { events, .. })) = self.commands.send(command) {
            let _ = events.send(SeqEvent::Rejected("the engine has stopped".into()));
        }
        SeqReceiver { events: rx, why }
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().expect("stats lock").clone()
    }
}

struct Live {
    events: UnboundedSender<SeqEvent>,
    why: Arc<AtomicU8>,
}

impl Live {
    /// Whether the server let go of it because its client went away (an abort), rather than
    /// for a stop string or a deadline.
    fn client_gone(&self) -> bool {
        self.why.load(Ordering::SeqCst) == Release::ClientGone as u8
    }
}

fn run(engine: &mut Engine, commands: mpsc::Receiver<Command>, stats: &Mutex<EngineStats>) {
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    // Set by a shutdown command: stop once nothing is left to do.
    let mut stop = false;
    loop {
        // Block while idle; otherwise take whatever has arrived and go on stepping.
        if !engine.has_work() {
            if stop {
                return;
            }
            match commands.recv() {
                Ok(c) => stop |= accept(engine, &mut live, c),
                Err(_) => return, // the server is gone
            }
        }
        while let Ok(c) = commands.try_recv() {
            stop |= accept(engine, &mut live, c);
        }
        if stop && !engine.has_work() {
            return;
        }
        live.retain(|&id, l| {
            if l.events.is_closed() {
                engine.abort(id);
                if l.client_gone() {
                    m::record_abort();
                }
                false
            } else {
                true
            }
        });
        let events = match engine.step() {
            Ok(events) => events,
            Err(e) => {
                // A failed forward pass fails every request in it; the engine stays usable.
                tracing::error!("engine step failed: {e}");
                for (id, l) in live.drain() {
                    let _ = l.events.send(SeqEvent::Rejected(format!("internal error: {e}")));
                    engine.abort(id);
                }
                continue;
            }
        };
        for event in events {
            let Some(l) = live.get(&event.id) else { continue };
            let mut gone = false;
            if let Some(token) = event.token {
                let cached_tokens = event.cached_tokens;
                let ends = event.finish == Some(FinishReason::Stop);
                gone |= l.events.send(SeqEvent::Token { token, cached_tokens, ends }).is_err();
            }
            if let Some(reason) = event.finish {
                let _ = l.events.send(SeqEvent::Finished(reason));
                live.remove(&event.id);
            } else if gone {
                engine.abort(event.id);
                if l.client_gone() {
                    m::record_abort();
                }
                live.remove(&event.id);
            }
        }
        let s = engine.stats();
        m::record_engine(&s);
        *stats.lock().expect("stats lock") = s;
    }
}

/// Takes one command; returns whether it asks the thread to stop.
fn accept(engine: &mut Engine, live: &mut HashMap<RequestId, Live>, command: Command) -> bool {
    match command {
        Command::Submit { prompt, params, retention, events, why } => match engine.add_request_with_retention(prompt, params, retention) {
            Ok(id) => {
                live.insert(id, Live { events, why });
            }
            Err(e) => {
                let _ = events.send(SeqEvent::Rejected(e.to_string()));
            }
        },
        Command::Shutdown => return true,
    }
    false
}
