//! The HTTP trigger: a hyper server that routes requests to functions and
//! speaks CGI (RFC 3875, as WAGI does) to preview-1 guests.
//!
//! Clients see public messages only; details go to the log under the
//! invocation id, which every response carries in `x-kelvin-invocation-id`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::InputSource;
pub use super::config::{Http, HttpTrigger};
use super::{Trigger, admin, cgi};
use crate::billing::{self, GroupBy};
use crate::deploy::{DeployError, Deployer};
use crate::invoke::Event;
use crate::keys::{AuthLevel, KeyError, KeyStore};
use crate::ledger::{Ledger, LedgerReader};
use crate::metering::Outcome;
use crate::router::{RouteMatch, Router};
use crate::runtime::{Admit, HttpFailure, Runtime, Ticket};
use crate::table::{PRODUCTION, Split, Table, Unit};

pub use super::headers::{
    AZURE_KEY_HEADER, INVOCATION_ID_HEADER, KEY_HEADER, SLOT_HEADER, VERSION_HEADER,
};
/// The cookie that keeps a client on the slot a traffic split chose.
const SLOT_COOKIE: &str = "kelvin-slot";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Responses are either buffered (CGI, errors) or streamed (components).
type Body = UnsyncBoxBody<Bytes, BoxError>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What a route leads to.
struct Target {
    unit: Arc<Unit>,
    auth: AuthLevel,
}

/// Every slot's routes, built from one generation of the runtime's table.
struct Routes {
    generation: u64,
    slots: std::collections::HashMap<String, Router<Target>>,
    split: Option<Split>,
}

impl Routes {
    fn of(table: &Table) -> Routes {
        let slots = table
            .slots
            .iter()
            .map(|(slot, units)| {
                let routes = units
                    .values()
                    .flat_map(|unit| {
                        unit.spec
                            .triggers
                            .iter()
                            .filter_map(|t| t.http())
                            .map(move |h| {
                                let target = Target {
                                    unit: unit.clone(),
                                    auth: h.auth,
                                };
                                (h.route.clone(), h.methods, target)
                            })
                    })
                    .collect();
                (slot.clone(), Router::new(routes))
            })
            .collect();
        Routes {
            generation: table.generation,
            slots,
            split: table.split.clone(),
        }
    }
}

/// Why the HTTP trigger could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("failed to open the deployments: {0}")]
    Deployments(#[from] DeployError),
}

/// The HTTP trigger of one runtime: its routes and keys, ready to serve.
pub struct HttpServer {
    runtime: Arc<Runtime>,
    routes: std::sync::RwLock<Arc<Routes>>,
    deployer: Arc<Deployer>,
    keys: KeyStore,
    /// Request bodies in memory, all connections together, in KiB.
    body_budget: Arc<Semaphore>,
    /// Functions only a key can call: hidden from anonymous `/metrics`.
    protected: std::collections::HashSet<String>,
    /// The event triggers and their stores: the queue and blob API, and
    /// HTTP functions' outputs (none in a server without them).
    events: Option<Arc<super::events::Events>>,
    durable: Option<Arc<super::durable::DurableFunctions>>,
}

