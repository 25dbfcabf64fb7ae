//! Low-level Dockerfile parsing: text to a raw syntax tree equivalent to BuildKit's parser `Node`.
//!
//! The pest grammar (`grammar/dockerfile.pest`) recognises the pieces; this module drives it the
//! way BuildKit's line scanner does: parser directives at the top, then physical lines joined
//! into logical lines at continuation marks, each logical line split into keyword, flags and
//! per-instruction arguments, and heredoc bodies read after the line that announces them.
//! Nothing is expanded and instructions are not validated here (see [`crate::recipe::lower`]).

use pest::Parser as _;
use pest::iterators::Pair;

use super::error::{LineIndex, RecipeError};
use super::instructions::Directives;

/// The pest parser generated from `grammar/dockerfile.pest`.
#[derive(pest_derive::Parser)]
#[grammar = "../grammar/dockerfile.pest"]
struct Grammar;

/// How deep `ONBUILD ONBUILD ...` may nest in the raw tree (the typed layer allows one level).
const MAX_NESTING: usize = 8;

/// A parsed recipe: directives and the top-level instructions in source order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ast {
    /// Parser directives from the top of the file.
    pub directives: Directives,
    /// One node per instruction.
    pub nodes: Vec<Node>,
    /// First line of the first instruction (1-based).
    pub start_line: usize,
    /// Last line of the last instruction (1-based, heredoc bodies included).
    pub end_line: usize,
    /// Non-fatal findings (empty continuation lines), BuildKit wording.
    pub warnings: Vec<String>,
}

/// One instruction (or, inside `ONBUILD`, the wrapped instruction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The keyword as written (`Run`, `FROM`, ...).
    pub keyword: String,
    /// Leading `--flag` words, quotes removed (`--from=build`, `--link`).
    pub flags: Vec<Flag>,
    /// The arguments, shaped per instruction as BuildKit does.
    pub args: Vec<Arg>,
    /// True when the arguments came from a JSON string array (exec form).
    pub json: bool,
    /// Heredocs announced on the line, in order (on the `ONBUILD` node for a wrapped one).
    pub heredocs: Vec<RawHeredoc>,
    /// First line (1-based).
    pub start_line: usize,
    /// Last line (1-based, continuation lines and heredoc bodies included).
    pub end_line: usize,
    /// The instruction as one logical line (continuations joined, trimmed).
    pub original: String,
    /// Offset of the keyword within the logical line (see [`Node::locate`]).
    pub offset: usize,
    /// Where the pieces of the logical line come from in the file.
    segments: Vec<Segment>,
}

/// A `--flag` word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flag {
    /// The flag with quotes removed, e.g. `--chown=a b`.
    pub text: String,
    /// Offset of the flag within the logical line.
    pub offset: usize,
}

/// One argument of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A plain value.
    Word {
        /// The value.
        text: String,
        /// Offset within the logical line where the value (or its JSON array) starts.
        offset: usize,
    },
    /// The instruction wrapped by `ONBUILD`.
    Nested(Box<Node>),
}

/// A heredoc as found by the parser (content not yet chomped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawHeredoc {
    /// The delimiter, quotes removed.
    pub name: String,
    /// `N` of `N<<EOF`, if digits were given.
    pub fd: Option<u32>,
    /// False when the delimiter was quoted.
    pub expand: bool,
    /// True for `<<-`: leading tabs are to be stripped from the body.
    pub chomp: bool,
    /// The body lines, each with its line ending as in the file.
    pub content: String,
    /// Offset of the `<<` word within the logical line.
    pub offset: usize,
}

/// Where a piece of a logical line starts: offset in the logical line, and file position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: usize,
    line: usize,
    byte: usize,
}

impl Node {
    /// The file line and byte offset within that line of `offset` in the logical line.
    pub fn locate(&self, offset: usize) -> (usize, usize) {
        let i = self
            .segments
            .partition_point(|s| s.offset <= offset)
            .saturating_sub(1);
        match self.segments.get(i) {
            Some(s) => (s.line, s.byte + (offset - s.offset.min(offset))),
            None => (self.start_line, 0),
        }
    }

