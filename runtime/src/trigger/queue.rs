//! The queue trigger: a consumer per function and queue. It leases a batch
//! of messages (each lease a durable attempt), runs each in its own task
//! while renewing its lease, and commits the outcome with the record:
//! deleted on success (with the outputs), visible again after a backoff on
//! failure, moved to `<queue>-poison` after `max_dequeue_count` attempts.
//! A message enqueued on this node wakes the consumer at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::config::{Queue, QueueTrigger, Trigger};
use super::events::{Ended, Events, Job};
use crate::events::{Effects, Message, MessageFate, envelope, now_us};
use crate::manifest::OUTPUT_PARAMS;

/// Runs until the events stop.
pub(crate) async fn consume(
    events: Arc<Events>,
    function: String,
    trigger: QueueTrigger,
    wake: Arc<Notify>,
) {
    // Never more leased than the function can run at once: a message that
    // cannot start waits in the queue, visible to other consumers, not
    // leased here (`max_concurrency = 1` leases one at a time).
    let max_concurrency = events
        .runtime()
        .manifest()
        .function(&function)
        .map_or(u32::MAX, |f| f.concurrency.max.get());
    let at_once = (trigger.batch_size + trigger.new_batch_threshold).min(max_concurrency);
    let batch = trigger.batch_size.min(at_once);
    let running = Arc::new(Semaphore::new(at_once as usize));
    let trigger = Arc::new(trigger);
    let queue = trigger.queue.to_string();
    loop {
        if events.is_stopping() {
            return;
        }
        // A new batch once no more than `new_batch_threshold` run.
        let Ok(mut permits) = running.clone().acquire_many_owned(batch).await else {
            return;
        };
        let leased = match events.store().lease(&queue, batch, trigger.lease).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(queue, error = %e, "failed to lease queue messages; retrying in 1 s");
                drop(permits);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if leased.is_empty() {
            drop(permits);
            // Asleep until a message arrives here, the next retry is due,
            // or (for messages another process enqueued) a minute passes.
            let next = events.store().next_visible(&queue).await.ok().flatten();
            let wait = next.map_or(Duration::from_secs(60), |at| {
                Duration::from_micros(u64::try_from(at - now_us()).unwrap_or(0))
                    .min(Duration::from_secs(60))
            });
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = events.stopped() => return,
            }
            continue;
        }
        for message in leased {
            let permit = permits.split(1).expect("one permit per leased message");
            let events = events.clone();
            let trigger = trigger.clone();
            let function = function.clone();
            tokio::spawn(async move {
                process(&events, &function, &trigger, message).await;
                drop(permit);
            });
        }
    }
}

/// Runs one leased message to its fate.
async fn process(events: &Arc<Events>, function: &str, trigger: &QueueTrigger, m: Message) {
    let fate = |f: fn(String, String) -> MessageFate| Effects {
        message: Some(f(m.id.clone(), m.lease.clone())),
        ..Effects::default()
    };
    let success = fate(|id, lease| MessageFate::Complete { id, lease });
    let unstarted = fate(|id, lease| MessageFate::Release { id, lease });
    let failure = Effects {
        message: Some(if m.dequeue_count >= trigger.max_dequeue_count {
            MessageFate::Poison {
                id: m.id.clone(),
                lease: m.lease.clone(),
                to: trigger.queue.poison(),
            }
        } else {
            MessageFate::Retry {
                id: m.id.clone(),
                lease: m.lease.clone(),
                after: trigger.backoff(m.dequeue_count),
            }
        }),
        ..Effects::default()
    };
    // Output paths may use the message's top-level fields ({id} of an
    // order), but never in place of a host parameter ({invocation_id}).
    let mut params: Vec<(String, String)> = Vec::new();
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(&m.body) {
        for (k, v) in fields {
            if OUTPUT_PARAMS.contains(&k.as_str()) {
                continue;
            }
            match v {
                serde_json::Value::String(s) => params.push((k, s)),
                serde_json::Value::Number(n) => params.push((k, n.to_string())),
                _ => {}
            }
        }
    }
    let job = Job {
        function: function.to_owned(),
        trigger: Queue::TYPE,
        input: envelope::queue_event(&m, function),
        params,
        success,
        failure,
        unstarted,
    };
    // The lease is renewed at half its term while the function runs.
    let renew = {
        let events = events.clone();
        let held = vec![(m.id.clone(), m.lease.clone())];
        let lease = trigger.lease;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 2).await;
                if let Err(e) = events.store().renew(held.clone(), lease).await {
                    tracing::warn!(error = %e, "failed to renew a queue message's lease");
                }
            }
        })
    };
    let ran = events.invoke(job).await;
    renew.abort();
    let failed = match &ran {
        Ended::Recorded(record) => !super::events::succeeded(record),
        Ended::Unstarted | Ended::NotCommitted => false,
    };
    if failed && m.dequeue_count < trigger.max_dequeue_count {
        // Visible again after its backoff: the consumer may be asleep until
        // a lease's end, so it is woken to sleep until the retry is due.
        events.wake_queue(trigger.queue.as_str());
    }
    if failed && m.dequeue_count >= trigger.max_dequeue_count {
        tracing::warn!(
            queue = trigger.queue.as_str(),
            message_id = m.id.as_str(),
            attempts = m.dequeue_count,
            "a message failed on every attempt and moved to {}",
            trigger.queue.poison()
        );
    }
}
