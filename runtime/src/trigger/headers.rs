//! The headers Kelvin reads and sets on HTTP requests and responses (one
//! place, for the server, the admin API and the CLI).

/// Every response carries its invocation id.
pub const INVOCATION_ID_HEADER: &str = "x-kelvin-invocation-id";
/// Where a client presents an access key (or in the `code` query parameter).
pub const KEY_HEADER: &str = "x-kelvin-key";
/// Azure Functions' name for it, accepted too: clients and tools written
/// for Azure (the durable management API's, say) keep working.
pub const AZURE_KEY_HEADER: &str = "x-functions-key";
/// Which slot a request is for (or the `kelvin-slot` query parameter);
/// production without it.
pub const SLOT_HEADER: &str = "x-kelvin-slot";
/// The version that served a response.
pub const VERSION_HEADER: &str = "x-kelvin-version";
/// An event's trigger and function, on the POST a component receives.
pub use crate::proxy::{FUNCTION_HEADER, TRIGGER_HEADER};