    /// The word arguments (nested nodes skipped).
    pub fn words(&self) -> impl Iterator<Item = (&str, usize)> {
        self.args.iter().filter_map(|a| match a {
            Arg::Word { text, offset } => Some((text.as_str(), *offset)),
            Arg::Nested(_) => None,
        })
    }
}

/// A syntax problem at an offset of the current logical line.
struct LineError {
    offset: usize,
    message: String,
}

impl LineError {
    fn new(offset: usize, message: impl Into<String>) -> LineError {
        LineError {
            offset,
            message: message.into(),
        }
    }
}

/// How a physical line ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineKind {
    Comment,
    /// Continued: the byte position (in the text) of the continuation escape.
    Continued(usize),
    Plain,
}

/// A physical line: byte range in the text (line ending excluded) and kind.
#[derive(Clone, Copy, Debug)]
struct PhysLine {
    start: usize,
    end: usize,
    kind: LineKind,
}

/// Parses recipe bytes into the raw syntax tree, as BuildKit's `parser.Parse` does: directives,
/// continuations, comments, flags and argument shapes, heredoc bodies; no expansion, no
/// instruction validation. `file` is used in error messages.
pub fn parse_syntax(src: &[u8], file: &str) -> Result<Ast, RecipeError> {
    let text = check_text(src, file)?;
    let index = LineIndex::new(text);
    let (directives, _) = scan_directives(text, file, &index)?;
    let lines = physical_lines(text, directives.escape, file, &index)?;
    let mut p = LineParser {
        text,
        file,
        index: &index,
        escape: directives.escape,
        lines,
        next: 0,
    };
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    while let Some(node) = p.next_node(&mut warnings)? {
        nodes.push(node);
    }
    let (Some(first), Some(last)) = (nodes.first(), nodes.last()) else {
        let line = index.line_count().max(1);
        return Err(RecipeError::at(
            file,
            &index,
            line,
            0,
            "file with no instructions",
        ));
    };
    let (start_line, end_line) = (first.start_line, last.end_line);
    if !warnings.is_empty() {
        warnings.push(
            "[WARNING]: Empty continuation lines will become errors in a future release.".into(),
        );
    }
    Ok(Ast {
        directives,
        nodes,
        start_line,
        end_line,
        warnings,
    })
}

/// Rejects bytes that are not UTF-8 text or contain NUL, pointing at the first bad byte.
pub(crate) fn check_text<'a>(src: &'a [u8], file: &str) -> Result<&'a str, RecipeError> {
    let (bad, what) = match std::str::from_utf8(src) {
        Ok(t) => match t.find('\0') {
            None => return Ok(t),
            Some(p) => (p, "NUL byte in recipe"),
        },
        Err(e) => {
            let p = e.valid_up_to();
            match src[..p].iter().position(|&b| b == 0) {
                Some(n) => (n, "NUL byte in recipe"),
                None => (p, "recipe is not valid UTF-8"),
            }
        }
    };
    // Index only the valid prefix so the source line can be shown.
    let valid = std::str::from_utf8(&src[..bad]).unwrap_or_default();
    let line_start = valid.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_no = valid.matches('\n').count() + 1;
    let rest = &src[line_start..];
    let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let shown = String::from_utf8_lossy(&rest[..line_end]).replace('\0', "\u{FFFD}");
    let shown = shown.trim_end_matches('\r');
    let col = valid[line_start..].chars().count() + 1;
    let byte = src.get(bad).copied().unwrap_or(0);
    Err(RecipeError {
        file: file.to_string(),
        line: line_no,
        col,
        message: format!("{what} (byte 0x{byte:02x} at offset {bad})"),
        source_line: shown.to_string(),
    })
}

