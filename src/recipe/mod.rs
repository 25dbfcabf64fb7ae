//! The recipe front end: Dockerfile text to typed, located instructions.
//!
//! [`parse_syntax`] gives BuildKit's raw syntax tree ([`Ast`], printable with [`dump`]);
//! [`parse`] validates it into the typed [`instructions::Recipe`].

pub mod checks;
pub mod dump;
pub mod error;
pub mod ignore;
pub mod instructions;
pub mod lower;
pub mod outline;
pub mod parser;
pub mod shell;

pub use dump::dump;
pub use error::RecipeError;
pub use lower::parse;
pub use parser::{Ast, parse_syntax};
