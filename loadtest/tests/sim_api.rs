//! llama-sim served in-process on `127.0.0.1:0`, exercised over HTTP with a plain hyper client.
//!
//! Most tests run under paused tokio time at the real BitNet rates (60 tok/s prompt, 18 tok/s
//! generation): minutes of simulated work take no wall time and durations are exact to the
//! timer's millisecond. A few run in real time with a small time scale to prove the timers also
//! work unpaused.
//!
//! The cases live in `sim_api/`, one file per topic, so they build into this one test binary.

#[path = "sim_api/support.rs"]
mod support;

#[path = "sim_api/caching.rs"]
mod caching;
#[path = "sim_api/dialects.rs"]
mod dialects;
#[path = "sim_api/faults.rs"]
mod faults;
#[path = "sim_api/lifecycle.rs"]
mod lifecycle;
#[path = "sim_api/slots.rs"]
mod slots;
#[path = "sim_api/timing.rs"]
mod timing;
