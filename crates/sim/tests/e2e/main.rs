//! End-to-end tests of the emulator: real servers on `127.0.0.1:0`, a real HTTP client.

mod auth;
mod faults;
mod quota;
mod recording;
mod server;
mod shapes;
mod streaming;
mod support;
