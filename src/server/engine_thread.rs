//! The engine runs on its own OS thread; the async server talks to it over channels. A request
//! whose receiver is gone (the client disconnected) is aborted before the next step.
//!
//! A step that fails (an error, or a panic anywhere in it) fails only its own requests, with
//! the cause; the rest go on. When the engine cannot go on (`MAX_FAILED_STEPS` failures in a
//! row, or a panic on this thread outside a step) it is declared stopped, with the reason:
//! every request it holds or is given from then on is answered with that reason, and
//! `EngineHandle::failure` says so (the server answers /health 503 and shuts down).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;

use super::metrics as m;
use crate::engine::{Engine, EngineStats, FinishReason, Request, RequestId, SampledToken, StepFault, panic_message};

/// Failed steps in a row after which the engine is declared stopped. A failed step's requests
/// are aborted, so a request that breaks a step (input reaching a bug) is gone by the next one,
/// and two such requests arriving together fail two steps. Three failures in a row, each after
/// the previous step's requests were removed, point at the engine itself (a lost device, a
/// broken cache) rather than at its requests: stepping on would fail every later request one
/// step at a time while the replica looked alive, so it stops and a supervisor restarts it.
pub const MAX_FAILED_STEPS: u32 = 3;

/// A failure to cause on purpose, read once at start from the `BRAID_TEST_FAULT` environment
/// variable. For tests only: `panic-once@N` (forward pass N panics on a compute thread),
/// `panic-always@N` (every pass from N panics), `error-once@N`, `error-always@N` (the same as
/// backend errors), `panic-thread@N` (the engine thread itself panics, outside any step, once
/// N passes have run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    Step(StepFault),
    Thread(u64),
}

impl std::str::FromStr for TestFault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "BRAID_TEST_FAULT={s:?}: expected panic-once@N, panic-always@N, error-once@N, error-always@N or panic-thread@N"
            )
        };
        let (kind, at) = s.split_once('@').ok_or_else(bad)?;
        let at: u64 = at.parse().map_err(|_| bad())?;
        let step = |panic, always| Ok(Self::Step(StepFault { at, always, panic }));
        match kind {
            "panic-once" => step(true, false),
            "panic-always" => step(true, true),
            "error-once" => step(false, false),
            "error-always" => step(false, true),
            "panic-thread" => Ok(Self::Thread(at)),
            _ => Err(bad()),
        }
    }
}

impl TestFault {
    /// The fault `BRAID_TEST_FAULT` asks for, if any.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var("BRAID_TEST_FAULT") {
            Ok(v) if !v.is_empty() => v.parse().map(Some),
            _ => Ok(None),
        }
    }
}

/// What a request hears from the engine.
#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// The engine has scheduled the sequence for the first time: its prefill has begun, so
    /// its wait in the queues is over (the request's deadline stops here).
    Started,
    /// `ends` marks the stop token that ended the sequence: counted, but not part of the text.
    Token {
        token: SampledToken,
        cached_tokens: usize,
        ends: bool,
    },
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
    Submit {
        request: Request,
        events: UnboundedSender<SeqEvent>,
        why: Arc<AtomicU8>,
    },
    /// Stop stepping and drop the engine (which finishes its disk-cache writes).
    Shutdown,
}

/// The server's side of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Why the engine stopped serving, once it has; set by the engine thread.
    failure: Arc<watch::Sender<Option<String>>>,
    /// Set by `shutdown`: the thread ending from then on is expected.
    stopping: Arc<AtomicBool>,
}

impl EngineHandle {
    pub fn spawn(engine: Engine) -> Self {
        Self::spawn_with_fault(engine, None)
    }

    /// Like `spawn`, with a failure to cause on purpose (tests only).
    pub fn spawn_with_fault(mut engine: Engine, fault: Option<TestFault>) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(engine.stats()));
        let failure = Arc::new(watch::Sender::new(None));
        let thread_fault_at = match fault {
            Some(TestFault::Step(f)) => {
                engine.inject_fault(f);
                u64::MAX
            }
            Some(TestFault::Thread(at)) => at,
            None => u64::MAX,
        };
        let (shared, failed) = (stats.clone(), failure.clone());
        let thread = std::thread::Builder::new()
            .name("braid-engine".into())
            .spawn(move || {
                let _published = PublishPanic(&failed);
                serve(engine, rx, &shared, &failed, thread_fault_at);
            })
            .expect("the engine thread starts");
        Self {
            commands: tx,
            stats,
            thread: Arc::new(Mutex::new(Some(thread))),
            failure,
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Stops the engine thread once it has nothing left to do and waits for it, so queued
    /// disk-cache writes reach the disk before the process exits.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::Shutdown);
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// Why the engine can no longer serve, if it can't: what the thread reported when it gave
    /// up, or that the thread has ended (it never should before `shutdown`). Read live, not
    /// from the last step's statistics.
    pub fn failure(&self) -> Option<String> {
        if let Some(reason) = self.failure.borrow().clone() {
            return Some(reason);
        }
        let ended =
            self.thread.lock().ok().is_some_and(|t| t.as_ref().is_some_and(std::thread::JoinHandle::is_finished));
        (ended && !self.stopping.load(Ordering::SeqCst)).then(|| "the engine thread has ended".to_string())
    }

    /// Waits until the engine has stopped serving; returns why.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match reason {
            Ok(Some(reason)) => reason,
            // The thread keeps the sender alive as long as it runs; unreachable in practice.
            _ => "the engine thread has ended".to_string(),
        }
    }

    /// Queues one sequence (checked against the engine's `limits` when it was made); its events
    /// arrive on the returned receiver. Dropping the receiver aborts the sequence.
    pub fn submit(&self, request: Request) -> SeqReceiver {
        let (events, rx) = unbounded_channel();
        let why = Arc::new(AtomicU8::new(Release::ClientGone as u8));
        let command = Command::Submit { request, events, why: why.clone() };
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

/// Publishes a panic that ends the engine thread past `serve`'s own catch (while it answers
/// requests after a stop, or drops the engine), so the server still learns of it and shuts down.
struct PublishPanic<'a>(&'a watch::Sender<Option<String>>);