impl HttpServer {
    /// Opens the access keys (creating them on first start) and the
    /// deployments (putting the stored slots into service), and builds the
    /// routing table, before any socket is bound.
    pub fn new(runtime: Arc<Runtime>) -> Result<HttpServer, ServerError> {
        let deployer = Arc::new(Deployer::open(runtime.clone())?);
        let routes = Routes::of(&runtime.table());
        let names: Vec<&str> = runtime
            .manifest()
            .functions
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        let keys = KeyStore::open(&runtime.manifest().server.state_dir, &names)?;
        let protected = runtime
            .manifest()
            .functions
            .iter()
            .filter(|f| {
                !f.triggers
                    .iter()
                    .filter_map(|t| t.http())
                    .any(|h| h.auth == AuthLevel::Anonymous)
            })
            .map(|f| f.name.to_string())
            .collect();
        let budget_kib = runtime.manifest().server.body_budget.div_ceil(1024);
        let body_budget = Arc::new(Semaphore::new(
            usize::try_from(budget_kib)
                .unwrap_or(Semaphore::MAX_PERMITS)
                .min(Semaphore::MAX_PERMITS),
        ));
        // Start-up read, checked and recorded every function through
        // short-lived buffers: give the freed memory back before serving.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(HttpServer {
            runtime,
            routes: std::sync::RwLock::new(Arc::new(routes)),
            deployer,
            keys,
            body_budget,
            protected,
            events: None,
            durable: None,
        })
    }

    /// Serves the queue and blob API and HTTP functions' outputs with
    /// `events` (whose triggers the caller starts), and stops its triggers
    /// at shutdown.
    pub fn with_events(mut self, events: Arc<super::events::Events>) -> HttpServer {
        self.events = Some(events);
        self
    }

    pub fn with_durable(mut self, durable: Arc<super::durable::DurableFunctions>) -> HttpServer {
        self.durable = Some(durable);
        self
    }

    /// The function a request for `method` and `path` would reach, and the
    /// key it needs (for `kelvin bench http`).
    pub fn resolve(&self, method: &str, path: &str) -> Option<(String, AuthLevel)> {
        match self.routes().slots.get(PRODUCTION)?.lookup(method, path) {
            RouteMatch::Found { target, .. } => Some((target.unit.function.clone(), target.auth)),
            _ => None,
        }
    }

    /// The app's deployments (for the manifest watcher of `kelvin up`).
    pub fn deployer(&self) -> Arc<Deployer> {
        self.deployer.clone()
    }

    /// The routes of the runtime's current table (rebuilt when it changed).
    fn routes(&self) -> Arc<Routes> {
        let table = self.runtime.table();
        {
            let routes = self.routes.read().expect("routes lock");
            if routes.generation == table.generation {
                return routes.clone();
            }
        }
        let built = Arc::new(Routes::of(&table));
        let mut routes = self.routes.write().expect("routes lock");
        if routes.generation < built.generation {
            *routes = built.clone();
        }
        built
    }

    /// Serves on `listener` until `shutdown` completes, then stops
    /// accepting, lets in-flight requests finish (up to the drain timeout)
    /// and flushes metering.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_slots(listener, Vec::new(), shutdown).await
    }

    /// As [`HttpServer::serve`], with more listeners each serving one slot
    /// (`[server] slot_listen`): a request there goes to that slot,
    /// whatever it names.
    pub async fn serve_slots(
        self,
        listener: TcpListener,
        slot_listeners: Vec<(TcpListener, String)>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let server = Arc::new(self);
        // The slots' listeners accept in tasks of their own and hand their
        // connections to the one loop below, which admits, serves and
        // drains them all alike.
        let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(64);
        let mut acceptors = Vec::new();
        for (slot_listener, slot) in slot_listeners {
            let local = slot_listener.local_addr()?;
            let tx = accepted_tx.clone();
            acceptors.push(tokio::spawn(async move {
                loop {
                    let accepted = slot_listener.accept().await;
                    if tx
                        .send((accepted, local, Some(slot.clone())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }));
        }
        drop(accepted_tx);
        let main_local = listener.local_addr()?;
        let runtime = server.runtime.clone();
        let settings = runtime.manifest().server.clone();
        // Past the cap, connections wait in the kernel's backlog instead of
        // costing a task and buffers each.
        let connections = Arc::new(tokio::sync::Semaphore::new(
            settings.max_connections.get() as usize
        ));
        let sweeper = tokio::spawn(sweep_idle(runtime.clone()));
        let protocols = protocols(&settings);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // Every connection's task: aborted if the drain outlasts its
        // timeout, so none answers once the records are closed.
        let mut tasks = tokio::task::JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                () = &mut shutdown => break,
            };
            let next = async {
                tokio::select! {
                    accepted = listener.accept() => (accepted, main_local, None),
                    Some(slot_accepted) = accepted_rx.recv() => slot_accepted,
                }
            };
            tokio::select! {
                (accepted, local, slot) = next => {
                    let (stream, peer) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Responses are small and written at once; Nagle would only add latency.
                    let _ = stream.set_nodelay(true);
                    let server = server.clone();
                    let slot: Option<Arc<str>> = slot.map(Into::into);
                    let service = hyper::service::service_fn(move |req| {
                        let (server, slot) = (server.clone(), slot.clone());
                        async move { Ok::<_, std::convert::Infallible>(server.handle(req, peer, local, slot.as_deref()).await) }
                    });
                    let conn = protocols.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tasks.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        drop(permit);
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        for acceptor in acceptors {
            acceptor.abort();
        }
        if let Some(events) = &server.events {
            // No new events start; those under way are drained below.
            events.stop();
        }
        if let Some(durable) = &server.durable {
            durable.stop();
        }
        tracing::info!("shutting down: draining in-flight requests");
        if tokio::time::timeout(settings.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("drain timeout passed; closing the remaining connections unanswered");
            tasks.abort_all();
        }
        while tasks.join_next().await.is_some() {}
        // Invocations whose clients were cut off run to their records
        // (bounded by their timeouts) before the records close.
        if !runtime
            .drained(runtime.longest_timeout() + Duration::from_secs(5))
            .await
        {
            tracing::warn!("invocations still running at exit; their records are refused");
        }
        sweeper.abort();
        runtime.flush();
        Ok(())
    }
}

/// HTTP/1.1, and HTTP/2 with prior knowledge (h2c) on the same port, told
/// apart by the connection preface, with the same limits: the request head
/// (`max_header_size`, 431 beyond) and the time to send it.
fn protocols(settings: &crate::manifest::ServerConfig) -> auto::Builder<TokioExecutor> {
    let max_head = usize::try_from(settings.max_header_size).unwrap_or(usize::MAX);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // A head larger than the buffer is answered with 431.
        .max_buf_size(max_head);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
        // Streams per connection: a client cannot get around
        // max_connections by multiplexing without bound.
        .max_concurrent_streams(MAX_STREAMS)
        // A silent peer is found and its connection closed.
        .keep_alive_interval(Some(settings.header_read_timeout))
        .keep_alive_timeout(settings.header_read_timeout);
    builder
}

/// Concurrent requests on one HTTP/2 connection.
const MAX_STREAMS: u32 = 100;

async fn sweep_idle(runtime: Arc<Runtime>) {
    loop {
        tokio::time::sleep(runtime.registry().next_idle_check()).await;
        runtime.registry().evict_idle_at(std::time::Instant::now());
    }
}

impl HttpServer {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        local: SocketAddr,
        listener_slot: Option<&str>,
    ) -> Response<Body> {
        let path = req.uri().path().to_owned();
        match (req.method().as_str(), path.as_str()) {
            ("GET" | "HEAD", "/metrics") => return self.metrics(&req),
            ("GET", "/admin/bill") => return self.bill(&req).await,
            ("GET" | "HEAD", "/healthz" | "/readyz") => {
                return plain(StatusCode::OK, "text/plain", "ok\n".into());
            }
            _ if super::events_api::owns(&path) => return self.events_api(req).await,
            _ if super::durable_api::owns(&path) => return self.durable_api(req).await,
            _ if admin::owns(&path) => return self.admin(req, local).await,
            _ => {}
        }
        let routes = self.routes();
        let chosen = match listener_slot {
            Some(slot) if routes.slots.contains_key(slot) => Ok((slot.to_owned(), None)),
            Some(slot) => Err(slot.to_owned()),
            None => choose_slot(&req, &routes),
        };
        let (slot, cookie) = match chosen {
            Ok(chosen) => chosen,
            Err(unknown) => {
                return error(
                    StatusCode::NOT_FOUND,
                    None,
                    format!("no slot named {unknown:?}"),
                );
            }
        };
        let router = &routes.slots[&slot];
        let (target, route, params, head_as_get) = match router.lookup(req.method().as_str(), &path)
        {
            RouteMatch::Found {
                target,
                route,
                params,
                head_as_get,
            } => (target, route.pattern().to_owned(), params, head_as_get),
            RouteMatch::NotFound => {
                return error(
                    StatusCode::NOT_FOUND,
                    None,
                    format!("no route for {} {path}", req.method()),
                );
            }
            RouteMatch::MethodNotAllowed(allowed) => {
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    None,
                    format!("{} is not allowed on {path}", req.method()),
                );
                if let Ok(v) = HeaderValue::from_str(&allowed.allow_header()) {
                    r.headers_mut().insert(hyper::header::ALLOW, v);
                }
                return r;
            }
        };

        let mut r = self
            .invoke(req, target, &slot, route, params, head_as_get, peer, local)
            .await;
        if let Ok(v) = HeaderValue::from_str(target.unit.version.as_str()) {
            r.headers_mut().insert(VERSION_HEADER, v);
        }
        if let Some(cookie) = cookie
            && let Ok(v) = HeaderValue::from_str(&cookie)
        {
            r.headers_mut().append(hyper::header::SET_COOKIE, v);
        }
        r
    }

    /// Runs the function a request was routed to and answers with its
    /// response (or why there is none).
    #[allow(clippy::too_many_arguments)]
    async fn invoke(
        &self,
        req: Request<Incoming>,
        target: &Target,
        slot: &str,
        route: String,
        params: Vec<(String, String)>,
        head_as_get: bool,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Response<Body> {
        let head = req.method() == hyper::Method::HEAD;
        let function = target.unit.function.as_str();
        // Before anything else: an unauthorised request costs nothing, is not
        // metered and never reaches the guest.
        let key = presented_key(&req);
        if !self
            .keys
            .authorize(target.auth, function, key.value.as_deref())
        {
            return error(
                StatusCode::UNAUTHORIZED,
                None,
                "missing or invalid access key".into(),
            );
        }

        let max_body = self.runtime.manifest().server.max_body;
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body) {
            return error(StatusCode::PAYLOAD_TOO_LARGE, None, too_large(max_body));
        }

        // Admission before the body is read: a request that cannot run (its
        // function's queue is full) is answered at once, and one that waits
        // holds no body in memory.
        let ticket = match self
            .runtime
            .admit_unit(&target.unit, slot, Http::TYPE)
            .await
        {
            Ok(Admit::Admitted(ticket)) => ticket,
            Ok(Admit::Rejected(rejected)) => {
                return unrecorded_or(&rejected.record.invocation_id, rejected.durable, || {
                    failure(function, &rejected.record.invocation_id, Outcome::Rejected)
                });
            }
            Err(e) => return unknown_function(e),
        };
        let (mut parts, body) = req.into_parts();
        // Dropped on the way out, the ticket frees its slot: a request
        // whose body never arrived never ran and is not recorded.
        let (body, budget) = match self.read_body(body, declared, max_body).await {
            Ok(read) => read,
            Err(refusal) => return refusal,
        };
        if head_as_get {
            // A route for GET answers HEAD as GET; hyper sends no body.
            parts.method = hyper::Method::GET;
        }
        // The key is the host's business, not the guest's: its header goes,
        // and `code=` from the query if it holds the key that opened a
        // protected route (otherwise it is the guest's, like an OAuth
        // callback's `?code=...&state=...`).
        parts.headers.remove(KEY_HEADER);
        parts.headers.remove(AZURE_KEY_HEADER);
        if target.auth != AuthLevel::Anonymous
            && key.value.is_some()
            && query_code(&parts.uri) == key.value.as_deref()
        {
            strip_code(&mut parts.uri);
        }

        let files = self.blob_inputs(&target.unit, &params).await;
        if self.runtime.is_component(&target.unit) {
            return self
                .component_response(function, ticket, parts, body, files, budget, local, head)
                .await;
        }

        let meta = cgi::Meta {
            peer,
            local,
            route: &route,
            params: &params,
            query: parts.uri.query().unwrap_or(""),
        };
        let mut env = cgi::env(&parts, body.len(), &meta);
        for input in &target.unit.spec.inputs {
            if let InputSource::Instance(instance) = &input.source {
                env.push((
                    input.variable(),
                    self.instance_input(instance, &params).await,
                ));
            }
        }
        let event = Event {
            trigger: Http::TYPE,
            input: body,
            env,
            files,
        };
        let max_head =
            usize::try_from(self.runtime.manifest().server.max_header_size).unwrap_or(usize::MAX);
        if !target.unit.spec.outputs.is_empty()
            && let Some(events) = &self.events
        {
            return self
                .cgi_with_outputs(events, function, ticket, event, params, budget, max_head)
                .await;
        }
        let accept = move |stdout| cgi::response(stdout, max_head, full).map_err(|e| e.to_string());
        // The invocation runs in its own task: a client that goes away
        // leaves it to finish and be recorded.
        let invocation = self.runtime.start(ticket, event, accept, budget).await;
        let id = invocation.record.invocation_id.as_str();
        if !invocation.durable {
            return not_recorded(id);
        }
        if let Some(why) = &invocation.refused {
            tracing::warn!(
                function,
                invocation_id = id,
                why,
                "function returned a malformed CGI response"
            );
            return malformed(function, id);
        }
        match invocation.output {
            Some(mut r) => {
                set_id(&mut r, id);
                r
            }
            None => failure(function, id, invocation.record.outcome),
        }
    }

    /// Runs a CGI function with output bindings: a 2xx answer's body is
    /// the envelope, whose outputs commit with the record and whose
    /// `ReturnValue` the client gets; any other answer passes as it is and
    /// publishes nothing.
    #[allow(clippy::too_many_arguments)]
    async fn cgi_with_outputs(
        &self,
        events: &Arc<super::events::Events>,
        function: &str,
        ticket: Ticket,
        event: Event,
        params: Vec<(String, String)>,
        budget: Option<OwnedSemaphorePermit>,
        max_head: usize,
    ) -> Response<Body> {
        use crate::events::envelope;
        let outputs = target_outputs(&ticket);
        let limits = events.limits();
        let mut values = params;
        values.push(("invocation_id".into(), ticket.invocation_id().to_owned()));
        let accept = move |stdout: Bytes| {
            let response = cgi::response(stdout, max_head, |b| b).map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Ok((response.map(full), Vec::new()));
            }
            let (mut parts, body) = response.into_parts();
            let answer = envelope::parse(&body)?;
            let value = |name: &str| super::config::param(&values, name);
            let publish = envelope::publish(&outputs, &answer, &value, &limits)?;
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            Ok((
                Response::from_parts(parts, full(envelope::return_body(&answer))),
                publish,
            ))
        };
        let settled = Arc::new(std::sync::Mutex::new(None));
        let flag = settled.clone();
        let events_for_settle = events.clone();
        let settle =
            move |record: &crate::metering::InvocationRecord,
                  output: Option<&(Response<Body>, Vec<crate::events::Publish>)>| {
                let publish = output.map(|(_, p)| p.clone()).unwrap_or_default();
                let (durable, published) = events_for_settle.settle_http(record, publish);
                *flag.lock().expect("flag lock") = Some(published);
                crate::metering::Settled::with_record(durable)
            };
        let invocation = self
            .runtime
            .start_settled(ticket, event, accept, budget, settle)
            .await;
        let id = invocation.record.invocation_id.as_str();
        if !invocation.durable {
            return not_recorded(id);
        }
        if let Some(why) = &invocation.refused {
            tracing::warn!(
                function,
                invocation_id = id,
                why,
                "function returned a malformed answer"
            );
            return malformed(function, id);
        }
        match invocation.output {
            Some((mut r, publish)) => {
                let was_published = settled
                    .lock()
                    .expect("flag lock")
                    .take()
                    .is_some_and(|p| p.load(std::sync::atomic::Ordering::SeqCst));
                if was_published {
                    events.published(&publish);
                }
                set_id(&mut r, id);
                r
            }
            None => failure(function, id, invocation.record.outcome),
        }
    }

    /// The preamble of Kelvin's own APIs: the key must open `level`
    /// (`denied` says what it takes otherwise), and the body is read whole
    /// within `limit` (413 beyond) and the request body budget, whose permit
    /// comes with it (held while the request is handled).
    async fn api_request(
        &self,
        req: Request<Incoming>,
        level: AuthLevel,
        denied: &str,
        limit: u64,
    ) -> Result<
        (
            hyper::http::request::Parts,
            Bytes,
            Option<OwnedSemaphorePermit>,
        ),
        Response<Body>,
    > {
        if !self
            .keys
            .authorize(level, "", presented_key(&req).value.as_deref())
        {
            return Err(error(StatusCode::UNAUTHORIZED, None, denied.into()));
        }
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, None, too_large(limit)));
        }
        let (parts, body) = req.into_parts();
        let (body, budget) = self.read_body(body, declared, limit).await?;
        Ok((parts, body, budget))
    }

    /// The queue and blob API (a host or master key).
    async fn events_api(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(events) = &self.events else {
            return error(
                StatusCode::NOT_FOUND,
                None,
                "this server runs no event triggers".into(),
            );
        };
        // A host key opens every function: it may produce events too.
        let limit = super::events_api::body_limit(events, req.method(), req.uri().path());
        let (parts, body, _budget) = match self
            .api_request(
                req,
                AuthLevel::Function,
                "missing or invalid access key (the queue and blob API takes a host or master key)",
                limit,
            )
            .await
        {
            Ok(read) => read,
            Err(refusal) => return refusal,
        };
        let reply = super::events_api::handle(
            events,
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or(""),
            body,
        )
        .await;
        api_response(reply, None, "GET, PUT, POST, DELETE")
    }

    /// An input binding's value: the status of the instance its route
    /// parameters name, as the management API shows it, or `null`.
    /// The mount of `unit`'s blob inputs for a request with `params`.
    async fn blob_inputs(
        &self,
        unit: &crate::table::Unit,
        params: &[(String, String)],
    ) -> Vec<crate::manifest::FileMount> {
        let Some(events) = &self.events else {
            return Vec::new();
        };
        let value = |name: &str| super::config::param(params, name);
        super::inputs::blob_inputs(
            &**events.blobs(),
            &self.runtime.manifest().server.state_dir,
            &unit.function,
            &unit.spec.inputs,
            value,
        )
        .await
        .into_iter()
        .collect()
    }

    async fn instance_input(
        &self,
        instance: &super::config::BlobPattern,
        params: &[(String, String)],
    ) -> String {
        let value = |name: &str| super::config::param(params, name);
        let id = instance
            .fill(value)
            .ok()
            .and_then(|path| path.strip_prefix("x/").map(str::to_owned));
        let (Some(durable), Some(id)) = (&self.durable, id) else {
            return "null".into();
        };
        match durable.status(&id).await {
            Ok(Some(i)) => super::durable_api::status_json(&i, true, None).to_string(),
            Ok(None) => "null".into(),
            Err(e) => {
                tracing::error!(error = %e, "failed to read an instance for an input binding");
                "null".into()
            }
        }
    }

    /// The durable functions' management API (a host or master key).
    async fn durable_api(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(durable) = &self.durable else {
            return error(
                StatusCode::NOT_FOUND,
                None,
                "this server runs no durable functions".into(),
            );
        };
        let limit = self.runtime.manifest().server.max_message;
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
            })
            .map(str::to_owned);
        let (parts, body, _budget) = match self
            .api_request(
                req,
                AuthLevel::Function,
                "missing or invalid access key (the durable management API takes a host or master key)",
                limit,
            )
            .await
        {
            Ok(read) => read,
            Err(refusal) => return refusal,
        };
        let base = format!(
            "http://{}",
            host.unwrap_or_else(|| self.runtime.manifest().server.listen.to_string())
        );
        let (reply, location) = super::durable_api::handle(
            durable,
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or(""),
            body,
            &base,
        )
        .await;
        api_response(reply, location, "GET, POST, DELETE")
    }

    /// Reads a request body whole: within `request_body_timeout` (408
    /// beyond), `max_body` (413) and the bytes all bodies in memory may
    /// hold together, `body_budget` (503 when it stays full). The permit
    /// returned holds the body's share of the budget.
    async fn read_body(
        &self,
        mut body: Incoming,
        declared: Option<u64>,
        max_body: u64,
    ) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Response<Body>> {
        let settings = &self.runtime.manifest().server;
        let deadline = tokio::time::Instant::now() + settings.request_body_timeout;
        let kib = |bytes: u64| u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        let busy = || {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "too many request bodies in memory; retry later".into(),
            );
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        };
        let reserve = |bytes: u64| {
            let budget = self.body_budget.clone();
            async move {
                tokio::time::timeout_at(deadline, budget.acquire_many_owned(kib(bytes)))
                    .await
                    .ok()
                    .map(|p| p.expect("never closed"))
            }
        };
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut reserved = 0;
        if let Some(len) = declared.filter(|&len| len > 0) {
            held = Some(reserve(len).await.ok_or_else(busy)?);
            reserved = u64::from(kib(len)) * 1024;
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(error(
                        StatusCode::REQUEST_TIMEOUT,
                        None,
                        format!(
                            "the request body took longer than {} to arrive",
                            humantime::format_duration(settings.request_body_timeout)
                        ),
                    ));
                }
                Ok(None) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(_))) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        None,
                        "failed to read the request body".into(),
                    ));
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let size = (buf.len() + data.len()) as u64;
            if size > max_body {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                    too_large(max_body),
                ));
            }
            if size > reserved {
                // A body of no declared length reserves as it comes.
                let more = reserve(size - reserved).await.ok_or_else(busy)?;
                reserved += u64::from(more.num_permits() as u32) * 1024;
                match &mut held {
                    Some(permit) => permit.merge(more),
                    None => held = Some(more),
                }
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), held))
    }

    /// Hands the request to a wasi:http component and streams its answer.
    #[allow(clippy::too_many_arguments)]
    async fn component_response(
        &self,
        function: &str,
        ticket: Ticket,
        mut parts: hyper::http::request::Parts,
        body: Bytes,
        files: Vec<crate::manifest::FileMount>,
        budget: Option<OwnedSemaphorePermit>,
        local: SocketAddr,
        head: bool,
    ) -> Response<Body> {
        // wasi:http needs an authority; an HTTP/1.0 request may come without.
        if !parts.headers.contains_key(hyper::header::HOST)
            && let Ok(v) = HeaderValue::from_str(&local.to_string())
        {
            parts.headers.insert(hyper::header::HOST, v);
        }
        let request = Request::from_parts(parts, Full::new(body));
        let invocation = self
            .runtime
            .start_http(ticket, request, files, head, budget)
            .await;
        let id = invocation.invocation_id.as_str();
        match invocation.response {
            Ok(response) => {
                let mut r = response.map(BodyExt::boxed_unsync);
                set_id(&mut r, id);
                r
            }
            Err(HttpFailure::GuestError(code)) => {
                tracing::warn!(
                    function,
                    invocation_id = id,
                    code,
                    "function answered with an error code"
                );
                failure(function, id, Outcome::Error)
            }
            Err(HttpFailure::Malformed(why)) => {
                tracing::warn!(
                    function,
                    invocation_id = id,
                    why,
                    "function returned a malformed response"
                );
                malformed(function, id)
            }
            Err(HttpFailure::Ended(outcome)) => failure(function, id, outcome),
            Err(HttpFailure::NotRecorded) => not_recorded(id),
        }
    }

    /// `GET /metrics`: for whom `server.metrics_auth` says. Open to anyone
    /// by default, but a caller without a host or master key sees nothing
    /// of functions that only keys can call (their names and usage).
    fn metrics(&self, req: &Request<Incoming>) -> Response<Body> {
        let key = presented_key(req);
        let level = self.runtime.manifest().server.metrics_auth;
        let keyed = self
            .keys
            .authorize(AuthLevel::Function, "", key.value.as_deref());
        let hidden = match level {
            AuthLevel::Anonymous if keyed => Default::default(),
            AuthLevel::Anonymous => self.protected.clone(),
            _ if self.keys.authorize(level, "", key.value.as_deref()) => Default::default(),
            _ => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    None,
                    "missing or invalid access key".into(),
                );
            }
        };
        plain(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            self.runtime.metrics().render_without(&hidden),
        )
    }
}

