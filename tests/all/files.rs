//! Folders mounted with `files`: both contracts read them at request time,
//! read-only, and only the functions that mount them.

use crate::util::{App, TestServer};

const FUNCTIONS: &str = r#"
[functions.hello]
source = "{guests}/hello.wasm"
files = [{ source = "greetings", destination = "/greetings/" }]
env = { GREETING_FILE = "/greetings/greeting.txt" }
[[functions.hello.http]]
route = "/hello/{name}"
auth = "anonymous"

[functions.hello-http]
source = "{components}/hello_http.wasm"
files = [{ source = "greetings", destination = "/greetings" }]
env = { GREETING_FILE = "/greetings/greeting.txt" }
[[functions.hello-http.http]]
route = "/http/hello"
auth = "anonymous"

[functions.hostile]
source = "{guests}/hostile.wasm"
files = [{ source = "greetings", destination = "/greetings" }]
env = { HOSTILE_MOUNTS = "/greetings" }
[[functions.hostile.http]]
route = "/hostile/{kind}"
auth = "anonymous"

[functions.unmounted]
source = "{guests}/hello.wasm"
env = { GREETING_FILE = "/greetings/greeting.txt" }
[[functions.unmounted.http]]
route = "/unmounted/{name}"
auth = "anonymous"
"#;

async fn text(server: &TestServer, path: &str) -> (u16, String) {
    let r = server.get(path).await;
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_folders_are_read_at_request_time_read_only_in_both_contracts() {
    let dir = tempfile::tempdir().unwrap();
    let greetings = dir.path().join("greetings");
    std::fs::create_dir(&greetings).unwrap();
    let file = greetings.join("greeting.txt");
    std::fs::write(&file, "Bonjour\n").unwrap();
    let app = App::in_dir(dir, "", FUNCTIONS);
    let server = TestServer::start(&app).await;

    assert_eq!(
        text(&server, "/hello/ana").await,
        (200, "Bonjour, ana!\n".into())
    );
    assert_eq!(
        text(&server, "/http/hello?name=ana").await,
        (200, "Bonjour, ana!\n".into())
    );
    // Read when the request comes, not when the function was loaded.
    std::fs::write(&file, "Hola\n").unwrap();
    assert_eq!(
        text(&server, "/hello/ana").await,
        (200, "Hola, ana!\n".into())
    );
    assert_eq!(
        text(&server, "/http/hello?name=ana").await,
        (200, "Hola, ana!\n".into())
    );

    // Read-only: neither a new file nor a removal gets through.
    let r = server.get("/hostile/write-files").await;
    assert_eq!(r.status(), 200);
    let said = r.headers()["x-write"].to_str().unwrap().to_owned();
    assert!(
        said.starts_with("/greetings Err(") && said.contains("remove Some(Err("),
        "{said}"
    );
    assert!(!greetings.join("written-by-guest").exists());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "Hola\n");

    // A function that mounts nothing sees nothing.
    let (status, body) = text(&server, "/unmounted/ana").await;
    assert_eq!(status, 500, "{body}");
    server.stop().await;
}
