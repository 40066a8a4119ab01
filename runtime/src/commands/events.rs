//! `kelvin queue` and `kelvin blob`: the queue and blob API of a running
//! server, from the command line (connection and key as `kelvin deploy`).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Subcommand;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::deploy::{ServerArgs, run};
use crate::bench::table;

/// Send, peek, list and requeue the messages of a running server's queues.
#[derive(clap::Args, Debug)]
pub struct QueueCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub action: QueueAction,
}

#[derive(Subcommand, Debug)]
pub enum QueueAction {
    /// Send a message (the argument, `--file`, or stdin); prints its id.
    Send {
        queue: String,
        /// The message body (`-` or nothing: stdin).
        #[arg(conflicts_with = "file")]
        body: Option<String>,
        /// Read the body from this file.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Show the messages waiting in a queue, oldest first, without taking them.
    Peek {
        queue: String,
        /// At most this many (1 to 1000).
        #[arg(short = 'n', long = "limit", default_value_t = 32)]
        limit: u32,
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every queue: depth, leased and poison messages, the oldest's age.
    List {
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move poison messages (all, or the one with ID) back to their queue.
    Requeue { queue: String, id: Option<String> },
}

impl QueueCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        match self.action {
            QueueAction::Send { queue, body, file } => {
                let body = match (body, file) {
                    (Some(text), None) if text != "-" => Bytes::from(text),
                    (_, Some(path)) => read_input(Some(&path))?,
                    _ => read_input(None)?,
                };
                let sent = run(admin.call(
                    hyper::Method::POST,
                    &format!("/admin/queues/{}/messages", segment(&queue)),
                    body,
                ))?;
                println!("{}", sent["id"].as_str().unwrap_or("?"));
            }
            QueueAction::Peek { queue, limit, json } => {
                let peeked = run(admin.get(&format!(
                    "/admin/queues/{}/messages?limit={limit}",
                    segment(&queue)
                )))?;
                if json {
                    return print_json(&peeked);
                }
                let rows: Vec<Vec<String>> = items(&peeked["messages"])
                    .map(|m| {
                        let body = m["body"].as_str().unwrap_or("");
                        let body = match m["encoding"].as_str() {
                            Some(e) => format!("({e}) {body}"),
                            None => one_line(body),
                        };
                        vec![
                            text(&m["id"]),
                            text(&m["dequeue_count"]),
                            time(&m["inserted"]),
                            if m["leased"] == true { "yes" } else { "no" }.to_owned(),
                            body,
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("no messages in {queue}");
                } else {
                    let header = ["ID", "DEQUEUED", "INSERTED", "LEASED", "BODY"];
                    print!("{}", table(&header, &rows, header.len()));
                }
            }
            QueueAction::List { json } => {
                let queues = run(admin.get("/admin/queues"))?;
                if json {
                    return print_json(&queues);
                }
                let rows: Vec<Vec<String>> = items(&queues["queues"])
                    .map(|q| {
                        let oldest = match q["depth"].as_u64() {
                            Some(d) if d > 0 => {
                                age(q["oldest_age_seconds"].as_f64().unwrap_or(0.0))
                            }
                            _ => "-".to_owned(),
                        };
                        vec![
                            text(&q["name"]),
                            text(&q["depth"]),
                            text(&q["leased"]),
                            text(&q["poison"]),
                            oldest,
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["NAME", "DEPTH", "LEASED", "POISON", "OLDEST"], &rows, 1)
                );
            }
            QueueAction::Requeue { queue, id } => {
                let mut path = format!("/admin/queues/{}/requeue", segment(&queue));
                if let Some(id) = &id {
                    path = format!("{path}/{}", segment(id));
                }
                let moved = run(admin.call(hyper::Method::POST, &path, Bytes::new()))?;
                let n = moved["requeued"].as_u64().unwrap_or(0);
                println!(
                    "{n} message{} moved from {queue}-poison back to {queue}",
                    if n == 1 { "" } else { "s" }
                );
            }
        }
        Ok(())
    }
}

/// Put, get, list and delete the blobs of a running server's containers.
#[derive(clap::Args, Debug)]
pub struct BlobCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub action: BlobAction,
}

#[derive(Subcommand, Debug)]
pub enum BlobAction {
    /// Write a blob from FILE (`-` or nothing: stdin); prints its etag.
    Put {
        /// `CONTAINER/NAME`.
        path: String,
        file: Option<PathBuf>,
    },
    /// Read a blob to stdout, or to `-o FILE`.
    Get {
        /// `CONTAINER/NAME`.
        path: String,
        /// Write the bytes to this file.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// List a container's blobs (those whose names start with PREFIX).
    Ls {
        /// `CONTAINER` or `CONTAINER/PREFIX`.
        path: String,
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a blob.
    Rm {
        /// `CONTAINER/NAME`.
        path: String,
    },
    /// Output blobs committed but not yet written: list them, or retry
    /// those given up on (a name that clashed, a write that kept failing).
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum OutboxAction {
    /// List the outbox: pending and failed entries, with the last error.
    List {
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make failed entries pending again (those named, or all).
    Retry { ids: Vec<String> },
}

impl BlobCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        match self.action {
            BlobAction::Put { path, file } => {
                let url = blob_url(&path)?;
                let bytes = match file.as_deref() {
                    Some(f) if f != Path::new("-") => read_input(Some(f))?,
                    _ => read_input(None)?,
                };
                let put = run(admin.call(hyper::Method::PUT, &url, bytes))?;
                println!(
                    "{}  etag {}",
                    put["path"].as_str().unwrap_or(&path),
                    text(&put["etag"])
                );
            }
            BlobAction::Get { path, output } => {
                let url = blob_url(&path)?;
                let bytes = run(admin.exchange(hyper::Method::GET, &url, Bytes::new()))?;
                match output {
                    Some(file) if file != Path::new("-") => {
                        std::fs::write(&file, &bytes)
                            .with_context(|| format!("failed to write `{}`", file.display()))?;
                        println!("{path}: {} bytes to {}", bytes.len(), file.display());
                    }
                    _ => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&bytes)?;
                        out.flush()?;
                    }
                }
            }
            BlobAction::Ls { path, json } => {
                let (container, prefix) = path.split_once('/').unwrap_or((&path, ""));
                if container.is_empty() {
                    bail!("{path:?}: name a container, e.g. images or images/2026/");
                }
                let mut url = format!("/admin/blobs/{}", segment(container));
                if !prefix.is_empty() {
                    url = format!("{url}?prefix={}", segment(prefix));
                }
                let listed = run(admin.get(&url))?;
                if json {
                    return print_json(&listed);
                }
                let rows: Vec<Vec<String>> = items(&listed["blobs"])
                    .map(|b| vec![text(&b["name"]), text(&b["size"]), time(&b["modified"])])
                    .collect();
                print!("{}", table(&["NAME", "SIZE", "MODIFIED"], &rows, 1));
            }
            BlobAction::Rm { path } => {
                let url = blob_url(&path)?;
                let deleted = run(admin.call(hyper::Method::DELETE, &url, Bytes::new()))?;
                println!("deleted {}", deleted["deleted"].as_str().unwrap_or(&path));
            }
            BlobAction::Outbox {
                action: OutboxAction::List { json },
            } => {
                let listed = run(admin.get("/admin/outbox"))?;
                if json {
                    return print_json(&listed);
                }
                let rows: Vec<Vec<String>> = items(&listed["outbox"])
                    .map(|e| {
                        vec![
                            text(&e["id"]),
                            text(&e["path"]),
                            text(&e["state"]),
                            text(&e["attempts"]),
                            e["error"].as_str().unwrap_or("").to_owned(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["ID", "PATH", "STATE", "ATTEMPTS", "ERROR"], &rows, 5)
                );
            }
            BlobAction::Outbox {
                action: OutboxAction::Retry { ids },
            } => {
                let body = if ids.is_empty() {
                    Bytes::new()
                } else {
                    Bytes::from(serde_json::json!({ "ids": ids }).to_string())
                };
                let retried = run(admin.call(hyper::Method::POST, "/admin/outbox/retry", body))?;
                println!("{} failed entries pending again", text(&retried["retried"]));
            }
        }
        Ok(())
    }
}

/// What a path segment keeps as is: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(super) fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// `/admin/blobs/CONTAINER/NAME` for `CONTAINER/NAME`, each segment encoded.
fn blob_url(path: &str) -> Result<String> {
    match path.split_once('/') {
        Some((container, name)) if !container.is_empty() && !name.is_empty() => {
            let name: Vec<String> = name.split('/').map(segment).collect();
            Ok(format!(
                "/admin/blobs/{}/{}",
                segment(container),
                name.join("/")
            ))
        }
        _ => bail!("{path:?}: write CONTAINER/NAME, e.g. images/cat.ppm"),
    }
}

/// A file's bytes, or stdin's.
fn read_input(file: Option<&Path>) -> Result<Bytes> {
    match file {
        Some(path) => std::fs::read(path)
            .map(Bytes::from)
            .with_context(|| format!("failed to read `{}`", path.display())),
        None => {
            let mut stdin = std::io::stdin().lock();
            if stdin.is_terminal() {
                eprintln!("reading from stdin (end with Ctrl-D)");
            }
            let mut bytes = Vec::new();
            stdin
                .read_to_end(&mut bytes)
                .context("failed to read stdin")?;
            Ok(Bytes::from(bytes))
        }
    }
}

pub(super) fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(super) fn items(list: &Value) -> impl Iterator<Item = &Value> {
    list.as_array().into_iter().flatten()
}

/// A JSON string without its quotes, anything else as JSON.
pub(super) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An RFC 3339 time to the second (the server's carries microseconds).
pub(super) fn time(v: &Value) -> String {
    let s = v.as_str().unwrap_or("");
    match humantime::parse_rfc3339(s) {
        Ok(t) => humantime::format_rfc3339_seconds(t).to_string(),
        Err(_) => s.to_owned(),
    }
}

/// A body on one line: line breaks shown as `\n`.
fn one_line(body: &str) -> String {
    body.replace('\r', "\\r").replace('\n', "\\n")
}

/// `850ms`, `3s`, `2m 5s`: an age a person reads at a glance.
fn age(seconds: f64) -> String {
    let d = Duration::from_secs_f64(seconds.max(0.0));
    let d = if d < Duration::from_secs(1) {
        Duration::from_millis(d.as_millis() as u64)
    } else {
        Duration::from_secs(d.as_secs())
    };
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths_are_encoded_segment_by_segment() {
        assert_eq!(
            blob_url("images/2026/a cat%.ppm").unwrap(),
            "/admin/blobs/images/2026/a%20cat%25.ppm"
        );
        assert!(blob_url("images").is_err());
        assert!(blob_url("images/").is_err());
        assert!(blob_url("/cat.ppm").is_err());
    }

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(0.0), "0s");
        assert_eq!(age(0.25), "250ms");
        assert_eq!(age(3.4), "3s");
        assert_eq!(age(125.9), "2m 5s");
    }
}
