//! Blocking client for the push port (being written).