/// The slot a request goes to: the one it names (header, then query
/// parameter), else production or, with a traffic split, the slot chosen by
/// affinity (a header's hash, or the cookie; a new client is placed at
/// random and told with the cookie to set). `Err` names an unknown slot.
fn choose_slot<B>(req: &Request<B>, routes: &Routes) -> Result<(String, Option<String>), String> {
    let named = req
        .headers()
        .get(SLOT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query_param(req.uri(), "kelvin-slot").map(str::to_owned));
    if let Some(slot) = named {
        return if routes.slots.contains_key(&slot) {
            Ok((slot, None))
        } else {
            Err(slot)
        };
    }
    let Some(split) = &routes.split else {
        return Ok((PRODUCTION.to_owned(), None));
    };
    let pick = |bucket: u64| {
        if bucket % 100 < u64::from(split.percent) {
            split.slot.clone()
        } else {
            PRODUCTION.to_owned()
        }
    };
    if let Some(name) = &split.affinity_header
        && let Some(value) = req.headers().get(name.as_str())
    {
        let hash = blake3::hash(value.as_bytes());
        let bucket = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        return Ok((pick(bucket), None));
    }
    let cookie = req
        .headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SLOT_COOKIE)?.strip_prefix('='));
    if let Some(slot) = cookie
        && (slot == PRODUCTION || slot == split.slot)
    {
        return Ok((slot.to_owned(), None));
    }
    let slot = pick(getrandom::u64().unwrap_or(0));
    let set = format!("{SLOT_COOKIE}={slot}; Path=/; HttpOnly; SameSite=Lax");
    Ok((slot, Some(set)))
}

