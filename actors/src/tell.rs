//! Casting to another actor without dropping a failure silently.
//!
//! A cast fails only when its receiver is not running: it crashed and its
//! supervisor is bringing it back, or the pipeline is stopping. The sender
//! cannot do better than go on (the restarted receiver is handed what it
//! needs by its supervisor), but the failure is logged, naming what was lost.

use ractor::{ActorRef, DerivedActorRef, Message};
use tracing::warn;

/// Casts `msg` to `to`; logs `what` was lost if `to` is not running.
/// Whether it was delivered to the mailbox.
pub(crate) fn tell<M: Message>(to: &ActorRef<M>, what: &str, msg: M) -> bool {
    match to.cast(msg) {
        Ok(()) => true,
        Err(e) => {
            warn!(to = ?to.get_name().unwrap_or_default(), "{what} was not delivered: {e}");
            false
        }
    }
}

/// The same for an event sent through a derived reference.
pub(crate) fn publish<E: Message>(to: &DerivedActorRef<E>, what: &str, event: E) -> bool {
    match to.send_message(event) {
        Ok(()) => true,
        Err(e) => {
            warn!("{what} was not delivered: {e}");
            false
        }
    }
}

/// Lets a subscriber hear a publisher's event as one of its own messages,
/// `$msg::$variant(event)`, through a derived reference:
/// `heard_as!(JobFinished => FanInMsg::Finished);`.
#[macro_export]
macro_rules! heard_as {
    ($event:ty => $msg:ident :: $variant:ident) => {
        impl From<$event> for $msg {
            fn from(e: $event) -> Self {
                $msg::$variant(e)
            }
        }

        impl TryFrom<$msg> for $event {
            type Error = $msg;

            fn try_from(msg: $msg) -> Result<Self, $msg> {
                match msg {
                    $msg::$variant(e) => Ok(e),
                    other => Err(other),
                }
            }
        }
    };
}
