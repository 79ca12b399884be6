//! Capturing the log events Tollgate emits in-process, to count them: a minimal
//! `tracing` subscriber that records every event at or above a level.
//!
//! Installed for the current thread only ([`LogCapture::install`]), so run the
//! test on tokio's current-thread runtime (`#[tokio::test]`'s default): every
//! task spawned there, such as an in-process monitor, logs into the capture.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One captured event.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: Level,
    pub target: String,
    /// The message and every field, `message key=value ...`.
    pub text: String,
}

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.level, self.target, self.text)
    }
}

/// Events captured so far.
#[derive(Clone, Default)]
pub struct LogCapture {
    events: Arc<Mutex<Vec<Captured>>>,
}

impl LogCapture {
    /// Capture events at `level` and above on this thread until the guard drops.
    pub fn install(level: Level) -> (LogCapture, tracing::dispatcher::DefaultGuard) {
        let capture = LogCapture::default();
        let subscriber = CaptureSubscriber {
            level,
            events: capture.events.clone(),
            next_span: AtomicU64::new(1),
        };
        let guard = tracing::dispatcher::set_default(&tracing::Dispatch::new(subscriber));
        (capture, guard)
    }

    /// Events whose target starts with `prefix` (e.g. `tollgate_monitor`).
    pub fn from(&self, prefix: &str) -> Vec<Captured> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Forget what was captured so far.
    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }
}

struct CaptureSubscriber {
    level: Level,
    events: Arc<Mutex<Vec<Captured>>>,
    next_span: AtomicU64,
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for CaptureSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Levels order by verbosity: ERROR is the smallest.
        *metadata.level() <= self.level
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = Text(String::new());
        event.record(&mut text);
        self.events.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            text: text.0,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