/// `answer()`, unless the invocation's record could not be made durable:
/// then 503, and nothing the ledger does not know.
fn unrecorded_or(
    id: &str,
    durable: bool,
    answer: impl FnOnce() -> Response<Body>,
) -> Response<Body> {
    if durable { answer() } else { not_recorded(id) }
}

/// The answer for an invocation whose record could not be made durable
/// (the ledger locked or failing past its retries, or closed): its result
/// is withheld, and the client may retry.
fn not_recorded(id: &str) -> Response<Body> {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        Some(id),
        "the invocation could not be recorded; retry later".into(),
    );
    r.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A route that names no function: a bug in Kelvin, not the client's fault.
fn unknown_function(e: crate::runtime::UnknownFunction) -> Response<Body> {
    tracing::error!(error = %e, "route points at an unknown function");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        None,
        "internal error".into(),
    )
}

/// The public answer for a response the host will not pass on.
fn malformed(function: &str, id: &str) -> Response<Body> {
    error(
        StatusCode::BAD_GATEWAY,
        Some(id),
        format!("function `{function}` returned a malformed response"),
    )
}

/// The public answer for an invocation that produced no response.
fn failure(function: &str, id: &str, outcome: Outcome) -> Response<Body> {
    match outcome {
        Outcome::Timeout => error(
            StatusCode::GATEWAY_TIMEOUT,
            Some(id),
            format!("function `{function}` timed out"),
        ),
        Outcome::Rejected => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(id),
                format!("function `{function}` is at capacity; retry later"),
            );
            r.headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Outcome::Ok | Outcome::Error | Outcome::Trap | Outcome::Abandoned => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(id),
            format!("function `{function}` failed"),
        ),
    }
}

