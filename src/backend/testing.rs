//! Test support, shared by the unit tests and the integration tests (not used by the service):
//! [`Probe`] wraps any backend (the real ONNX Runtime one, or [`Echo`]) to record every batch it
//! runs and to hold runs at a [`Gate`] the test opens, so tests control timing without sleeps.
//! Every wait here has an upper bound, so a regression fails instead of hanging.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Backend, EngineError};

/// Longest a gated run or a held start waits for the test to let it go.
pub const GATE_PATIENCE: Duration = Duration::from_secs(120);

/// The batches a backend ran: for each batch, the first value of each image's tensor (and, once
/// [`BatchLog::keep_inputs`] was called, each batch's whole input).
#[derive(Clone, Default)]
pub struct BatchLog(Arc<Mutex<LogState>>);

#[derive(Default)]
struct LogState {
    firsts: Vec<Vec<f32>>,
    inputs: Option<Vec<Vec<f32>>>,
}

impl BatchLog {
    fn push(&self, input: &[f32], batch: usize, input_len: usize) {
        let mut log = self.0.lock().unwrap();
        log.firsts
            .push(input.chunks(input_len).take(batch).map(|c| c[0]).collect());
        if let Some(inputs) = log.inputs.as_mut() {
            inputs.push(input[..batch * input_len].to_vec());
        }
    }

    /// Every batch so far (first value of each image).
    pub fn batches(&self) -> Vec<Vec<f32>> {
        self.0.lock().unwrap().firsts.clone()
    }

    /// From now on, also keep every batch's whole input (off by default: large models).
    pub fn keep_inputs(&self) {
        self.0.lock().unwrap().inputs.get_or_insert_with(Vec::new);
    }

    /// The whole input of every batch since [`BatchLog::keep_inputs`].
    pub fn inputs(&self) -> Vec<Vec<f32>> {
        self.0.lock().unwrap().inputs.clone().unwrap_or_default()
    }

    /// The size of every batch so far.
    pub fn sizes(&self) -> Vec<usize> {
        self.0.lock().unwrap().firsts.iter().map(Vec::len).collect()
    }

    /// Number of batches so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().firsts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        let mut log = self.0.lock().unwrap();
        log.firsts.clear();
        if let Some(inputs) = log.inputs.as_mut() {
            inputs.clear();
        }
    }
}

#[derive(Default)]
struct GateState {
    closed: bool,
    tokens: usize,
}

/// Open: runs pass. Closed: each run (or [`Gate::wait`]) takes one token given by
/// [`Gate::release`], waiting for it at most [`GATE_PATIENCE`] (then it panics: a test bug).
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

impl Gate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// A closed gate.
    pub fn closed() -> Self {
        let gate = Self::default();
        gate.close();
        gate
    }

    /// From now on every pass needs a token.
    pub fn close(&self) {
        self.0.0.lock().unwrap().closed = true;
    }

    /// Lets everything pass again.
    pub fn open(&self) {
        self.0.0.lock().unwrap().closed = false;
        self.0.1.notify_all();
    }

    /// Lets `n` more passes through a closed gate.
    pub fn release(&self, n: usize) {
        self.0.0.lock().unwrap().tokens += n;
        self.0.1.notify_all();
    }

    /// Passes the gate (blocking the thread while it is closed and has no token).
    pub fn wait(&self) {
        let (lock, cvar) = &*self.0;
        let state = lock.lock().unwrap();
        let (mut state, timeout) = cvar
            .wait_timeout_while(state, GATE_PATIENCE, |s| s.closed && s.tokens == 0)
            .unwrap();
        assert!(!timeout.timed_out(), "test gate never opened");
        if state.closed {
            state.tokens -= 1;
        }
    }
}

/// Records each batch in a [`BatchLog`], passes a [`Gate`], then runs the inner backend.
pub struct Probe<B> {
    pub inner: B,
    pub log: BatchLog,
    pub gate: Gate,
    /// Values per image of the input (to find each image's first value).
    pub input_len: usize,
}

impl<B: Backend> Backend for Probe<B> {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        self.log.push(input, batch, self.input_len);
        self.gate.wait();
        self.inner.run(input, batch)
    }
}

/// First value that makes [`Echo`] fail the whole batch.
pub const POISON: f32 = 666.0;
/// First value that makes [`Echo`] panic.
pub const PANIC: f32 = 999.0;

/// A synthetic model: each image's output is `[v, -v, 0, 0, …]` (`output_len` values), `v` its
/// first input value; [`POISON`] fails the batch, [`PANIC`] panics.
pub struct Echo {
    pub input_len: usize,
    pub output_len: usize,
}

impl Backend for Echo {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        assert_eq!(input.len(), batch * self.input_len, "input length");
        let firsts: Vec<f32> = input.chunks(self.input_len).map(|c| c[0]).collect();
        if firsts.contains(&PANIC) {
            panic!("test backend panic");
        }
        if firsts.contains(&POISON) {
            return Err(EngineError::Inference("poisoned input".into()));
        }
        let mut out = vec![0.0; batch * self.output_len];
        for (row, v) in out.chunks_mut(self.output_len).zip(firsts) {
            row[0] = v;
            if self.output_len > 1 {
                row[1] = -v;
            }
        }
        Ok(out)
    }
}

/// A backend that answers from a script of outputs (for shape-check tests).
pub struct Scripted(pub VecDeque<Result<Vec<f32>, EngineError>>);

impl Backend for Scripted {
    fn run(&mut self, _input: &[f32], _batch: usize) -> Result<Vec<f32>, EngineError> {
        self.0
            .pop_front()
            .unwrap_or_else(|| Err(EngineError::Inference("script ran out".into())))
    }
}
