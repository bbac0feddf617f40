//! The drain: SIGTERM (or ctrl-c) starts it, and every port of a process sees it at once.
//!
//! [`Drain::on_signal`] watches for the signal; [`crate::serve_grpc`] flips gRPC health to
//! NOT_SERVING and stops taking new calls when it starts, and a process with another port
//! (the orchestrator's HTTP API) asks [`Drain::is_draining`] to refuse new work there too
//! (503 with `Retry-After`) and waits on [`Drain::started`]. In-flight work finishes either
//! way.

use tokio::sync::watch;

/// Whether the process drains; cheap to clone, every clone sees the same drain.
#[derive(Debug, Clone)]
pub struct Drain {
    started: watch::Receiver<bool>,
}

impl Drain {
    /// A drain that starts on SIGTERM or ctrl-c (watched by a background task).
    pub fn on_signal() -> Self {
        let (drain, start) = Self::manual();
        tokio::spawn(async move {
            shutdown_signal().await;
            start.start();
        });
        drain
    }

    /// A drain started by hand through its [`DrainStarter`] (tests, embedding).
    pub fn manual() -> (Self, DrainStarter) {
        let (tx, rx) = watch::channel(false);
        (Self { started: rx }, DrainStarter(tx))
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once the drain has started (at once if it has).
    pub async fn started(mut self) {
        // An error means the starter is gone without starting it: then it never starts.
        if self.started.wait_for(|&draining| draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Starts a [`Drain`] made by [`Drain::manual`].
#[derive(Debug)]
pub struct DrainStarter(watch::Sender<bool>);

impl DrainStarter {
    /// Starts the drain (again: nothing changes).
    pub fn start(&self) {
        self.0.send_replace(true);
    }
}

/// Resolves when the process receives SIGTERM or ctrl-c. Pass it to
/// `Server::serve_with_shutdown`, which then stops accepting connections and
/// drains in-flight requests.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_drain_start() {
        let (drain, starter) = Drain::manual();
        let other = drain.clone();
        assert!(!drain.is_draining());
        let waiting = tokio::spawn(other.clone().started());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        starter.start();
        waiting.await.unwrap();
        assert!(drain.is_draining() && other.is_draining());
        // Already started: resolves at once.
        drain.started().await;
    }
}
