//! Graceful shutdown: one [`CancellationToken`] per process, cancelled by SIGTERM
//! or SIGINT. Servers take the token (or any future) from their caller, so tests
//! stop them on demand instead of sending signals.

use tokio_util::sync::CancellationToken;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutting down: draining, then flushing");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            // Signal handlers unavailable: fall back to Ctrl-C only.
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
