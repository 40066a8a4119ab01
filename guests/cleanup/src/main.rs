//! `cleanup`: a timer-triggered housekeeping demo that logs each tick.
//!
//! The timer event is `{"Data": {"ScheduledTime", "IsPastDue", "Schedule",
//! "Last", "Next"}, "Metadata": {...}}` on stdin. The function has no output
//! bindings, so it prints nothing on stdout: the exit code is the result.

use std::io::Read;

use serde_json::Value;

fn main() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        fail(format_args!("reading the event: {e}"));
    }
    let event: Value = match serde_json::from_slice(&input) {
        Ok(event) => event,
        Err(e) => fail(format_args!("the event is not JSON: {e}")),
    };
    let data = &event["Data"];
    // A tick without its schedule time is not a timer event: failing says so
    // in the invocation record instead of logging a meaningless line.
    let Some(scheduled) = data["ScheduledTime"].as_str() else {
        fail("the event has no Data.ScheduledTime string; is this a timer trigger?");
    };
    let past_due = data["IsPastDue"].as_bool().unwrap_or(false);
    eprintln!("cleanup: tick at {scheduled} (past due: {past_due})");
}

/// Logs why and ends the invocation as failed.
fn fail(reason: impl std::fmt::Display) -> ! {
    eprintln!("cleanup: {reason}");
    std::process::exit(1)
}
