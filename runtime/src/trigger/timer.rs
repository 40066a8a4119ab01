//! The timer trigger: runs a function on its NCRONTAB schedule, never two
//! runs of one timer at once. Its status (last and next run) is committed
//! with each run's record, so after downtime a missed schedule runs once,
//! marked past due, not once per missed tick; a run that overruns the next
//! tick is followed by one past-due run, likewise.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::config::{Timer, TimerTrigger, Trigger};
use super::events::{Events, Job};
use crate::events::envelope::{self, TimerMeta};
use crate::events::{Effects, TimerStatus, now_us};

fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn at(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Runs until the events stop. `key` names the timer's status.
pub(crate) async fn run(events: Arc<Events>, function: String, key: String, timer: TimerTrigger) {
    let status = match events.store().timer(&key).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(function, error = %e, "failed to read a timer's status; it starts afresh");
            None
        }
    };
    let now = Utc::now();
    let mut last = status.and_then(|s| s.last_us);
    // What runs before the schedule resumes: one past-due run for whatever
    // was missed while Kelvin was down, or the start-up run.
    let mut pending = match status {
        Some(s) if s.next_us <= us(now) => Some((at(s.next_us), true)),
        _ if timer.run_on_startup => Some((now, false)),
        _ => None,
    };
    loop {
        let (scheduled, past_due) = match pending.take() {
            Some(p) => p,
            None => {
                let Some(next) = timer.schedule.next_after(Utc::now()) else {
                    tracing::warn!(function, "the schedule fires no more");
                    return;
                };
                let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = events.stopped() => return,
                }
                (next, false)
            }
        };
        if events.is_stopping() {
            return;
        }
        let started = Utc::now();
        let lateness = (started - scheduled).to_std().unwrap_or(Duration::ZERO);
        events
            .runtime()
            .metrics()
            .events
            .timer_lateness
            .with_label_values(&[function.as_str()])
            .observe(lateness.as_secs_f64());
        let following = timer.schedule.next_after(scheduled.max(started));
        let status = TimerStatus {
            last_us: Some(us(scheduled)),
            next_us: following.map_or(i64::MAX, us),
        };
        // A run that fails is still a run: the status moves on either way.
        let effects = Effects {
            timer: Some((key.clone(), status)),
            ..Effects::default()
        };
        let input = envelope::timer_event(
            &TimerMeta {
                schedule: timer.schedule.as_str(),
                scheduled_us: us(scheduled),
                past_due,
                last_us: last,
                next_us: following.map(us),
            },
            &function,
        );
        let job = Job {
            function: function.clone(),
            trigger: Timer::TYPE,
            input,
            params: Vec::new(),
            success: effects.clone(),
            failure: effects,
            // Not run (the server stopped first): the tick stays due, and
            // runs past due after the restart.
            unstarted: Effects::default(),
        };
        events.invoke(job).await;
        last = Some(us(scheduled));
        // Ticks passed during the run: one past-due run for them.
        if let Some(f) = following
            && us(f) < now_us()
        {
            pending = Some((f, true));
        }
    }
}
