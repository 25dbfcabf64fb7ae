//! The recipe front end: Dockerfile text to typed, located instructions.

pub mod ignore;
pub mod instructions;
pub mod shell;
