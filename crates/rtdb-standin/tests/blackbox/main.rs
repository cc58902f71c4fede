//! Black-box tests of the stand-in over real HTTP on loopback.

mod common;

mod control;
mod faults;
mod oauth;
mod rest;
mod streams;