/// Reads the parser directives at the top of the file; returns them and how many lines they took.
fn scan_directives(
    text: &str,
    file: &str,
    index: &LineIndex<'_>,
) -> Result<(Directives, usize), RecipeError> {
    let mut d = Directives::default();
    let mut seen: Vec<String> = Vec::new();
    let mut count = 0;
    for (i, raw) in text.split('\n').enumerate() {
        let line_no = i + 1;
        let raw = if i == 0 {
            raw.strip_prefix('\u{FEFF}').unwrap_or(raw)
        } else {
            raw
        };
        let trimmed = raw.trim_end_matches(['\r', '\n']).trim_start();
        let Ok(mut pairs) = Grammar::parse(Rule::directive, trimmed) else {
            break;
        };
        let Some(top) = pairs.next() else { break };
        let value_pos = top.as_span().end();
        let value = &trimmed[value_pos..];
        let key = top
            .into_inner()
            .find(|p| p.as_rule() == Rule::directive_key)
            .map(|p| p.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            break;
        }
        let blank = |c: char| matches!(c, ' ' | '\t' | '\r' | '\x0C');
        let lead = value.len() - value.trim_start_matches(blank).len();
        let mut v = value.trim_matches(blank);
        if v.is_empty() {
            // `(.+?)` takes one blank when nothing else is there.
            v = &value[..1];
        }
        let col = index.line_text(line_no).len() - trimmed.len() + value_pos + lead;
        if seen.contains(&key) {
            let msg = format!("only one {key} parser directive can be used");
            return Err(RecipeError::at(file, index, line_no, col, msg));
        }
        seen.push(key.clone());
        match key.as_str() {
            "escape" => match v {
                "\\" => d.escape = '\\',
                "`" => d.escape = '`',
                _ => {
                    let msg = format!("invalid escape token '{v}' does not match ` or \\");
                    return Err(RecipeError::at(file, index, line_no, col, msg));
                }
            },
            "syntax" => d.syntax = Some(v.to_string()),
            _ => d.check = Some(v.to_string()),
        }
        count += 1;
    }
    Ok((d, count))
}

/// Splits the text into classified physical lines with the `file_bs` / `file_bt` rule.
fn physical_lines(
    text: &str,
    escape: char,
    file: &str,
    index: &LineIndex<'_>,
) -> Result<Vec<PhysLine>, RecipeError> {
    let rule = if escape == '`' {
        Rule::file_bt
    } else {
        Rule::file_bs
    };
    let pairs = Grammar::parse(rule, text).map_err(|e| grammar_error(e, file, index, 1))?;
    let mut lines = Vec::new();
    for p in pairs.flatten() {
        let (start, end) = (p.as_span().start(), p.as_span().end());
        let kind = match p.as_rule() {
            Rule::comment_line => LineKind::Comment,
            Rule::plain_line => LineKind::Plain,
            // The mark is the last escape character; only blanks and CRs follow it.
            Rule::bs_continued | Rule::bt_continued => {
                LineKind::Continued(start + p.as_str().rfind(escape).unwrap_or(0))
            }
            _ => continue,
        };
        lines.push(PhysLine { start, end, kind });
    }
    // A final newline does not start another line.
    if text.ends_with('\n') && lines.last().is_some_and(|l| l.start == text.len()) {
        lines.pop();
    }
    Ok(lines)
}

/// Turns a pest failure (which the grammar should never produce) into a located error.
fn grammar_error(
    e: pest::error::Error<Rule>,
    file: &str,
    index: &LineIndex<'_>,
    line: usize,
) -> RecipeError {
    RecipeError::at(
        file,
        index,
        line,
        0,
        format!("syntax error: {}", e.variant.message()),
    )
}

/// The line scanner: walks physical lines and produces one node per logical line.
struct LineParser<'a> {
    text: &'a str,
    file: &'a str,
    index: &'a LineIndex<'a>,
    escape: char,
    lines: Vec<PhysLine>,
    next: usize,
}

