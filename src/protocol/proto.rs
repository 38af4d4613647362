//! Frame bodies generated from `proto/longlink.proto` at build time.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/longlink.v1.rs"));
