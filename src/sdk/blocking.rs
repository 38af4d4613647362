//! A blocking facade for simple programs: a thread of its own runs a glommio
//! executor with the [`Client`]; calls go over a [`Handle`], events come
//! back over a bounded channel.
//!
//! When the application stops reading events the channel fills up and the
//! driver stops reading the socket (TCP pushes back on the node) until it
//! reads again.

use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

use super::agent::{Event, RequestId, SdkError};
use super::driver::{CallError, Client, ClientConfig, Handle};
use crate::protocol::proto;

/// Events buffered between the driver thread and the application.
const EVENT_QUEUE: usize = 1_024;

/// Why [`BlockingClient::next_event`] returned no event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NextError {
    #[error("no event within the wait")]
    Timeout,
    /// The client stopped and every event was read.
    #[error("the client stopped")]
    Stopped,
}

/// See the module docs. Dropping it closes the client and joins its thread.
pub struct BlockingClient {
    handle: Handle,
    events: crossbeam_channel::Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

impl BlockingClient {
    /// Starts the driver thread; returns once the client runs (its first
    /// connect or lookup is under way).
    pub fn start(cfg: ClientConfig) -> Result<BlockingClient, StartError> {
        let (events_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new().name("longlink-sdk".into()).spawn(move || {
            let ex = match glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).io_memory(64 * 1024).make() {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = ready_tx.send(Err(StartError::Executor(e.to_string())));
                    return;
                }
            };
            ex.run(async move {
                let mut client = match Client::new(cfg) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StartError::Sdk(e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(client.handle()));
                while let Some(ev) = client.next_event().await {
                    if events_tx.send(ev).is_err() {
                        client.close(); // nobody listens any more
                    }
                }
            });
        })?;
        match ready.recv() {
            Ok(Ok(handle)) => Ok(BlockingClient { handle, events, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(StartError::Executor("the driver thread ended".into()))
            }
        }
    }

    /// The next event, waiting at most `wait`.
    pub fn next_event(&self, wait: Duration) -> Result<Event, NextError> {
        self.events.recv_timeout(wait).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => NextError::Timeout,
            crossbeam_channel::RecvTimeoutError::Disconnected => NextError::Stopped,
        })
    }

    /// A handle to call from other threads too.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Sends an upstream request; its answer comes as [`Event::Response`].
    pub fn request(&self, service: &str, body: Bytes, timeout: Duration) -> Result<RequestId, SdkError> {
        self.handle.request(service, body, timeout)
    }

    /// Sends an upstream request and waits for its answer.
    pub fn call(&self, service: &str, body: Bytes, timeout: Duration) -> Result<proto::Response, CallError> {
        self.handle.call(service, body, timeout)
    }

    /// The message `seq` (and all before it) was handled: acknowledge it.
    pub fn message_handled(&self, seq: u64) -> Result<(), SdkError> {
        self.handle.message_handled(seq)
    }

    pub fn set_foreground(&self, foreground: bool) -> Result<(), SdkError> {
        self.handle.set_foreground(foreground)
    }

    pub fn network_changed(&self, net: &str) -> Result<(), SdkError> {
        self.handle.network_changed(net)
    }

    /// Closes the client; events already produced can still be read.
    pub fn close(&self) -> Result<(), SdkError> {
        self.handle.close()
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        // Never block here: the driver may itself be blocked handing over
        // an event. Dropping the receiver unblocks it and makes it close.
        self.handle.try_close();
        drop(std::mem::replace(&mut self.events, crossbeam_channel::never()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why [`BlockingClient::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Sdk(#[from] SdkError),
    #[error("cannot start the driver thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot start the executor: {0}")]
    Executor(String),
}