impl LineParser<'_> {
    /// The text of a physical line without trailing CR/LF.
    fn raw(&self, l: &PhysLine) -> &str {
        self.text[l.start..l.end].trim_end_matches(['\r', '\n'])
    }

    fn next_node(&mut self, warnings: &mut Vec<String>) -> Result<Option<Node>, RecipeError> {
        loop {
            let Some(&first) = self.lines.get(self.next) else {
                return Ok(None);
            };
            self.next += 1;
            let start_line = self.next;
            if first.kind == LineKind::Comment {
                continue;
            }
            let (piece_end, mut continued) = match first.kind {
                LineKind::Continued(mark) => (mark, true),
                _ => (first.start + self.raw(&first).len(), false),
            };
            let piece = &self.text[first.start..piece_end];
            let trimmed = piece.trim_start();
            if !continued && trimmed.is_empty() {
                continue;
            }
            let mut logical = trimmed.to_string();
            let lead = piece.len() - trimmed.len();
            let mut segments = vec![Segment {
                offset: 0,
                line: start_line,
                byte: first.start + lead - self.index.line_start(start_line),
            }];
            let mut empty_continuation = false;
            while continued {
                let Some(&l) = self.lines.get(self.next) else {
                    break;
                };
                self.next += 1;
                if l.kind == LineKind::Comment {
                    continue;
                }
                let raw = self.raw(&l);
                if raw.trim_start().is_empty() {
                    empty_continuation = true;
                    continue;
                }
                let end = match l.kind {
                    LineKind::Continued(mark) => mark,
                    _ => {
                        continued = false;
                        l.start + raw.len()
                    }
                };
                segments.push(Segment {
                    offset: logical.len(),
                    line: self.next,
                    byte: l.start - self.index.line_start(self.next),
                });
                logical.push_str(&self.text[l.start..end]);
            }
            if empty_continuation {
                warnings.push(format!(
                    "[WARNING]: Empty continuation line found in:\n    {logical}"
                ));
            }
            let end_line = self.next;
            let mut node = self.build_node(&logical, segments, start_line, end_line)?;
            self.read_heredocs(&mut node)?;
            return Ok(Some(node));
        }
    }

    fn build_node(
        &self,
        logical: &str,
        segments: Vec<Segment>,
        start_line: usize,
        end_line: usize,
    ) -> Result<Node, RecipeError> {
        let mut node = parse_instruction(logical, 0, self.escape, 0).map_err(|e| {
            let tmp = Node {
                segments: segments.clone(),
                start_line,
                ..empty_node()
            };
            let (line, byte) = tmp.locate(e.offset);
            RecipeError::at(self.file, self.index, line, byte, e.message)
        })?;
        set_lines(&mut node, start_line, end_line, &segments);
        Ok(node)
    }

    /// Reads the bodies of the heredocs announced by `node`'s line.
    fn read_heredocs(&mut self, node: &mut Node) -> Result<(), RecipeError> {
        if !can_contain_heredoc(node) || !node.original.contains("<<") {
            return Ok(());
        }
        let mut docs = heredocs_from_line(&node.original);
        for doc in &mut docs {
            let mut terminated = false;
            while let Some(&l) = self.lines.get(self.next) {
                self.next += 1;
                let full_end = if l.end < self.text.len() {
                    l.end + 1
                } else {
                    l.end
                };
                let body = &self.text[l.start..full_end];
                let mut candidate = body.trim_end_matches(['\r', '\n']);
                if doc.chomp {
                    candidate = candidate.trim_start_matches('\t');
                }
                if candidate == doc.name {
                    terminated = true;
                    break;
                }
                doc.content.push_str(body);
            }
            if !terminated {
                let (line, byte) = node.locate(doc.offset);
                let msg = format!("unterminated heredoc: no line `{}` ends it", doc.name);
                return Err(RecipeError::at(self.file, self.index, line, byte, msg));
            }
        }
        node.end_line = self.next.max(node.end_line);
        node.heredocs = docs;
        Ok(())
    }
}

fn empty_node() -> Node {
    Node {
        keyword: String::new(),
        flags: Vec::new(),
        args: Vec::new(),
        json: false,
        heredocs: Vec::new(),
        start_line: 0,
        end_line: 0,
        original: String::new(),
        offset: 0,
        segments: Vec::new(),
    }
}

