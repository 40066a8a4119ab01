//! wasi:http/proxy components: the store they run in (WASI 0.2 and
//! wasi:http), the outbound-request policy, and one invocation in a fresh
//! instance from the pool, under the same limits and measurements as a
//! preview-1 function.

/// An event a component receives as a POST names its trigger (`timer`,
/// `queue`, `blob`, ...) in this header, and its function in the next.
pub const TRIGGER_HEADER: &str = "x-kelvin-trigger";
pub const FUNCTION_HEADER: &str = "x-kelvin-function";

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use wasmtime::Store;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::engine::KelvinEngine;
use crate::invoke::{self, Code, Execution, MAX_STDERR, MemoryMeter, Metered, Timings};
use crate::manifest::OutboundHost;
use crate::pipe::CappedPipe;

/// The store's data for a component.
pub struct HttpHost {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: Outbound,
    meter: MemoryMeter,
}

impl WasiView for HttpHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl Metered for HttpHost {
    fn meter(&mut self) -> &mut MemoryMeter {
        &mut self.meter
    }
}

/// The linker for components: all of WASI 0.2 (as `wasmtime serve` gives)
/// plus wasi:http.
pub(crate) fn linker(engine: &wasmtime::Engine) -> Linker<HttpHost> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("WASI links into a fresh linker");
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .expect("wasi:http links into a fresh linker");
    linker
}

