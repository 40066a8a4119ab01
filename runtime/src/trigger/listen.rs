//! Starts the event triggers of production: a timer per schedule, a
//! consumer per queue trigger, a scanner per blob trigger, on the shared
//! [`Events`].

use std::sync::Arc;

use super::config::TriggerConfig;
use super::events::Events;
use crate::events::store::StoreError;

/// Opens `events` and starts every event trigger the manifest declares.
pub async fn start(events: &Arc<Events>) -> Result<(), StoreError> {
    events.open().await?;
    for f in &events.runtime().manifest().functions {
        let timers = f
            .triggers
            .iter()
            .filter(|t| matches!(t, TriggerConfig::Timer(_)))
            .count();
        let mut timer_index = 0;
        for t in &f.triggers {
            let function = f.name.to_string();
            let task = match t {
                // Durable functions run from the durable store (`trigger::durable`).
                TriggerConfig::Http(_) | TriggerConfig::Durable(_) => continue,
                TriggerConfig::Timer(timer) => {
                    // One status per timer: the function's name, with `#n`
                    // when it has several.
                    let key = if timers > 1 {
                        format!("{function}#{timer_index}")
                    } else {
                        function.clone()
                    };
                    timer_index += 1;
                    tokio::spawn(super::timer::run(
                        events.clone(),
                        function,
                        key,
                        (**timer).clone(),
                    ))
                }
                TriggerConfig::Queue(queue) => tokio::spawn(super::queue::consume(
                    events.clone(),
                    function,
                    queue.clone(),
                    events.queue_waker(queue.queue.as_str()),
                )),
                TriggerConfig::Blob(blob) => tokio::spawn(super::blob::scan(
                    events.clone(),
                    function,
                    blob.clone(),
                    events.container_waker(blob.path.container()),
                )),
            };
            events.keep(task);
        }
    }
    Ok(())
}