/// Gives a node and its nested nodes their lines and source segments.
fn set_lines(node: &mut Node, start: usize, end: usize, segments: &[Segment]) {
    node.start_line = start;
    node.end_line = end;
    node.segments = segments.to_vec();
    for a in &mut node.args {
        if let Arg::Nested(child) = a {
            set_lines(child, start, end, segments);
        }
    }
}

/// True for RUN, COPY, ADD (and ONBUILD of those) not in exec form.
fn can_contain_heredoc(node: &Node) -> bool {
    let mut n = node;
    if n.keyword.eq_ignore_ascii_case("onbuild")
        && let Some(Arg::Nested(child)) = n.args.first()
    {
        n = child;
    }
    let kw = n.keyword.to_ascii_lowercase();
    matches!(kw.as_str(), "run" | "copy" | "add") && !n.json
}

/// Finds the `[fd]<<[-]NAME` words of a line (shell words, quotes kept).
fn heredocs_from_line(line: &str) -> Vec<RawHeredoc> {
    let Ok(mut pairs) = Grammar::parse(Rule::shell_words, line) else {
        return Vec::new();
    };
    let Some(top) = pairs.next() else {
        return Vec::new();
    };
    let mut docs = Vec::new();
    for w in top.into_inner().filter(|p| p.as_rule() == Rule::shell_word) {
        if let Some(doc) = heredoc_from_word(w.as_str(), w.as_span().start()) {
            docs.push(doc);
        }
    }
    docs
}

/// Parses one shell word as a heredoc marker.
fn heredoc_from_word(word: &str, offset: usize) -> Option<RawHeredoc> {
    let top = Grammar::parse(Rule::heredoc_word, word).ok()?.next()?;
    let (mut fd, mut chomp, mut raw_name) = (None, false, "");
    for p in top.into_inner() {
        match p.as_rule() {
            Rule::heredoc_fd => fd = Some(p.as_str().parse::<u32>().unwrap_or(0)),
            Rule::heredoc_chomp => chomp = true,
            Rule::heredoc_name => raw_name = p.as_str(),
            _ => {}
        }
    }
    let delim = Grammar::parse(Rule::heredoc_delim, raw_name).ok()?.next()?;
    let mut name = String::new();
    let mut expand = true;
    for p in delim.into_inner().flatten() {
        match p.as_rule() {
            Rule::name_quoted_sq | Rule::name_quoted_dq => expand = false,
            Rule::name_sq | Rule::name_dq_text | Rule::name_plain => name.push_str(p.as_str()),
            Rule::name_dq_esc | Rule::name_esc => name.push_str(&p.as_str()[1..]),
            _ => {}
        }
    }
    if name.is_empty() {
        return None;
    }
    Some(RawHeredoc {
        name,
        fd,
        expand,
        chomp,
        content: String::new(),
        offset,
    })
}

/// Go's `[\t\v\f\r ]` (BuildKit's whitespace for FROM/EXPOSE splitting and the keyword).
fn is_split_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0B' | '\x0C' | '\r')
}

