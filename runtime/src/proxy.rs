//! wasi:http/proxy components: the store they run in (WASI 0.2 and
//! wasi:http), the outbound-request policy, and one invocation in a fresh
//! instance from the pool, under the same limits and measurements as a
//! preview-1 function.

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
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::engine::KelvinEngine;
use crate::invoke::{self, Execution, MAX_STDERR, MemoryMeter, Metered, Timings};
use crate::manifest::OutboundHost;
use crate::registry::LoadedFunction;

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

/// Runs `f`'s `wasi:http/incoming-handler` once for `request`. `respond` gets
/// the response (its body may still be streaming); the returned execution
/// describes the whole run.
pub(crate) async fn execute(
    engine: &KelvinEngine,
    f: &LoadedFunction,
    pre: &ProxyPre<HttpHost>,
    invocation_id: &str,
    request: hyper::Request<Full<Bytes>>,
    respond: Respond,
) -> Execution {
    let spec = &f.spec;
    // A component's stdout is not its response; both streams are logs.
    let stdout = MemoryOutputPipe::new(MAX_STDERR);
    let stderr = MemoryOutputPipe::new(MAX_STDERR);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdout(stdout.clone())
        .stderr(stderr.clone())
        .env("KELVIN_FUNCTION", spec.name.as_str())
        .env("KELVIN_INVOCATION_ID", invocation_id)
        .env("KELVIN_TRIGGER", "http")
        .envs(&spec.env);
    let host = HttpHost {
        wasi: wasi.build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        outbound: Outbound {
            function: spec.name.to_string(),
            invocation_id: invocation_id.to_owned(),
            allowed: spec.allowed_outbound_hosts.clone().into(),
        },
        meter: MemoryMeter::new(spec.limits.memory),
    };
    let mut store = Store::new(engine.engine(), host);
    let armed = invoke::arm(engine, &mut store, &spec.limits);

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
    invoke::conclude(
        store,
        &armed,
        t,
        result,
        &spec.limits,
        stdout.contents(),
        stderr.contents(),
    )
}

/// A response body that counts what it sends and says when it is done, so
/// the invocation's record can carry the bytes actually sent.
pub struct MeteredBody {
    inner: HyperOutgoingBody,
    sent: u64,
    done: Option<tokio::sync::oneshot::Sender<u64>>,
}

impl MeteredBody {
    pub fn new(inner: HyperOutgoingBody, done: tokio::sync::oneshot::Sender<u64>) -> MeteredBody {
        MeteredBody {
            inner,
            sent: 0,
            done: Some(done),
        }
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(self.sent);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // A client that went away ends the body too.
        self.finish();
    }
}
