//! Functions from other toolchains than Rust's, built by the example app's
//! own build commands (`functions.toml`) with the toolchains
//! `scripts/toolchains.sh` installs: Python (componentize-py) and
//! JavaScript (componentize-js) wasi:http components, and a C CGI module
//! (zig cc).

use crate::util::{App, TestServer, invocation_id};

fn app() -> App {
    let predict = kelvin_tests::example_guest("predict");
    let hello_js = kelvin_tests::example_guest("hello-js");
    let wordcount = kelvin_tests::example_guest("wordcount");
    App::new(
        "",
        &format!(
            "[functions.predict]\nsource = \"{}\"\n\
             files = [{{ source = \"{}\", destination = \"/model\" }}]\n\
             [[functions.predict.http]]\nroute = \"/predict\"\nauth = \"anonymous\"\n\
             [functions.hello-js]\nsource = \"{}\"\n\
             [[functions.hello-js.http]]\nroute = \"/js/hello\"\nauth = \"anonymous\"\n\
             [functions.wordcount]\nsource = \"{}\"\n\
             [[functions.wordcount.http]]\nroute = \"/wordcount\"\nauth = \"anonymous\"\n",
            predict.display(),
            kelvin_tests::predict_model_dir().display(),
            hello_js.display(),
            wordcount.display()
        ),
    )
}

async fn post_json(
    server: &TestServer,
    path: &str,
    body: &str,
) -> (u16, String, serde_json::Value) {
    let r = server
        .client
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let id = invocation_id(&r);
    let value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    (status, id, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_javascript_and_c_functions_answer_over_http() {
    let server = TestServer::start(&app()).await;

    // Python: the Iris model in the source predicts from four measurements.
    let (status, id, v) =
        post_json(&server, "/predict", r#"{"features": [6.7, 3.0, 5.2, 2.3]}"#).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prediction"], "virginica");
    let p = &v["probabilities"];
    let total: f64 = ["setosa", "versicolor", "virginica"]
        .iter()
        .map(|c| p[c].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-3, "{v}");
    let record = server.record(&id).await;
    assert_eq!(record.outcome.as_str(), "ok", "{:?}", record.reason);
    assert!(record.cold);
    let (_, _, v) = post_json(
        &server,
        "/predict",
        r#"{"instances": [[5.1, 3.5, 1.4, 0.2], {"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 4.2, "petal_width": 1.5}]}"#,
    )
    .await;
    assert_eq!(v["predictions"][0]["prediction"], "setosa");
    assert_eq!(v["predictions"][1]["prediction"], "versicolor");
    let (status, id, v) = post_json(&server, "/predict", r#"{"features": [1, 2]}"#).await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().contains("list of 4 numbers"),
        "{v}"
    );
    // A guest's 4xx is its answer, not a failure of the invocation.
    assert_eq!(server.record(&id).await.outcome.as_str(), "ok");
    let r = server.get("/predict").await;
    assert_eq!(r.status(), 200);
    let info: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(info["classes"][2], "virginica");

    // JavaScript: a fetch-event handler.
    let r = server.get("/js/hello?name=kelvin").await;
    assert_eq!(r.status(), 200);
    let id = invocation_id(&r);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["message"], "Hello, kelvin!");
    let record = server.record(&id).await;
    assert_eq!(record.outcome.as_str(), "ok", "{:?}", record.reason);
    assert!(record.bytes_out > 0);
    let (status, _, v) = post_json(&server, "/js/hello", r#"{"name": "posted"}"#).await;
    assert_eq!(
        (status, v["message"].as_str()),
        (200, Some("Hello, posted!"))
    );
    let (status, _, v) = post_json(&server, "/js/hello", "not json").await;
    assert_eq!(status, 400, "{v}");

    // C: a CGI module counting words.
    let r = server
        .client
        .post(server.url("/wordcount"))
        .body("one two  three\nfour\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let id = invocation_id(&r);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (
            v["lines"].as_u64(),
            v["words"].as_u64(),
            v["bytes"].as_u64()
        ),
        (Some(2), Some(4), Some(20))
    );
    assert_eq!(server.record(&id).await.bytes_in, 20);
    server.stop().await;
}
