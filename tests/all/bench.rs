//! `kelvin bench cold-start` starts every function as its trigger would: a
//! GET route's module and component get a GET to their route, a queue
//! function a message event, a blob function a blob event, a timer
//! function a timer event. Before, each got an empty input (a component a
//! `POST /`), so all but the plainest were skipped as failing.

use std::sync::Arc;

use kelvin::Runtime;
use kelvin::bench::cold::{self, Records, Temperature};

use crate::util::App;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_starts_each_function_as_its_trigger_would() {
    let predict = kelvin_tests::example_guest("predict");
    let app = App::new(
        "",
        &format!(
            "[functions.hello]\nsource = \"{{guests}}/hello.wasm\"\n\
             [[functions.hello.http]]\nroute = \"/hello/{{name}}\"\nmethods = [\"GET\"]\n\
             [functions.predict]\nsource = \"{}\"\n\
             files = [{{ source = \"{}\", destination = \"/model\" }}]\n\
             [[functions.predict.http]]\nroute = \"/predict\"\nmethods = [\"GET\"]\n\
             [functions.on-message]\nsource = \"{{guests}}/events.wasm\"\n\
             [[functions.on-message.queue_trigger]]\nname = \"orders\"\n\
             [functions.on-upload]\nsource = \"{{guests}}/events.wasm\"\n\
             [[functions.on-upload.blob]]\npath = \"uploads/{{name}}.json\"\n\
             [functions.tick]\nsource = \"{{guests}}/events.wasm\"\n\
             [[functions.tick.timer]]\nschedule = \"0 0 0 1 1 *\"\n",
            predict.display(),
            kelvin_tests::predict_model_dir().display(),
        ),
    );
    let records = Arc::new(Records::default());
    let runtime = Arc::new(Runtime::new(app.manifest(), records.clone()).expect("runtime starts"));
    let functions: Vec<String> = ["hello", "predict", "on-message", "on-upload", "tick"]
        .map(String::from)
        .into();
    let report = cold::measure(
        &runtime,
        &records,
        &functions,
        2,
        br#"{"id": "o-1"}"#.to_vec().into(),
        &|_| {},
    )
    .await;
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    let events: Vec<(&str, &str, &str)> = report
        .functions
        .iter()
        .map(|f| (f.function.as_str(), f.event.as_str(), f.kind))
        .collect();
    assert_eq!(
        events,
        [
            ("hello", "GET /hello/bench", "module"),
            ("predict", "GET /predict", "component"),
            ("on-message", "queue orders", "module"),
            ("on-upload", "blob uploads/bench.json", "module"),
            ("tick", "timer 0 0 0 1 1 *", "module"),
        ]
    );
    for f in &report.functions {
        let temperatures: Vec<Temperature> = f.temperatures.iter().map(|t| t.temperature).collect();
        assert_eq!(temperatures, Temperature::ALL, "{}", f.function);
        for t in &f.temperatures {
            assert_eq!(t.total_us.len(), 2, "{} {:?}", f.function, t.temperature);
        }
    }
    // The table names each function's event under it.
    let table = report.table();
    assert!(table.contains("(GET /predict)"), "{table}");
    assert!(table.contains("(queue orders)"), "{table}");
}
