//! TCP: sequence space, RTO estimation, timers and buffers (the connection state machine builds
//! on these).

pub mod buffer;
pub mod cc;
pub mod conn;
pub mod cookie;
pub mod rtt;
pub mod scoreboard;
pub mod seq;
pub mod wheel;
