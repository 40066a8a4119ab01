//! Access keys over real HTTP: function and admin routes, header and query,
//! never billed, never seen by the guest.

use kelvin::keys::{KeyStore, Scope};

use crate::util::{App, TestServer, invocation_id};

fn app() -> App {
    App::new(
        "",
        "[functions.echo]\nsource = \"{guests}/echo.wasm\"\n\
         [[functions.echo.http]]\nroute = \"/echo\"\n\
         [[functions.echo.http]]\nroute = \"/admin/echo\"\nauth = \"admin\"\n\
         [functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello\"\nauth = \"function\"\n",
    )
}

fn key(app: &App, scope: &Scope) -> String {
    let store = KeyStore::open(&app.state_dir(), &[]).unwrap();
    store.find(scope).unwrap().value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_routes_need_a_key_by_default() {
    let app = app();
    let server = TestServer::start(&app).await;
    let echo_key = key(&app, &Scope::Function("echo".into()));
    let hello_key = key(&app, &Scope::Function("hello".into()));
    let host_key = key(&app, &Scope::Host);

    let r = server.get("/echo").await;
    assert_eq!(r.status(), 401);
    invocation_id(&r);
    assert_eq!(server.status_with_key("/echo", "nope").await, 401);
    assert_eq!(
        server.status_with_key("/echo", &hello_key).await,
        401,
        "another function's key does not open this one"
    );
    assert!(
        server.sink.records().is_empty(),
        "401s are not billed and never reach the guest"
    );

    assert_eq!(server.status_with_key("/echo", &echo_key).await, 200);
    let r = server.get(&format!("/hello?code={host_key}")).await;
    assert_eq!(
        r.status(),
        200,
        "a host key in the code parameter opens any function"
    );
    assert_eq!(server.sink.records().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_master_key() {
    let app = app();
    let server = TestServer::start(&app).await;
    let master = key(&app, &Scope::Master);
    for k in [
        key(&app, &Scope::Host),
        key(&app, &Scope::Function("echo".into())),
    ] {
        assert_eq!(server.status_with_key("/admin/echo", &k).await, 401);
    }
    assert_eq!(server.status_with_key("/admin/echo", &master).await, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_never_sees_the_key() {
    let app = app();
    let server = TestServer::start(&app).await;
    let k = key(&app, &Scope::Function("echo".into()));
    let r = server
        .client
        .get(server.url(&format!("/echo?inspect&code={k}&x=1")))
        .header("x-kelvin-key", &k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("HTTP_X_KELVIN_KEY"), "{text}");
    // Azure's header opens the route too, and is removed as well.
    let r = server
        .client
        .get(server.url("/echo?inspect"))
        .header("x-functions-key", &k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains("HTTP_X_FUNCTIONS_KEY"), "{text}");
    assert!(!text.contains(k.as_str()), "{text}");
    let r = server
        .client
        .get(server.url(&format!("/echo?a=1&code={k}&b=2")))
        .header("x-kelvin-key", &k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-echo-query"], "a=1&b=2");
    server.stop().await;
}
