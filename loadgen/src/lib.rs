//! Load generation for `benches/run.sh`: small HTTP backends to put behind
//! a proxy (`http_backend`), WebSocket chat streams that check every `seq`
//! and time every chunk (`streams`), idle WebSockets held open to measure
//! memory per connection (`idle`), the backplane's event writes alone
//! (`ledger`, for the capacity model), and what they share: sockets bound to
//! many loopback source addresses and latency summaries (`net`, `latency`).

pub mod http_backend;
pub mod idle;
pub mod latency;
pub mod ledger;
pub mod net;
pub mod streams;