impl HttpServer {
    /// The deployment admin API, for the master key only.
    async fn admin(&self, req: Request<Incoming>, local: SocketAddr) -> Response<Body> {
        let key = presented_key(&req);
        let settings = &self.runtime.manifest().server;
        let limit = if admin::is_upload(req.method(), req.uri().path()) {
            settings.max_upload
        } else {
            admin::MAX_JSON
        };
        let (parts, body, _budget) = match self
            .api_request(
                req,
                AuthLevel::Admin,
                "missing or invalid access key",
                limit,
            )
            .await
        {
            Ok(read) => read,
            Err(refusal) => return refusal,
        };
        let reply = admin::handle(
            &self.deployer,
            &parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or(""),
            body,
            "master key",
            admin::WarmUpTo {
                local,
                key: key.value.as_deref().unwrap_or_default(),
                path: settings.swap_warmup_path.as_deref(),
                statuses: &settings.swap_warmup_statuses,
            },
        )
        .await;
        let mut r = plain(
            reply.status,
            "application/json",
            serde_json::to_string_pretty(&reply.body).expect("JSON values serialise") + "\n",
        );
        if reply.status == StatusCode::METHOD_NOT_ALLOWED {
            r.headers_mut().insert(
                hyper::header::ALLOW,
                HeaderValue::from_static("GET, PUT, POST, DELETE"),
            );
        }
        r
    }