/// Parses one logical line (from `start` in `full`) into a node: keyword, flags, arguments.
fn parse_instruction(
    full: &str,
    start: usize,
    escape: char,
    depth: usize,
) -> Result<Node, LineError> {
    let untrimmed = &full[start..];
    let text = untrimmed.trim();
    let base = start + (untrimmed.len() - untrimmed.trim_start().len());
    if depth > MAX_NESTING {
        return Err(LineError::new(base, "ONBUILD nested too deeply"));
    }
    let mut input = String::with_capacity(text.len() + 1);
    input.push(escape);
    input.push_str(text);
    let top = Grammar::parse(Rule::instruction, &input)
        .ok()
        .and_then(|mut p| p.next())
        .ok_or_else(|| LineError::new(base, "cannot parse instruction"))?;
    // Positions in `input` are one past positions in `text`.
    let at = |p: &Pair<'_, Rule>| base + p.as_span().start() - 1;
    let mut node = empty_node();
    node.offset = base;
    node.original = text.to_string();
    // The rest of the line follows the head; leading blanks are not part of it.
    let head_end = (top.as_span().end() - 1).min(text.len());
    for p in top.into_inner() {
        match p.as_rule() {
            Rule::keyword => node.keyword = p.as_str().to_string(),
            Rule::flag => node.flags.push(Flag {
                offset: at(&p),
                text: flag_text(p),
            }),
            _ => {}
        }
    }
    let rest = text[head_end..].trim_start();
    let rest_at = base + text.len() - rest.len();
    let kw = node.keyword.to_ascii_lowercase();
    match kw.as_str() {
        "add" | "copy" | "volume" => match parse_json(rest, rest_at)? {
            Some(words) => {
                node.json = true;
                node.args = words;
            }
            None => node.args = split_spaces(rest, rest_at),
        },
        "run" | "cmd" | "entrypoint" | "shell" => {
            let (args, json) = maybe_json(rest, rest_at)?;
            node.args = args;
            node.json = json;
        }
        "arg" => node.args = words(rest, rest_at, escape),
        "env" | "label" => node.args = name_values(&kw, rest, rest_at, escape)?,
        "expose" | "from" => node.args = split_spaces(rest, rest_at),
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !rest.is_empty() {
                node.args = vec![Arg::Word {
                    text: rest.to_string(),
                    offset: rest_at,
                }];
            }
        }
        "healthcheck" => {
            let typ_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if typ_len > 0 {
                let after = rest[typ_len..].trim_start();
                let after_at = rest_at + rest.len() - after.len();
                let (mut args, json) = maybe_json(after, after_at)?;
                let typ = Arg::Word {
                    text: rest[..typ_len].to_string(),
                    offset: rest_at,
                };
                args.insert(0, typ);
                node.args = args;
                node.json = json;
            }
        }
        "onbuild" => {
            if !rest.is_empty() {
                let child = parse_instruction(full, rest_at, escape, depth + 1)?;
                node.args = vec![Arg::Nested(Box::new(child))];
            }
        }
        _ => {
            node.args = vec![Arg::Word {
                text: String::new(),
                offset: rest_at,
            }]
        }
    }
    Ok(node)
}

/// The text of a flag: `--` plus its pieces with quotes and escapes resolved.
fn flag_text(p: Pair<'_, Rule>) -> String {
    let mut s = String::from("--");
    for q in p.into_inner().flatten() {
        match q.as_rule() {
            Rule::flag_plain | Rule::flag_escaped | Rule::flag_sq_text | Rule::flag_dq_text => {
                s.push_str(q.as_str())
            }
            _ => {}
        }
    }
    s
}

/// Whitespace-split words (FROM, EXPOSE, and non-JSON ADD/COPY/VOLUME).
fn split_spaces(rest: &str, rest_at: usize) -> Vec<Arg> {
    let mut out = Vec::new();
    let mut pos = 0;
    for part in rest.split(is_split_space) {
        if !part.is_empty() {
            out.push(Arg::Word {
                text: part.to_string(),
                offset: rest_at + pos,
            });
        }
        pos += part.len() + 1;
    }
    out
}

/// Exec form if `rest` is a JSON string array, otherwise the whole rest as one argument.
fn maybe_json(rest: &str, rest_at: usize) -> Result<(Vec<Arg>, bool), LineError> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    Ok(match parse_json(rest, rest_at)? {
        Some(words) => (words, true),
        None => (
            vec![Arg::Word {
                text: rest.to_string(),
                offset: rest_at,
            }],
            false,
        ),
    })
}

/// `Some(strings)` for a JSON array of strings, `None` for anything that is not valid JSON,
/// and an error for valid JSON that is not an array of strings.
fn parse_json(rest: &str, rest_at: usize) -> Result<Option<Vec<Arg>>, LineError> {
    let trimmed = rest.trim_start();
    if !trimmed.starts_with('[') {
        return Ok(None);
    }
    let at = rest_at + rest.len() - trimmed.len();
    match Grammar::parse(Rule::json_array, trimmed) {
        Ok(mut pairs) => {
            let Some(top) = pairs.next() else {
                return Ok(None);
            };
            let strings = top
                .into_inner()
                .filter(|p| p.as_rule() == Rule::json_string)
                .map(|p| Arg::Word {
                    offset: at + p.as_span().start(),
                    text: json_string(p),
                })
                .collect();
            Ok(Some(strings))
        }
        Err(_) if serde_json::from_str::<Vec<serde_json::Value>>(trimmed).is_ok() => {
            Err(LineError::new(
                at,
                "when using JSON array syntax, arrays must be comprised of strings only",
            ))
        }
        Err(_) => Ok(None),
    }
}