impl Drop for PublishPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.send_if_modified(|f| f.is_none() && f.replace("the engine thread panicked".into()).is_none());
        }
    }
}

/// The engine thread: steps until shut down; if the engine stops on the way, tells every
/// request it holds why, publishes the reason, and answers every later request with it until
/// shut down.
fn serve(
    mut engine: Engine,
    commands: mpsc::Receiver<Command>,
    stats: &Mutex<EngineStats>,
    failure: &watch::Sender<Option<String>>,
    thread_fault_at: u64,
) {
    // Outside the caught closure, so the requests it held can still be answered after a panic.
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    let outcome = catch_unwind(AssertUnwindSafe(|| run(&mut engine, &commands, stats, &mut live, thread_fault_at)));
    let reason = match outcome {
        Ok(None) => return,
        Ok(Some(reason)) => reason,
        Err(payload) => format!("the engine thread failed: {}", panic_message(&*payload)),
    };
    tracing::error!("the engine has stopped: {reason}");
    // Published before any request hears of it, so /health already agrees.
    failure.send_replace(Some(reason.clone()));
    let message = format!("the engine has stopped: {reason}");
    for (_, l) in live.drain() {
        let _ = l.events.send(SeqEvent::Rejected(message.clone()));
    }
    for command in commands.iter() {
        match command {
            Command::Submit { events, .. } => {
                let _ = events.send(SeqEvent::Rejected(message.clone()));
            }
            Command::Shutdown => break,
        }
    }
    // The engine may be half-way through a change; dropping it still finishes its disk writes,
    // and a panic there ends only this thread.
    drop(engine);
}

/// Steps until shut down (None) or until the engine cannot go on (the reason).
fn run(
    engine: &mut Engine,
    commands: &mpsc::Receiver<Command>,
    stats: &Mutex<EngineStats>,
    live: &mut HashMap<RequestId, Live>,
    thread_fault_at: u64,
) -> Option<String> {
    // Set by a shutdown command: stop once nothing is left to do.
    let mut stop = false;
    let mut failed_steps = 0;
    loop {
        // Block while idle; otherwise take whatever has arrived and go on stepping.
        if !engine.has_work() {
            if stop {
                return None;
            }
            match commands.recv() {
                Ok(c) => stop |= accept(engine, live, c),
                Err(_) => return None, // the server is gone
            }
        }
        while let Ok(c) = commands.try_recv() {
            stop |= accept(engine, live, c);
        }
        if stop && !engine.has_work() {
            return None;
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
        // Tells each request the engine starts that its wait is over, before the forward pass.
        let mut on_start = |id| {
            if let Some(l) = live.get(&id) {
                let _ = l.events.send(SeqEvent::Started);
            }
        };
        let events = match engine.step_with(&mut on_start) {
            Ok(events) => {
                // Only a forward pass that went through shows the engine works (a step that
                // just hands out queued abort events shows nothing).
                if !engine.last_step().is_empty() {
                    failed_steps = 0;
                }
                events
            }
            Err(e) => {
                // Only the step's own requests fail (the engine has aborted them); the waiting
                // ones and those not in this step go on.
                failed_steps += 1;
                tracing::error!("{e} ({} requests failed; {failed_steps} failed steps in a row)", e.failed.len());
                for id in &e.failed {
                    if let Some(l) = live.remove(id) {
                        let _ = l.events.send(SeqEvent::Rejected(e.to_string()));
                    }
                }
                if failed_steps >= MAX_FAILED_STEPS {
                    return Some(format!("{failed_steps} engine steps failed in a row; the last: {}", e.cause));
                }
                publish(engine, stats);
                continue;
            }
        };
        if engine.forward_passes() >= thread_fault_at {
            panic!(
                "injected test fault on the engine thread after forward pass {} (BRAID_TEST_FAULT)",
                engine.forward_passes()
            );
        }
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
        publish(engine, stats);
    }
}

fn publish(engine: &Engine, stats: &Mutex<EngineStats>) {
    let s = engine.stats();
    m::record_engine(&s);
    *stats.lock().expect("stats lock") = s;
}

/// Takes one command; returns whether it asks the thread to stop.
fn accept(engine: &mut Engine, live: &mut HashMap<RequestId, Live>, command: Command) -> bool {
    match command {
        Command::Submit { request, events, why } => {
            let id = engine.add(request);
            live.insert(id, Live { events, why });
        }
        Command::Shutdown => return true,
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_faults_parse_and_bad_ones_are_refused() {
        let step = |at, always, panic| Ok(TestFault::Step(StepFault { at, always, panic }));
        assert_eq!("panic-once@3".parse(), step(3, false, true));
        assert_eq!("panic-always@1".parse(), step(1, true, true));
        assert_eq!("error-once@7".parse(), step(7, false, false));
        assert_eq!("error-always@2".parse(), step(2, true, false));
        assert_eq!("panic-thread@4".parse(), Ok(TestFault::Thread(4)));
        for bad in ["panic-once", "panic-once@", "panic-once@x", "panic-twice@3", "@3", "panic-once@-1"] {
            let err = bad.parse::<TestFault>().unwrap_err();
            assert!(err.contains("BRAID_TEST_FAULT") && err.contains("panic-once@N"), "{bad}: {err}");
        }
    }
}