    /// `GET /admin/bill`: the `kelvin bill --format json` report, for the
    /// master key only. Query: `since`, `until`, `by`, `policy`.
    async fn bill(&self, req: &Request<Incoming>) -> Response<Body> {
        if !self
            .keys
            .authorize(AuthLevel::Admin, "", presented_key(req).value.as_deref())
        {
            return error(
                StatusCode::UNAUTHORIZED,
                None,
                "missing or invalid access key".into(),
            );
        }
        let query: Vec<(String, String)> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
        let manifest = self.runtime.manifest();
        let request = (|| {
            let (since, until) = billing::parse_range(get("since"), get("until"))?;
            let policy = billing::policy_or(get("policy"), &manifest.billing)?;
            let by = match get("by") {
                None => GroupBy::Function,
                Some(b) => <GroupBy as clap::ValueEnum>::from_str(b, true)
                    .map_err(|_| billing::QueryError::GroupBy(b.to_owned()))?,
            };
            Ok::<_, billing::QueryError>((since, until, policy, by))
        })();
        let (since, until, policy, by) = match request {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, None, e.to_string()),
        };
        let path = Ledger::path_in(&manifest.server.state_dir);
        // SQLite reads block: off the async threads.
        let report = tokio::task::spawn_blocking(move || {
            let mut ledger = LedgerReader::open(&path)?;
            let usage = ledger.usage(since, until)?;
            Ok::<_, crate::ledger::LedgerError>(billing::report(&policy, &usage, by))
        })
        .await;
        match report {
            Ok(Ok(Ok(report))) => plain(
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&report).expect("reports serialise") + "\n",
            ),
            Ok(Ok(Err(e))) => error(StatusCode::BAD_REQUEST, None, e.to_string()),
            Ok(Err(crate::ledger::LedgerError::Missing(_))) => error(
                StatusCode::NOT_FOUND,
                None,
                "no ledger yet: nothing has been invoked".into(),
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "failed to read the ledger for /admin/bill");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    "failed to read the ledger".into(),
                )
            }
            Err(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "internal error".into(),
            ),
        }
    }
}

