//! Typed Dockerfile instructions, each carrying its source location.
//!
//! Values are kept *unexpanded*: words that take `$VAR` substitution keep their quotes and
//! escapes exactly as written, because expansion needs the build-time environment and is done
//! by the builder with [`crate::recipe::shell`]. Exec-form command lines (JSON arrays) are
//! already literal strings.

use serde::Serialize;

/// A location in the recipe: 1-based lines (inclusive) and the 1-based column of the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Span {
    /// First line of the instruction.
    pub start_line: usize,
    /// Column (in characters) where the instruction keyword starts on `start_line`.
    pub start_col: usize,
    /// Last line of the instruction (after line continuations).
    pub end_line: usize,
}

/// Parser directives found at the top of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Directives {
    /// The escape character: `\` (default) or `` ` ``.
    pub escape: char,
    /// The `# syntax=` value, recorded but not acted on.
    pub syntax: Option<String>,
    /// The `# check=` value, recorded but not acted on.
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            check: None,
        }
    }
}

/// A whole parsed recipe.
#[derive(Clone, Debug, Serialize)]
pub struct Recipe {
    /// Parser directives.
    pub directives: Directives,
    /// `ARG` instructions before the first `FROM` (global scope, usable in FROM lines).
    pub meta_args: Vec<Instruction>,
    /// The stages, in source order.
    pub stages: Vec<Stage>,
}

/// One build stage: a `FROM` line and the instructions up to the next `FROM`.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// Stage name from `AS name`, lower-cased.
    pub name: Option<String>,
    /// The base image reference as written (unexpanded; may use global ARGs).
    pub base: String,
    /// `--platform` value as written (unexpanded).
    pub platform: Option<String>,
    /// Location of the `FROM` line.
    pub span: Span,
    /// The `FROM` line's source text (for messages and history).
    pub text: String,
    /// The instructions of the stage (after FROM).
    pub instructions: Vec<Instruction>,
}

/// One instruction with its location and original text.
#[derive(Clone, Debug, Serialize)]
pub struct Instruction {
    /// Where the instruction is in the recipe.
    pub span: Span,
    /// The instruction as one logical line (continuations joined), keyword included, heredoc
    /// bodies excluded; used in progress output and history `created_by`.
    pub text: String,
    /// What the instruction says.
    pub kind: InstructionKind,
}

/// The typed content of an instruction.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "instruction", content = "args", rename_all = "lowercase")]
pub enum InstructionKind {
    /// `RUN`.
    Run(Run),
    /// `CMD`.
    Cmd(CommandLine),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `SHELL ["exe", "arg"...]` (JSON form only).
    Shell(Vec<String>),
    /// `ENV k=v ...` or legacy `ENV k v`: raw (key, value) pairs.
    Env(Vec<(String, String)>),
    /// `LABEL k=v ...`: raw (key, value) pairs.
    Label(Vec<(String, String)>),
    /// `EXPOSE`: raw words.
    Expose(Vec<String>),
    /// `ADD`.
    Add(Copy),
    /// `COPY`.
    Copy(Copy),
    /// `VOLUME`: raw words (or JSON-form literal strings).
    Volume(Vec<String>),
    /// `USER`: raw word.
    User(String),
    /// `WORKDIR`: raw word.
    Workdir(String),
    /// `ARG name[=default] ...`.
    Arg(Vec<ArgDecl>),
    /// `ONBUILD <instruction>`: the trigger's text (as stored in the image config) and its
    /// parsed form (validated at parse time).
    Onbuild {
        /// The trigger text, e.g. `RUN echo hi`.
        trigger: String,
        /// The parsed trigger.
        parsed: Box<Instruction>,
    },
    /// `STOPSIGNAL`: raw word.
    Stopsignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `MAINTAINER`: the rest of the line.
    Maintainer(String),
}

/// A command in exec form (JSON array) or shell form (one string for the SHELL).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandLine {
    /// `["exe", "arg"]`: run directly.
    Exec(Vec<String>),
    /// `exe arg`: run through the SHELL.
    Shell(String),
}

/// A `RUN` instruction.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// The command. With heredocs, the shell-form text is the line itself (e.g. `<<EOF`,
    /// `python3 <<EOF`, `cat <<A >a`).
    pub command: CommandLine,
    /// Here-documents attached to the command, in order.
    pub heredocs: Vec<Heredoc>,
    /// `--mount=` values, raw (CSV `key=value` lists).
    pub mounts: Vec<String>,
    /// `--network=` value, raw.
    pub network: Option<String>,
    /// `--security=` value, raw.
    pub security: Option<String>,
}

/// A here-document body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The delimiter word, e.g. `EOF`.
    pub name: String,
    /// The body, with leading tabs already removed for `<<-`; ends with a newline unless empty.
    pub content: String,
    /// False when the delimiter was quoted (`<<"EOF"` / `<<'EOF'`): no variable expansion.
    pub expand: bool,
    /// The file descriptor for `N<<EOF` (RUN only); None means stdin / a COPY source.
    pub fd: Option<u32>,
}

/// `COPY` / `ADD` arguments and flags (all values raw).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Copy {
    /// Sources, raw words. A heredoc source is written `<<NAME` and has a matching entry in
    /// `heredocs`.
    pub sources: Vec<String>,
    /// Destination, raw word.
    pub dest: String,
    /// Heredoc sources, in order.
    pub heredocs: Vec<Heredoc>,
    /// `--from=`.
    pub from: Option<String>,
    /// `--chown=`.
    pub chown: Option<String>,
    /// `--chmod=`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude=` (repeatable).
    pub exclude: Vec<String>,
    /// `--checksum=` (ADD only).
    pub checksum: Option<String>,
    /// `--keep-git-dir` (ADD only).
    pub keep_git_dir: bool,
    /// `--unpack=` (ADD only).
    pub unpack: Option<bool>,
}

/// One declaration of an `ARG` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ArgDecl {
    /// The name.
    pub name: String,
    /// The default value, raw (quotes kept); None when there is no `=`.
    pub default: Option<String>,
}

/// A `HEALTHCHECK` instruction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable any inherited check.
    None,
    /// `HEALTHCHECK [opts] CMD ...`.
    Check {
        /// The test command.
        command: CommandLine,
        /// `--interval` in nanoseconds (0 = not set).
        interval_ns: u64,
        /// `--timeout` in nanoseconds (0 = not set).
        timeout_ns: u64,
        /// `--start-period` in nanoseconds (0 = not set).
        start_period_ns: u64,
        /// `--start-interval` in nanoseconds (0 = not set).
        start_interval_ns: u64,
        /// `--retries` (0 = not set).
        retries: u32,
    },
}