/// Decodes a JSON string token (Go `encoding/json` rules: bad surrogates become U+FFFD).
fn json_string(p: Pair<'_, Rule>) -> String {
    let mut s = String::new();
    let parts: Vec<Pair<'_, Rule>> = p.into_inner().collect();
    let hex = |e: &str| u32::from_str_radix(&e[2..], 16).ok();
    let mut i = 0;
    while i < parts.len() {
        let t = parts[i].as_str();
        i += 1;
        if parts[i - 1].as_rule() == Rule::json_chars {
            s.push_str(t);
            continue;
        }
        let c = match t.as_bytes().get(1) {
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let hi = hex(t).unwrap_or(0xFFFD);
                if (0xD800..0xDC00).contains(&hi) {
                    let lo = parts
                        .get(i)
                        .map(|q| q.as_str())
                        .filter(|q| q.starts_with("\\u"));
                    match lo.and_then(hex).filter(|lo| (0xDC00..0xE000).contains(lo)) {
                        Some(lo) => {
                            i += 1;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                                .unwrap_or('\u{FFFD}')
                        }
                        None => '\u{FFFD}',
                    }
                } else {
                    char::from_u32(hi).unwrap_or('\u{FFFD}')
                }
            }
            Some(&b) => b as char,
            None => '\u{FFFD}',
        };
        s.push(c);
    }
    s
}

/// Quote-aware words with quotes and escapes kept (ENV, LABEL, ARG).
fn words(rest: &str, rest_at: usize, escape: char) -> Vec<Arg> {
    let mut input = String::with_capacity(rest.len() + 1);
    input.push(escape);
    input.push_str(rest);
    let Ok(mut pairs) = Grammar::parse(Rule::word_list, &input) else {
        return Vec::new();
    };
    let Some(top) = pairs.next() else {
        return Vec::new();
    };
    top.into_inner()
        .filter(|p| p.as_rule() == Rule::word)
        .map(|p| {
            let offset = rest_at + p.as_span().start() - 1;
            let mut text = p.as_str().to_string();
            if p.into_inner()
                .flatten()
                .any(|q| q.as_rule() == Rule::wesc_end)
            {
                text.pop();
            }
            Arg::Word { text, offset }
        })
        .collect()
}