/// The key a request presents.
struct PresentedKey {
    value: Option<String>,
}

/// The key from the `x-kelvin-key` header, else the `code` query parameter.
/// The response to a request to one of Kelvin's APIs: the reply, its
/// `Location` if it has one, and what a 405 allows.
fn api_response(
    reply: super::events_api::Reply,
    location: Option<String>,
    allow: &'static str,
) -> Response<Body> {
    let mut r = Response::new(full(reply.body));
    *r.status_mut() = reply.status;
    let headers = r.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(hyper::header::LOCATION, location);
    }
    if reply.status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    }
    // A 202 (a durable instance started or still running: poll its status)
    // and a 503 (the store cannot write now) say when to ask again, as
    // Azure's management API does.
    if matches!(
        reply.status,
        StatusCode::ACCEPTED | StatusCode::SERVICE_UNAVAILABLE
    ) {
        headers.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn presented_key<B>(req: &Request<B>) -> PresentedKey {
    let headers = req.headers();
    if let Some(v) = headers
        .get(KEY_HEADER)
        .or_else(|| headers.get(AZURE_KEY_HEADER))
    {
        return PresentedKey {
            value: v.to_str().ok().map(str::to_owned),
        };
    }
    PresentedKey {
        value: query_code(req.uri()).map(str::to_owned),
    }
}

/// The `code` query parameter.
fn query_code(uri: &hyper::Uri) -> Option<&str> {
    query_param(uri, "code")
}

fn query_param<'u>(uri: &'u hyper::Uri, name: &str) -> Option<&'u str> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Removes `code=...` from a request's query.
fn strip_code(uri: &mut hyper::Uri) {
    let Some(query) = uri.query() else { return };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !(pair.starts_with("code=") || *pair == "code"))
        .collect();
    let pq = if kept.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = pq.parse().ok();
    if let Ok(new) = hyper::Uri::from_parts(parts) {
        *uri = new;
    }
}

/// The output bindings of the version a ticket runs.
fn target_outputs(ticket: &Ticket) -> Vec<crate::trigger::config::OutputBinding> {
    ticket.unit().spec.outputs.clone()
}

fn too_large(max: u64) -> String {
    format!(
        "request body larger than {}",
        crate::invoke::human_size(max)
    )
}

fn set_id(r: &mut Response<Body>, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert(INVOCATION_ID_HEADER, v);
    }
}

fn plain(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

/// A JSON error with a public message. Requests that never reached a function
/// still get an id, so any response can be quoted in a support request.
fn error(status: StatusCode, invocation_id: Option<&str>, message: String) -> Response<Body> {
    let id = invocation_id.map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
    let body = serde_json::json!({ "error": message, "invocation_id": id }).to_string() + "\n";
    let mut r = plain(status, "application/json", body);
    set_id(&mut r, &id);
    r
}
