//! `notify`: an HTTP function (CGI) that acts on durable functions through
//! two output bindings: `approve` raises the `approval` event to the
//! instance `?instance=ID`, and `count` signals `add 1` to the counter
//! entity `?key=K`. Either parameter may be left out.

use kelvin_sdk::http::{Request, Response};
use serde_json::{Value, json};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let mut outputs = serde_json::Map::new();
        if let Some(id) = req.query_param("instance") {
            outputs.insert(
                "approve".into(),
                json!({"instance_id": id, "input": "approved by notify"}),
            );
        }
        if let Some(key) = req.query_param("key") {
            outputs.insert(
                "count".into(),
                json!({"key": key, "operation": "add", "input": 1}),
            );
        }
        let envelope = json!({"Outputs": Value::Object(outputs), "ReturnValue": "ok"});
        Response::new(200)
            .header("content-type", "application/json")
            .body(envelope.to_string())
    });
}
