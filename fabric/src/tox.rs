//! The c-toxcore binding: one thread owns the `Tox*` instance; tokio talks to it over channels.
