//! The engine worker: one OS thread that owns the scheduler and the KV cache and runs steps
//! back to back while there is work, taking new requests between steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flint_engine::{Engine, PreparedRequest, Scheduler, SchedulerConfig, SchedulerStats, Sink};
use tokio::sync::oneshot;

use crate::{Error, Result};

enum Command {
    Submit {
        request: PreparedRequest,
        sink: Sink<'static>,
        cancel: Arc<AtomicBool>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Cancel everything still running (the grace period is over).
    CancelAll,
    Stop,
}

/// Handle to the worker thread. Cloneable; the thread stops when `stop` is called.
#[derive(Clone, Debug)]
pub struct Worker {
    commands: Sender<Command>,
    stats: Arc<Mutex<SchedulerStats>>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Worker {
    /// Starts the worker with a KV cache of `config.n_blocks` blocks on the engine's backend.
    pub fn start(engine: Arc<Engine>, config: SchedulerConfig) -> Result<Self> {
        let cache = engine.new_kv_cache(config.n_blocks, config.block_size).map_err(Error::Engine)?;
        let mut scheduler: Scheduler<'static> = Scheduler::new(config, engine.stop_ids()).map_err(Error::Engine)?;
        let stats = Arc::new(Mutex::new(scheduler.stats()));
        let (commands, inbox) = mpsc::channel::<Command>();
        let shared = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("flint-engine".to_string())
            .spawn(move || {
                // A panic here is a bug in the engine. A server that answers health checks but
                // can no longer generate is worse than one that stops: exit so that a
                // supervisor restarts it. The panic hook has already printed the message.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&engine, &mut scheduler, &cache, &inbox, &shared)
                }));
                if outcome.is_err() {
                    tracing::error!("the engine thread panicked; exiting");
                    std::process::exit(70);
                }
            })
            .map_err(|e| Error::Startup(format!("cannot start the engine thread: {e}")))?;
        Ok(Worker { commands, stats, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Queues a request; errors when the scheduler refuses it (overload, too long).
    pub async fn submit(&self, request: PreparedRequest, sink: Sink<'static>, cancel: Arc<AtomicBool>) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Submit { request, sink, cancel, reply }).map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The scheduler's counts after its last step.
    pub fn stats(&self) -> SchedulerStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until nothing runs or waits, or `grace` passes; then cancels what is left.
    /// Returns whether everything finished by itself.
    pub async fn drain(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            let s = self.stats();
            if s.running == 0 && s.waiting == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                let _ = self.commands.send(Command::CancelAll);
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the thread after its current step and waits for it.
    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

fn publish(scheduler: &Scheduler<'_>, shared: &Mutex<SchedulerStats>) {
    let s = scheduler.stats();
    *shared.lock().unwrap_or_else(|p| p.into_inner()) = s;
    metrics::gauge!("flint_queue_depth").set(s.waiting as f64);
    metrics::gauge!("flint_running_requests").set(s.running as f64);
    metrics::gauge!("flint_kv_blocks_used").set(s.kv_blocks_used as f64);
    metrics::gauge!("flint_kv_blocks_total").set(s.kv_blocks_total as f64);
    metrics::gauge!("flint_kv_blocks_cached").set(s.kv_blocks_cached as f64);
    metrics::gauge!("flint_steps_in_flight").set(scheduler.steps_in_flight() as f64);
    metrics::counter!("flint_steps_total").absolute(s.steps);
    metrics::counter!("flint_step_model_wait_microseconds_total").absolute(s.model_wait_us);
    metrics::counter!("flint_step_host_microseconds_total").absolute(s.host_us);
    metrics::counter!("flint_mixed_draw_steps_total").absolute(s.mixed_draw_steps);
}

fn run(
    engine: &Engine,
    scheduler: &mut Scheduler<'static>,
    cache: &flint_engine::KvStore,
    inbox: &Receiver<Command>,
    shared: &Mutex<SchedulerStats>,
) {
    let mut stopping = false;
    let mut last_preemptions = 0;
    loop {
        // Take every pending command; block for one only when idle.
        let mut next = if scheduler.has_work() {
            inbox.try_recv().ok()
        } else {
            match inbox.recv_timeout(Duration::from_millis(200)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        while let Some(command) = next.take() {
            match command {
                Command::Submit { request, sink, cancel, reply } => {
                    let result = if stopping {
                        Err(Error::ShuttingDown)
                    } else {
                        scheduler.add(request, sink, cancel).map_err(Error::Engine)
                    };
                    let _ = reply.send(result);
                }
                Command::CancelAll => scheduler.cancel_all(),
                Command::Stop => stopping = true,
            }
            next = inbox.try_recv().ok();
        }
        if stopping {
            scheduler.cancel_all();
            publish(scheduler, shared);
            return;
        }
        if scheduler.has_work() {
            if let Err(e) = scheduler.step(&engine.executor(cache), engine.tokenizer()) {
                tracing::error!(error = %e, "engine step failed");
            }
            let preemptions = scheduler.stats().preemptions;
            if preemptions > last_preemptions {
                metrics::counter!("flint_preemptions_total").increment(preemptions - last_preemptions);
                last_preemptions = preemptions;
            }
        }
        publish(scheduler, shared);
    }
}

/// Marks a request cancelled when dropped: the stream's owner holds one, so a client that
/// disconnects (tonic drops the stream) frees the request's blocks at the next step.
#[derive(Debug)]
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
