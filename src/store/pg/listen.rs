//! The listening connection: `LISTEN gpu_jobs`, kept up from the first read
//! of the store's change token for as long as the store lives. Each notification from another connection moves the
//! store's change token, so a row inserted by any program (the trigger in
//! `migrations/postgres/0003_notify.sql` notifies for it) wakes the
//! daemon's dispatchers at its next poll of the token, a round trip on
//! this connection rather than a query of the table. When the connection
//! is lost the token moves every few seconds instead (a slow poll), and
//! once more when it is back, for what was missed meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::{info, warn};

use super::{pg_text, Shared, SLOW_POLL};

/// Keeps a listening connection to `config` up, forever (the store aborts
/// this task when it is dropped).
pub(super) async fn run(config: tokio_postgres::Config, shared: Arc<Shared>) {
    let mut delay = Duration::from_millis(100);
    let mut lost = false;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let counting = shared.clone();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => {
                                let own = counting
                                    .own_pids
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .contains(&n.process_id());
                                if !own {
                                    counting.notified.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => return pg_text(&e),
                        }
                    }
                    "the server closed it".to_string()
                });
                match client.batch_execute("LISTEN gpu_jobs").await {
                    Ok(()) => {
                        if lost {
                            info!("listening for new jobs on {} again", shared.place);
                        }
                        delay = Duration::from_millis(100);
                        // Whatever came in while nobody listened.
                        shared.notified.fetch_add(1, Ordering::SeqCst);
                        *shared.listener.lock().await = Some(client);
                        shared.up.send_replace(true);
                        let why = driver.await.unwrap_or_else(|e| e.to_string());
                        *shared.listener.lock().await = None;
                        shared.up.send_replace(false);
                        warn!(
                            "the connection listening for new jobs on {} ended ({why}); until it is back, the queue is polled every {} s",
                            shared.place,
                            SLOW_POLL.as_secs()
                        );
                        lost = true;
                    }
                    Err(e) => {
                        driver.abort();
                        if !lost {
                            warn!(
                                "LISTEN gpu_jobs on {} failed: {}",
                                shared.place,
                                pg_text(&e)
                            );
                            lost = true;
                        }
                    }
                }
            }
            Err(e) => {
                if !lost {
                    warn!(
                        "cannot open the listening connection to {}: {}; polling every {} s meanwhile",
                        shared.place,
                        pg_text(&e),
                        SLOW_POLL.as_secs()
                    );
                    lost = true;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