/// Outbound requests: denied unless the destination is in the function's
/// `allowed_outbound_hosts`.
struct Outbound {
    function: String,
    invocation_id: String,
    allowed: Arc<[OutboundHost]>,
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let uri = request.uri();
        let allowed = self.allowed.iter().any(|h| h.allows(uri));
        if !allowed {
            tracing::warn!(
                function = self.function.as_str(),
                invocation_id = self.invocation_id.as_str(),
                uri = %uri,
                "outbound request denied (not in allowed_outbound_hosts)"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        drop(fut);
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// What the guest answered, handed to the HTTP layer as soon as it is set.
pub type Respond =
    Box<dyn FnOnce(Result<hyper::Response<HyperOutgoingBody>, ErrorCode>) + Send + Sync>;

/// Instantiates `f` once in a fresh store with its limits, calling none
/// of its exports (see [`invoke::instantiate_once`]).
pub(crate) async fn instantiate_once(
    engine: &KelvinEngine,
    f: Code<'_>,
    pre: &ProxyPre<HttpHost>,
) -> Result<(), String> {
    let host = HttpHost {
        wasi: WasiCtxBuilder::new().build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        outbound: Outbound {
            function: f.spec.name.to_string(),
            invocation_id: String::new(),
            allowed: Arc::from([]),
        },
        meter: MemoryMeter::new(f.spec.limits.memory),
    };
    let mut store = Store::new(f.engine, host);
    let armed = invoke::arm(
        engine,
        &mut store,
        &f.spec.limits,
        invoke::MIN_HOSTCALL_BYTES,
    );
    invoke::tried(
        tokio::time::timeout_at(armed.backstop(), pre.instantiate_async(&mut store)).await,
    )
}

/// Runs `f`'s `wasi:http/incoming-handler` once for `request`. `respond` gets
/// the response (its body may still be streaming); the returned execution
/// describes the whole run.
pub(crate) async fn execute(
    engine: &KelvinEngine,
    f: Code<'_>,
    pre: &ProxyPre<HttpHost>,
    invocation_id: &str,
    request: hyper::Request<Full<Bytes>>,
    files: &[crate::manifest::FileMount],
    respond: Respond,
) -> Execution {
    let spec = f.spec;
    // A component's stdout is not its response; both streams are logs.
    let stdout = CappedPipe::new(MAX_STDERR);
    let stderr = CappedPipe::new(MAX_STDERR);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(stdout.clone())
        .stderr(stderr.clone())
        .env("KELVIN_FUNCTION", spec.name.as_str())
        .env("KELVIN_INVOCATION_ID", invocation_id)
        .env("KELVIN_TRIGGER", "http")
        .envs(&spec.env);
    if let Err(why) = invoke::mount_files(&mut wasi, spec.files.iter().chain(files)) {
        return Execution::not_started(why);
    }
    let mut table = ResourceTable::new();
    table.set_max_capacity(invoke::MAX_COMPONENT_RESOURCES);
    let host = HttpHost {
        wasi: wasi.build(),
        http: WasiHttpCtx::new(),
        table,
        outbound: Outbound {
            function: spec.name.to_string(),
            invocation_id: invocation_id.to_owned(),
            allowed: spec.allowed_outbound_hosts.clone().into(),
        },
        meter: MemoryMeter::new(spec.limits.memory),
    };
    let mut store = Store::new(f.engine, host);
    let armed = invoke::arm(
        engine,
        &mut store,
        &spec.limits,
        invoke::MIN_HOSTCALL_BYTES + (64 << 10),
    );

    let mut t = Timings::default();
    let result = {
        let work = async {
            let request = request.map(|body| {
                body.map_err(
                    |never: std::convert::Infallible| -> wasmtime_wasi_http::Error {
                        match never {}
                    },
                )
            });
            let req = store
                .data_mut()
                .http()
                .new_incoming_request(Scheme::Http, request)?;
            let out = store
                .data_mut()
                .http()
                .new_response_outparam_from_callback(respond)?;
            let started = Instant::now();
            let proxy = pre.instantiate_async(&mut store).await?;
            t.instantiate = started.elapsed();
            let started = *t.run_started.insert(Instant::now());
            let handler = proxy.wasi_http_incoming_handler();
            let call = handler.call_handle(&mut store, req, out);
            let r = invoke::cpu_timed(engine.tuning().metering, call, &mut t.cpu).await;
            t.run = started.elapsed();
            r
        };
        tokio::time::timeout_at(armed.backstop(), work).await
    };
    let exec = invoke::conclude(
        store,
        &armed,
        t,
        result,
        &spec.limits,
        stdout.contents(),
        stderr.contents(),
    );
    invoke::note_dropped_logs(
        spec.name.as_str(),
        invocation_id,
        stdout.dropped() + stderr.dropped(),
    );
    exec
}

/// How much of a response reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Body bytes handed to the connection.
    pub bytes: u64,
    /// Whether the body ended as the guest ended it; `false` if the client
    /// went away, the body failed, or it was cut off at its deadline.
    pub whole: bool,
}

/// A response body that counts what it sends and says how it ended, so the
/// invocation's record can tell what the client got.
///
/// Its end (or, for a body of known length, its last bytes, after which a
/// client holds the whole response) is held back until the record is
/// durable: a response whose record was lost ends in an error instead of
/// being completed. Past `deadline` it ends with an error instead of going
/// on: a response recorded as not delivered must not reach the client whole
/// afterwards.
pub struct MeteredBody {
    inner: HyperOutgoingBody,
    sent: u64,
    /// The response's Content-Length, if it has one: hyper stops polling
    /// once that much is sent, without asking for the end.
    length: Option<u64>,
    /// A HEAD response: no body is sent, and none is owed.
    head: bool,
    deadline: Instant,
    done: Option<tokio::sync::oneshot::Sender<Delivery>>,
    /// Whether the record is durable, once it is written.
    recorded: tokio::sync::oneshot::Receiver<bool>,
    held: Held,
}

/// What the body holds back until the record is durable.
enum Held {
    /// Nothing yet: bytes go through as the guest writes them.
    Nothing,
    /// The last data frame of a body of known length.
    Last(Frame<Bytes>),
    /// The end of the body.
    End,
    /// The record is durable: what was held has gone out.
    Released,
}

impl MeteredBody {
    /// Wraps the body of `response`, which must be sent by `deadline`;
    /// `done` hears how it ended, and `recorded` says when its end may go.
    pub fn wrap(
        response: hyper::Response<HyperOutgoingBody>,
        head: bool,
        deadline: Instant,
        done: tokio::sync::oneshot::Sender<Delivery>,
        recorded: tokio::sync::oneshot::Receiver<bool>,
    ) -> hyper::Response<MeteredBody> {
        let length = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        response.map(|inner| MeteredBody {
            length: length.or(inner.size_hint().exact()),
            inner,
            sent: 0,
            head,
            deadline,
            done: Some(done),
            recorded,
            held: Held::Nothing,
        })
    }

    /// Whether everything the guest meant to send was sent.
    fn complete(&self) -> bool {
        self.head || self.inner.is_end_stream() || self.length == Some(self.sent)
    }

    fn finish(&mut self, whole: bool) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Delivery {
                bytes: self.sent,
                whole,
            });
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            match std::mem::replace(&mut this.held, Held::Nothing) {
                Held::Released => {
                    this.held = Held::Released;
                    return Pin::new(&mut this.inner)
                        .poll_frame(cx)
                        .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError)));
                }
                held @ (Held::Last(_) | Held::End) => match Pin::new(&mut this.recorded).poll(cx) {
                    Poll::Pending => {
                        this.held = held;
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(true)) => {
                        this.held = Held::Released;
                        return Poll::Ready(match held {
                            Held::Last(frame) => Some(Ok(frame)),
                            _ => None,
                        });
                    }
                    Poll::Ready(_) => {
                        return Poll::Ready(Some(Err(
                            "the invocation could not be recorded".into()
                        )));
                    }
                },
                Held::Nothing => {}
            }
            if Instant::now() >= this.deadline {
                this.finish(false);
                return Poll::Ready(Some(Err(
                    "the response was not sent within the function's timeout".into(),
                )));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    this.sent += len;
                    if len > 0 && this.length == Some(this.sent) {
                        // The last bytes: the client would hold the whole
                        // response. They go once the record is durable.
                        this.finish(true);
                        this.held = Held::Last(frame);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    this.finish(true);
                    this.held = Held::End;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never before the record is durable: hyper must ask for the end.
        matches!(self.held, Held::Released) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.head && !self.inner.is_end_stream() {
            // A HEAD response: hyper sends no body and drops it at once,
            // while the guest (answering HEAD as the GET it stands for) may
            // still be writing one. Its writes must not fail for that: the
            // body is read to its end (within the function's timeout) and
            // thrown away.
            let mut inner = std::mem::take(&mut self.inner);
            let deadline = tokio::time::Instant::from_std(self.deadline);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    use http_body_util::BodyExt;
                    let drain = async { while let Some(Ok(_)) = inner.frame().await {} };
                    let _ = tokio::time::timeout_at(deadline, drain).await;
                });
            }
        }
        // A client that went away drops the body before its end.
        let whole = self.complete();
        self.finish(whole);
    }
}