/// ENV / LABEL arguments: `k v` (legacy) gives `k`, `v`, `""`; `k=v ...` gives triples
/// `k`, `v`, `"="`.
fn name_values(kw: &str, rest: &str, rest_at: usize, escape: char) -> Result<Vec<Arg>, LineError> {
    let ws = words(rest, rest_at, escape);
    let Some(Arg::Word { text: first, .. }) = ws.first() else {
        return Ok(Vec::new());
    };
    let word = |text: &str, offset| Arg::Word {
        text: text.to_string(),
        offset,
    };
    if !first.contains('=') {
        let Some(sep) = rest.find(is_split_space) else {
            let msg = format!("{} must have two arguments", kw.to_ascii_uppercase());
            return Err(LineError::new(rest_at, msg));
        };
        let value = rest[sep..].trim_start_matches(is_split_space);
        let value_at = rest_at + rest.len() - value.len();
        return Ok(vec![
            word(&rest[..sep], rest_at),
            word(value, value_at),
            word("", value_at),
        ]);
    }
    let mut out = Vec::new();
    for w in &ws {
        let Arg::Word { text, offset } = w else {
            continue;
        };
        let Some((k, v)) = text.split_once('=') else {
            let msg = format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                super::dump::go_quote(text)
            );
            return Err(LineError::new(*offset, msg));
        };
        out.push(word(k, *offset));
        out.push(word(v, offset + k.len() + 1));
        out.push(word("=", *offset));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ast(src: &str) -> Ast {
        match parse_syntax(src.as_bytes(), "Dockerfile") {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    fn err(src: &[u8]) -> RecipeError {
        match parse_syntax(src, "Dockerfile") {
            Ok(a) => panic!("expected an error, got {a:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn heredoc_basic_and_lines() {
        let a = ast("FROM a\nRUN <<EOF\necho hi\nEOF\nRUN true\n");
        let n = &a.nodes[1];
        assert_eq!((n.start_line, n.end_line), (2, 4));
        assert_eq!(n.heredocs[0].name, "EOF");
        assert_eq!(n.heredocs[0].content, "echo hi\n");
        assert!(n.heredocs[0].expand);
        assert_eq!(a.nodes[2].start_line, 5);
    }

    #[test]
    fn heredoc_quoted_chomp_fd_and_several() {
        let a = ast("RUN 3<<'A' cat <<-\"B\"\na $x\nA\n\t\tb\n\tB\n");
        let d = &a.nodes[0].heredocs;
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].name.as_str(), d[0].fd, d[0].expand),
            ("A", Some(3), false)
        );
        assert_eq!(d[0].content, "a $x\n");
        assert_eq!(
            (d[1].name.as_str(), d[1].chomp, d[1].expand),
            ("B", true, false)
        );
        assert_eq!(d[1].content, "\t\tb\n");
    }

    #[test]
    fn heredoc_only_where_allowed() {
        let a = ast("ENV a <<EOF\nRUN [\"cat\", \"<<EOF\"]\nRUN echo '<<EOF'\n");
        assert!(a.nodes.iter().all(|n| n.heredocs.is_empty()));
        assert_eq!(a.nodes.len(), 3);
        let a = ast("ONBUILD COPY <<X /x\nbody\nX\n");
        assert_eq!(a.nodes[0].heredocs[0].content, "body\n");
    }

    #[test]
    fn unterminated_heredoc_is_located() {
        let e = err(b"FROM a\nRUN cat <<EOF\nno end\n");
        assert_eq!((e.line, e.col), (2, 9));
        assert!(e.message.contains("unterminated heredoc"));
    }

    #[test]
    fn directive_errors() {
        let e = err(b"# escape=x\nFROM a\n");
        assert_eq!((e.line, e.col), (1, 10));
        let e = err(b"# syntax=a\n# syntax=b\nFROM a\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("only one syntax"));
    }

    #[test]
    fn bom_crlf_and_backtick() {
        let a = ast("\u{FEFF}# escape=`\r\nFROM a\r\nRUN echo \\ `\r\n  b\r\n");
        assert_eq!(a.directives.escape, '`');
        assert_eq!(
            super::super::dump::dump(&a),
            "(from \"a\")\n(run \"echo \\\\   b\")"
        );
    }

    #[test]
    fn invalid_json_falls_back_and_nested_json_errors() {
        let a = ast("CMD [\"a\", 1\nCMD ['a']\n");
        assert!(!a.nodes[0].json && !a.nodes[1].json);
        let e = err(b"FROM a\nCMD [ \"echo\", [ \"nested json\" ] ]\n");
        assert_eq!((e.line, e.col), (2, 5));
    }

    #[test]
    fn invalid_bytes_are_errors() {
        let e = err(b"FROM a\nRUN \xff\n");
        assert_eq!((e.line, e.col), (2, 5));
        let e = err(b"FROM a\nRUN a\0b\n");
        assert_eq!((e.line, e.col), (2, 6));
        assert!(e.message.contains("NUL"));
    }

    #[test]
    fn flag_positions_through_continuations() {
        let a = ast("COPY \\\n  --from=x \\\n  a b\n");
        let n = &a.nodes[0];
        assert_eq!(n.flags[0].text, "--from=x");
        assert_eq!(n.locate(n.flags[0].offset), (2, 2));
    }
}
